"""Hardware effects on DFA's error projection: the ``Projection`` spec, its equations and its checks.

DFA's feedback path e' B_l^T can run on physical hardware (a photonic co-processor, an analog
crossbar) that sees a coarse copy of the error, adds noise to what it computes, or is a separate
device altogether. A ``Projection`` says which, and both backends apply it inside the DFA step
(``dfa_grads(..., projection=..., noise=..., key=...)``). Imports NumPy only.

The equations, per batch (e' the grouped error, (K, n_L), *before* reduction 'mean''s 1/K;
B_l (size_l, n_L); z_l standard normal draws, (K, size_l), one array per hidden block):

1. Quantisation of the error that enters the projection, q = Q(e'):

   - ``None``:      q = e'.
   - ``"sign"``:    q = sign(e') (0 stays 0).
   - ``"ternary"``: q = sign(e') * [|e'| > t], t = ``threshold``. LightOn's photonic DFA feeds the
     error to its binary optical input this way (Launay et al. 2020, "Hardware Beyond
     Backpropagation: a Photonic Co-Processor for Direct Feedback Alignment", arXiv:2012.06373;
     their code, ``TernarizedRandomProjection``, compares a mean-reduced gradient with t / batch,
     that is the per-sample error with t, default t = 0.1 – which is why Q acts before the 1/K).
   - ``"kbit:N"``:  uniform, symmetric, N bits with a per-batch scale: s = max |e'| over the whole
     (K, n_L) batch, m = 2^(N-1) - 1 levels each side, q = (s / m) * round(m e' / s) (round half to
     even, as NumPy, JAX and torch do); q = 0 when s = 0.

2. The projection, p_l = q B_l^T in the compiled step, or ``device(q)[l]`` for a plug-in device
   (``Projection(device=project)``: project(q (K, n_L) NumPy) -> (q B_1^T, ..., q B_{L-1}^T), each
   (K, size_l) NumPy), called outside the compiled program (``jax.pure_callback`` on JAX; a plain
   call on torch).

3. Noise on each projection:

   - ``"additive"``:       p_l <- p_l + max|q| (mu + sigma z_l), with max|q| over the whole batch:
     the optical DFA model of Shastri Lab (Filipovich et al. 2022, "Silicon photonic architecture
     for training deep neural networks with direct feedback alignment", Optica 9(12); code
     github.com/Shastri-Lab/dfa_optica_paper, ``dfa.py``: ``B e + max|e| N(mu, sigma)``, one draw
     per layer).
   - ``"multiplicative"``: p_l <- p_l * (1 + mu + sigma z_l) (a per-element gain error).

   In mode 'class_mean' the rows of classes absent from the batch (all-zero rows of e', kept so
   shapes stay static) get no noise: z_l is zeroed there, so they still add nothing.

4. Reduction 'mean': p_l <- p_l / K. Then, as without hardware, delta_l = p_l * f'(a'_l). The
   output block's update uses the exact e' (a digital error, as in the photonic DFA papers).

A ``Projection()`` with no quantisation, no noise and no device is the identity: the step is then
exactly (bit for bit) the plain DFA step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np

from dfa_core.backend import RuleState

QUANTIZERS = ("ternary", "sign", "kbit:N")
"""Error quantisers; ``kbit:N`` stands for kbit:2, kbit:3, ... (N bits, 2 <= N <= 32)."""
NOISES = ("additive", "multiplicative")
"""Projection noise models."""
DEFAULT_THRESHOLD = 0.1
"""The ternary threshold t of LightOn's TernarizedRandomProjection (on the per-sample error)."""


def _parse_bits(quantize: str) -> int:
    """N of 'kbit:N', or a ValueError naming what was expected."""
    text = quantize[len("kbit:") :]
    if not text.isdigit() or not 2 <= int(text) <= 32:
        raise ValueError(f"quantize 'kbit:N' needs an integer N of bits in [2, 32], got {quantize!r}")
    return int(text)


@dataclasses.dataclass(frozen=True)
class Projection:
    """How the hardware computes DFA's projections e' B_l^T (see the module docstring's equations).

    Frozen and hashable: JAX takes it as a static argument of the compiled step, so each distinct
    Projection compiles once.
    """

    quantize: Optional[str] = None  # None, 'ternary', 'sign' or 'kbit:N' (error quantisation before projecting)
    threshold: float = DEFAULT_THRESHOLD  # t of 'ternary': |e'| > t -> sign(e'), else 0; >= 0
    noise: Optional[str] = None  # None, 'additive' (+ max|q| (mu + sigma z)) or 'multiplicative' (* (1 + mu + sigma z))
    sigma: float = 0.0  # noise standard deviation (relative to max|q| for 'additive'); >= 0
    mu: float = 0.0  # noise mean (additive offset, or gain error for 'multiplicative')
    device: Optional[Callable[[np.ndarray], Sequence[np.ndarray]]] = None  # q (K, n_L) -> (p_1, ..., p_{L-1})

    def __post_init__(self) -> None:
        if self.quantize is not None:
            if not isinstance(self.quantize, str):
                raise TypeError(f"quantize must be None or a str in {QUANTIZERS}, got {self.quantize!r}")
            if self.quantize.startswith("kbit:"):
                _parse_bits(self.quantize)
            elif self.quantize not in ("ternary", "sign"):
                raise ValueError(f"quantize must be None or one of {list(QUANTIZERS)}, got {self.quantize!r}")
        for name in ("threshold", "sigma", "mu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite real number, got {value!r}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")
        if self.threshold != DEFAULT_THRESHOLD and self.quantize != "ternary":
            raise ValueError(f"threshold={self.threshold!r} is only read by quantize='ternary', got {self.quantize!r}")
        if self.noise is not None and self.noise not in NOISES:
            raise ValueError(f"noise must be None or one of {list(NOISES)}, got {self.noise!r}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma!r}")
        if self.noise is None and (self.sigma != 0 or self.mu != 0):
            raise ValueError(f"sigma={self.sigma!r}, mu={self.mu!r} are set but noise is None; choose {list(NOISES)}")
        if self.device is not None:
            if not callable(self.device):
                raise TypeError(f"device must be a callable q -> (q B_1^T, ...), got {type(self.device).__name__}")
            try:
                hash(self.device)
            except TypeError:
                raise TypeError(
                    f"device must be hashable (a function, a bound method or an object with __hash__): "
                    f"{type(self.device).__name__} is not"
                ) from None

    @property
    def bits(self) -> Optional[int]:
        """N of quantize='kbit:N', else None."""
        if self.quantize is not None and self.quantize.startswith("kbit:"):
            return _parse_bits(self.quantize)
        return None

    @property
    def levels(self) -> Optional[int]:
        """m = 2^(N-1) - 1, the nonzero levels on each side of quantize='kbit:N', else None."""
        bits = self.bits
        return None if bits is None else 2 ** (bits - 1) - 1

    @property
    def is_identity(self) -> bool:
        """True when the projection is plain e' B_l^T (nothing to quantise, no noise, no device)."""
        return self.quantize is None and self.noise is None and self.device is None


def active(projection: Optional[Projection]) -> Optional[Projection]:
    """``projection``, or None when it is None or the identity (the plain DFA step runs then).

    Raises:
      TypeError: projection is neither None nor a Projection.
    """
    if projection is None:
        return None
    if not isinstance(projection, Projection):
        raise TypeError(f"projection must be a dfa_core.hardware.Projection or None, got {type(projection).__name__}")
    return None if projection.is_identity else projection


def check_noise_source(projection: Optional[Projection], noise: Any, key: Any) -> None:
    """Checks that noise draws come from exactly one place when, and only when, they are needed.

    Args:
      projection: the (active) projection or None.
      noise: explicit standard-normal draws, one array per hidden block, or None.
      key: a source of random draws (a JAX PRNG key; a torch.Generator or int seed), or None.

    Raises:
      ValueError: noise or key given without projection noise; both given; or neither given
        although the projection has noise.
    """
    model = None if projection is None else projection.noise
    wants = model is not None
    if noise is not None and key is not None:
        raise ValueError("pass the noise draws explicitly (noise=) or a key to draw them (key=), not both")
    if not wants and (noise is not None or key is not None):
        what = "noise" if noise is not None else "key"
        raise ValueError(f"{what}= was given but the projection has no noise (projection.noise is None)")
    if wants and noise is None and key is None:
        raise ValueError(
            f"projection noise {model!r} needs its standard-normal draws: pass noise= "
            "(one array per hidden block) or key= (drawn inside the step)"
        )


def num_groups(spec: Any, batch: int, mode: str) -> int:
    """K, the rows of the grouped error as the backends keep them: batch, 1, or n_L (class_mean)."""
    if mode == "sample":
        return batch
    if mode == "batch_mean":
        return 1
    return int(spec.n_out)


def projection_shapes(spec: Any, batch: int, mode: str) -> Tuple[Tuple[int, int], ...]:
    """Shapes of the projections e' B_l^T, ((K, size_1), ..., (K, size_{L-1})): what noise draws match."""
    k = num_groups(spec, batch, mode)
    return tuple((k, int(shape[0])) for shape in spec.feedback_shapes)


def check_noise(spec: Any, noise: Sequence[Any], batch: int, mode: str) -> None:
    """Checks explicit noise draws: one array per hidden block, each shaped like its projection.

    A ModelSpec's block may also take its draws in the block's own shape (K, *a_shape_l).

    Raises:
      ValueError: wrong count or shapes, naming what was expected.
    """
    want = projection_shapes(spec, batch, mode)
    if not isinstance(noise, (tuple, list)) or len(noise) != len(want):
        got = f"{len(noise)} arrays" if isinstance(noise, (tuple, list)) else type(noise).__name__
        raise ValueError(f"noise must be {len(want)} arrays (one per hidden block), got {got}")
    for l, (z, shape) in enumerate(zip(noise, want)):
        got_shape = tuple(np.shape(z))
        if got_shape != shape and not (
            len(got_shape) > 2 and got_shape[0] == shape[0] and int(np.prod(got_shape[1:])) == shape[1]
        ):
            raise ValueError(f"noise[{l}] must have shape {shape} (the projection's, mode {mode!r}), got {got_shape}")


def draw_noise(spec: Any, batch: int, mode: str, seed: int) -> Tuple[np.ndarray, ...]:
    """Standard-normal draws for every projection (NumPy, seeded; spec.dtype): explicit noise for either backend."""
    rng = np.random.default_rng(seed)
    dtype = getattr(spec, "dtype", "float32")
    return tuple(rng.standard_normal(shape).astype(dtype) for shape in projection_shapes(spec, batch, mode))


def check_device_output(out: Any, shapes: Sequence[Tuple[int, int]]) -> Tuple[np.ndarray, ...]:
    """A device's answer as a tuple of NumPy arrays, each (K, size_l); reshapes (K, *a_shape) to (K, size).

    Raises:
      ValueError: not one array per hidden block, or a wrong shape.
    """
    if isinstance(out, np.ndarray) or not isinstance(out, (tuple, list)):
        raise ValueError(f"the projection device must return a tuple of {len(shapes)} arrays, got {type(out).__name__}")
    if len(out) != len(shapes):
        raise ValueError(
            f"the projection device returned {len(out)} arrays, expected {len(shapes)} (one per hidden block)"
        )
    arrays = []
    for l, (p, shape) in enumerate(zip(out, shapes)):
        p = np.asarray(p)
        if p.shape != shape and (p.ndim < 2 or p.shape[0] != shape[0] or p.size != shape[0] * shape[1]):
            raise ValueError(f"the projection device's output {l} has shape {p.shape}, expected {shape}")
        arrays.append(p.reshape(shape))
    return tuple(arrays)


def check_step_projection(method: Any, projection: Optional[Projection]) -> Optional[Projection]:
    """The active projection (``dfa_core.hardware.active``) of a step of ``method``, or None.

    Raises:
      TypeError: projection is neither None nor a Projection.
      ValueError: an active projection with a method other than 'dfa'.
    """
    hw = active(projection)
    if hw is not None and method != "dfa":
        raise ValueError(
            f"projection (hardware effects on DFA's projection e B_l^T) applies to method 'dfa' only, got {method!r}"
        )
    return hw


def check_many_projection(method: Any, projection: Optional[Projection]) -> Optional[Projection]:
    """``check_step_projection`` for many members in one program: a plug-in device is refused, since it
    runs on the host, outside that program."""
    hw = check_step_projection(method, projection)
    if hw is not None and hw.device is not None:
        raise ValueError(
            "train_epoch_many: a projection with a plug-in device runs the device on the host, outside the "
            "members' one program; train each member with fit(..., projection=...) instead"
        )
    return hw


def check_noise_state(projection: Optional[Projection], opt_state: Any) -> None:
    """A noisy projection draws from the step's ``RuleState``; anything else is refused before tracing.

    Raises:
      TypeError: the projection has noise and opt_state is not a RuleState.
    """
    if projection is not None and projection.noise is not None and not isinstance(opt_state, RuleState):
        raise TypeError(
            f"projection noise {projection.noise!r} draws each step's key from a RuleState opt_state: build it "
            f"with init_rule_state(spec, 'dfa', opt_state, feedback, seed, projection=projection), got "
            f"{type(opt_state).__name__}"
        )


__all__ = [
    "check_many_projection",
    "check_noise_state",
    "check_step_projection",
    "DEFAULT_THRESHOLD",
    "NOISES",
    "Projection",
    "QUANTIZERS",
    "active",
    "check_device_output",
    "check_noise",
    "check_noise_source",
    "draw_noise",
    "num_groups",
    "projection_shapes",
]
