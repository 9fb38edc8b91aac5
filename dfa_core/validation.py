"""Shape, dtype and value checks shared by both backends, run before any tracing.

Only ``.shape`` and ``.dtype`` are read here, so the checks work on NumPy arrays,
torch tensors and JAX arrays alike; value checks (finiteness, one-hot labels) are
reduced natively by each backend and reported through :func:`raise_for_values`.
"""

from __future__ import annotations

import numbers
from typing import Iterator, Optional, Tuple

from dfa_core.backend import ArrayLike, FeedbackLike, ParamsLike
from dfa_core.spec import METHODS, MODES, MLPSpec, OptimizerSpec

_NUMERIC_PREFIXES = ("float", "int", "uint", "bool", "bfloat")


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; bools and non-integers are TypeErrors naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def dtype_name(array: object) -> str:
    """'float32' for np.float32, torch.float32 and jnp.float32 alike."""
    return str(getattr(array, "dtype", type(array).__name__)).replace("torch.", "")


def _shape(array: object, what: str) -> Tuple[int, ...]:
    shape = getattr(array, "shape", None)
    if shape is None:
        raise TypeError(f"{what} must be an array (NumPy, torch or JAX), got {type(array).__name__}")
    return tuple(int(n) for n in shape)


def check_spec(spec: object) -> None:
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec must be a dfa_core.MLPSpec, got {type(spec).__name__}")


def check_mode(mode: object) -> None:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")


def check_train_step(spec: object, opt: object, method: object, mode: object) -> None:
    """Arguments of ``train_step``: a spec, an OptimizerSpec, a method, and a mode BP can use."""
    check_spec(spec)
    if not isinstance(opt, OptimizerSpec):
        raise TypeError(f"opt must be a dfa_core.OptimizerSpec, got {type(opt).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    check_mode(mode)
    if method == "bp" and mode != "sample":
        raise ValueError(f"method 'bp' has no grouping mode; use mode='sample', got {mode!r}")


def check_params(spec: MLPSpec, params: ParamsLike) -> None:
    """params must be ((W_1, b_1), ..., (W_L, b_L)) with spec's shapes and dtype."""
    expected = spec.param_shapes
    if not isinstance(params, (tuple, list)) or len(params) != len(expected):
        got = len(params) if isinstance(params, (tuple, list)) else type(params).__name__
        raise ValueError(f"params: expected {len(expected)} (W, b) pairs for layer_sizes {spec.layer_sizes}, got {got}")
    for l, (pair, (w_shape, b_shape)) in enumerate(zip(params, expected), start=1):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"params[{l - 1}]: expected a (W_{l}, b_{l}) pair, got {type(pair).__name__}")
        for name, arr, shape in ((f"W_{l}", pair[0], w_shape), (f"b_{l}", pair[1], b_shape)):
            got_shape = _shape(arr, f"params {name}")
            if got_shape != shape:
                raise ValueError(f"params: {name} must have shape {shape}, got {got_shape}")
            if dtype_name(arr) != spec.dtype:
                raise TypeError(f"params: {name} must have dtype {spec.dtype} (spec.dtype), got {dtype_name(arr)}")


def check_feedback(spec: MLPSpec, feedback: FeedbackLike) -> None:
    """feedback must be (B_1, ..., B_{L-1}) with B_l of shape (n_l, n_L) and spec's dtype."""
    expected = spec.feedback_shapes
    if not isinstance(feedback, (tuple, list)) or len(feedback) != len(expected):
        got = len(feedback) if isinstance(feedback, (tuple, list)) else type(feedback).__name__
        raise ValueError(
            f"feedback: expected {len(expected)} matrices (one per hidden layer, shapes {list(expected)}), got {got}"
        )
    for l, (b, shape) in enumerate(zip(feedback, expected), start=1):
        got_shape = _shape(b, f"feedback B_{l}")
        if got_shape != shape:
            raise ValueError(f"feedback: B_{l} must have shape {shape} (n_{l}, n_L), got {got_shape}")
        if dtype_name(b) != spec.dtype:
            raise TypeError(f"feedback: B_{l} must have dtype {spec.dtype} (spec.dtype), got {dtype_name(b)}")


def check_x(spec: MLPSpec, x: ArrayLike) -> int:
    """x must be (batch, n_0) with batch >= 1 and a numeric dtype; returns batch."""
    shape = _shape(x, "x")
    if len(shape) != 2 or shape[1] != spec.n_in or shape[0] < 1:
        raise ValueError(f"x must have shape (batch, {spec.n_in}) with batch >= 1, got {shape}")
    if not dtype_name(x).startswith(_NUMERIC_PREFIXES):
        raise TypeError(f"x must have a real numeric dtype, got {dtype_name(x)}")
    return shape[0]


def check_batch(spec: MLPSpec, x: ArrayLike, y: ArrayLike) -> int:
    """x (batch, n_0) and y (batch, n_L); returns batch."""
    batch = check_x(spec, x)
    shape = _shape(y, "y")
    if shape != (batch, spec.n_out):
        raise ValueError(f"y must have shape (batch, n_L) = ({batch}, {spec.n_out}) to match x, got {shape}")
    if not dtype_name(y).startswith(_NUMERIC_PREFIXES):
        raise TypeError(f"y must have a real numeric dtype, got {dtype_name(y)}")
    return batch


def named_leaves(params: ParamsLike, feedback: Optional[FeedbackLike] = None) -> Iterator[Tuple[str, ArrayLike]]:
    """(name, array) for W_1, b_1, ..., W_L, b_L, then B_1, ..., B_{L-1}: for value checks."""
    for l, (w, b) in enumerate(params, start=1):
        yield f"params W_{l}", w
        yield f"params b_{l}", b
    for l, m in enumerate(feedback or (), start=1):
        yield f"feedback B_{l}", m


def raise_for_nonfinite(name: str, finite: bool) -> None:
    if not finite:
        raise ValueError(f"{name} has non-finite values (nan or inf)")


def needs_one_hot(mode: str) -> bool:
    return mode == "class_mean"


def raise_for_values(x_finite: bool, y_finite: bool = True, y_one_hot: bool = True, mode: str = "sample") -> None:
    """Turns natively reduced value flags into clear errors."""
    if not x_finite:
        raise ValueError("x has non-finite values (nan or inf)")
    if not y_finite:
        raise ValueError("y has non-finite values (nan or inf)")
    if needs_one_hot(mode) and not y_one_hot:
        raise ValueError(
            f"mode {mode!r} groups samples by class, so y must be one-hot (each row has a single 1 and zeros elsewhere)"
        )
