"""Static, hashable descriptions of a DFA network and of an optimizer.

Both backends key their compiled functions on these objects (JAX uses them as
``static_argnames``), so they are frozen dataclasses validated on construction.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import numbers
from typing import Tuple

ACTIVATIONS: Tuple[str, ...] = ("tanh", "relu", "leaky_relu", "sigmoid", "identity")
"""Hidden-layer activations f, each with a closed-form derivative f'."""

OUTPUTS: Tuple[str, ...] = ("sigmoid", "softmax", "identity")
"""Output functions g, each paired with the loss for which dLoss/da_L = g(a_L) - y.

* ``sigmoid``: binary cross-entropy summed over output units (the report's default).
* ``softmax``: categorical cross-entropy.
* ``identity``: squared error / 2 summed over output units.
"""

LOSS_OF_OUTPUT = {
    "sigmoid": "binary_cross_entropy",
    "softmax": "cross_entropy",
    "identity": "squared_error",
}

MODES: Tuple[str, ...] = ("sample", "batch_mean", "class_mean")
"""How a batch is grouped before the DFA update (the report's three training loops)."""

REDUCTIONS: Tuple[str, ...] = ("sum", "mean")
"""``sum`` adds the per-group gradients (the report's convention); ``mean`` divides by K."""

DTYPES: Tuple[str, ...] = ("float32", "float64")

METHODS: Tuple[str, ...] = ("dfa", "bp", "fa", "usf", "brsf", "frsf", "kp", "drtp", "shallow")
"""Learning rules (equations in ``dfa_core.backend.Backend.grads``): direct feedback alignment,
backpropagation, feedback alignment, the sign-symmetric family (uniform, batchwise-random and
fixed-random magnitudes), Kolen-Pollack, direct random target projection, and a shallow
baseline (only the output block trains). ``method`` may also be a sequence of these names,
one per block (``dfa_core.validation.method_rules``)."""

OPTIMIZERS: Tuple[str, ...] = ("sgd", "momentum", "adam")

LEAKY_RELU_SLOPE = 0.01
"""Negative-side slope of ``leaky_relu`` (torch.nn.LeakyReLU's and jax.nn's default)."""


def _check_choice(what: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what} must be one of {list(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """A fully connected network trained by DFA or BP.

    Parameters of layer l (1-based) are W_l with shape (n_l, n_{l-1}) and b_l with
    shape (n_l,), the torch.nn.Linear layout. Hidden layer l has a feedback matrix
    B_l with shape (n_l, n_L).
    """

    layer_sizes: Tuple[int, ...]  # (n_0, ..., n_L): input, hidden..., output widths
    activation: str = "tanh"  # hidden activation f, one of ACTIVATIONS
    output: str = "sigmoid"  # output function g (and its paired loss), one of OUTPUTS
    reduction: str = "sum"  # how gradients combine over the K groups, one of REDUCTIONS
    dtype: str = "float32"  # floating type of parameters and computation, one of DTYPES

    def __post_init__(self):
        sizes = self.layer_sizes
        # An ordered sequence only: a set or dict would silently reorder the widths.
        if (
            isinstance(sizes, (str, bytes))
            or not isinstance(sizes, collections.abc.Sequence)
            and not (hasattr(sizes, "__array__") and getattr(sizes, "ndim", None) == 1)
        ):
            raise TypeError(
                "layer_sizes must be an ordered sequence of ints such as (784, 200, 10), "
                f"got {type(sizes).__name__} {sizes!r}"
            )
        sizes = tuple(sizes)
        if len(sizes) < 2:
            raise ValueError(
                f"layer_sizes needs at least 2 entries (input and output widths), got {len(sizes)}: {sizes!r}"
            )
        for i, n in enumerate(sizes):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral):
                raise TypeError(f"layer_sizes[{i}] must be an int, got {type(n).__name__} {n!r}")
            if n <= 0:
                raise ValueError(f"layer_sizes[{i}] must be positive, got {n}")
        object.__setattr__(self, "layer_sizes", tuple(int(n) for n in sizes))
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("output", self.output, OUTPUTS)
        _check_choice("reduction", self.reduction, REDUCTIONS)
        _check_choice("dtype", self.dtype, DTYPES)

    @property
    def num_layers(self) -> int:
        """L, the number of weight layers (hidden layers + the output layer)."""
        return len(self.layer_sizes) - 1

    @property
    def num_hidden(self) -> int:
        """L - 1, the number of hidden layers (each has one feedback matrix)."""
        return len(self.layer_sizes) - 2

    @property
    def n_in(self) -> int:
        return self.layer_sizes[0]

    @property
    def n_out(self) -> int:
        return self.layer_sizes[-1]

    @property
    def hidden_sizes(self) -> Tuple[int, ...]:
        return self.layer_sizes[1:-1]

    @property
    def loss(self) -> str:
        """Name of the loss paired with ``output``."""
        return LOSS_OF_OUTPUT[self.output]

    @property
    def param_shapes(self) -> Tuple[Tuple[Tuple[int, int], Tuple[int]], ...]:
        """((n_1, n_0), (n_1,)), ..., ((n_L, n_{L-1}), (n_L,))."""
        s = self.layer_sizes
        return tuple(((s[l + 1], s[l]), (s[l + 1],)) for l in range(self.num_layers))

    @property
    def feedback_shapes(self) -> Tuple[Tuple[int, int], ...]:
        """(n_l, n_L) for each hidden layer l = 1..L-1."""
        return tuple((n, self.n_out) for n in self.hidden_sizes)

    def num_params(self) -> int:
        return sum(o * (i + 1) for (o, i), _ in self.param_shapes)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer whose math matches optax's ``sgd`` / ``sgd(momentum=...)`` / ``adam``.

    ``sgd``: update = -lr * g.
    ``momentum``: t = g + momentum * t; update = -lr * t (nesterov: -lr * (g + momentum * t)).
    ``adam``: optax.adam with bias correction, update = -lr * m_hat / (sqrt(v_hat) + eps).

    ``weight_decay`` lambda >= 0 adds lambda * p to every parameter's gradient before the
    optimizer sees it (L2 regularisation coupled to the gradient, as ``torch.optim``'s
    ``weight_decay`` and ``optax.add_decayed_weights`` before the optimizer), on W and b alike.
    """

    name: str = "sgd"  # one of OPTIMIZERS
    learning_rate: float = 1e-3  # step size, > 0
    momentum: float = 0.9  # used by "momentum" only, in [0, 1)
    nesterov: bool = False  # used by "momentum" only
    b1: float = 0.9  # adam first-moment decay, in [0, 1)
    b2: float = 0.999  # adam second-moment decay, in [0, 1)
    eps: float = 1e-8  # adam denominator offset, > 0
    weight_decay: float = 0.0  # L2 coefficient lambda >= 0: the gradient of every parameter p gets + lambda * p

    def __post_init__(self):
        _check_choice("optimizer name", self.name, OPTIMIZERS)
        for field in ("learning_rate", "momentum", "b1", "b2", "eps", "weight_decay"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{field} must be a real number, got {type(value).__name__} {value!r}")
            if not (float(value) == float(value)) or abs(float(value)) == float("inf"):
                raise ValueError(f"{field} must be finite, got {value!r}")
            object.__setattr__(self, field, float(value))
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for field in ("momentum", "b1", "b2"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"{field} must be in [0, 1), got {getattr(self, field)}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {self.nesterov!r}")

    def to_dict(self) -> dict:
        """The fields this optimizer uses, as JSON-ready values (what run records store)."""
        out = {"name": self.name, "learning_rate": self.learning_rate}
        if self.name == "momentum":
            out.update(momentum=self.momentum, nesterov=self.nesterov)
        elif self.name == "adam":
            out.update(b1=self.b1, b2=self.b2, eps=self.eps)
        if self.weight_decay:  # recorded only when set: the records of before stay as they were
            out["weight_decay"] = self.weight_decay
        return out
