"""Shape, dtype and value checks shared by both backends, run before any tracing.

Only ``.shape`` and ``.dtype`` are read here, so the checks work on NumPy arrays,
torch tensors and JAX arrays alike; value checks (finiteness, one-hot labels) are
reduced natively by each backend and reported through :func:`raise_for_values`.
"""

from __future__ import annotations

import numbers
from typing import Iterator, Optional, Tuple

from dfa_core.backend import ArrayLike, FeedbackLike, ParamsLike
from dfa_core.model import SPEC_TYPES, Conv2d, Dense, ModelSpec, NetSpec
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
    """spec must be an MLPSpec or a ModelSpec (both validate their own fields on construction)."""
    if not isinstance(spec, SPEC_TYPES):
        raise TypeError(f"spec must be a dfa_core.MLPSpec or dfa_core.ModelSpec, got {type(spec).__name__}")


def _model_text(spec: NetSpec) -> str:
    """How the messages name the model: its layer sizes, or its blocks' layers."""
    if isinstance(spec, MLPSpec):
        return f"layer_sizes {spec.layer_sizes}"
    return f"the model's {spec.num_layers} Dense/Conv2d layers"


def _param_layout(spec: NetSpec, l: int) -> str:
    """The layout of W_l, named after its layer: torch.nn's Linear or Conv2d."""
    if isinstance(spec, ModelSpec) and isinstance(spec.blocks[l - 1].layer, Conv2d):
        return " (Conv2d: out_channels, in_channels, k, k)"
    if isinstance(spec, ModelSpec) and isinstance(spec.blocks[l - 1].layer, Dense):
        return " (Dense: units, in_features)"
    if isinstance(spec, ModelSpec):  # a composite: name the block, its leaves' shapes say the rest
        return f" ({type(spec.blocks[l - 1].layer).__name__} block {l}: {spec.blocks[l - 1].param_shapes})"
    return ""


def _feedback_layout(spec: NetSpec, l: int) -> str:
    """Why B_l has its rows: n_l for an MLP, the size of a_l for a model's block."""
    if isinstance(spec, MLPSpec):
        return f"(n_{l}, n_L)"
    a_shape = spec.blocks[l - 1].a_shape
    size = " * ".join(str(n) for n in a_shape)
    return f"(size of a_{l} = {size}, n_L)" if len(a_shape) > 1 else f"(n_{l}, n_L)"


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


def _leaf_names(spec: NetSpec, l: int) -> Tuple[str, ...]:
    """Names of block l's params in messages: W_l, b_l; a composite's W1_l, b1_l, ..., W_proj_l, b_proj_l."""
    names = spec.blocks[l - 1].param_names if isinstance(spec, ModelSpec) else ("W", "b")
    return tuple(f"{name}_{l}" for name in names)


def check_params(spec: NetSpec, params: ParamsLike) -> None:
    """params must be ((W_1, b_1), ..., (W_L, b_L)) with spec's shapes and dtype.

    W_l is (n_l, n_{l-1}) for an MLP layer or a Dense block, (C_out, C_in, k, k) for a Conv2d block;
    a composite block's params are one flat tuple of its inner layers' leaves (Block.param_shapes).
    """
    expected = spec.param_shapes
    if not isinstance(params, (tuple, list)) or len(params) != len(expected):
        got = len(params) if isinstance(params, (tuple, list)) else type(params).__name__
        raise ValueError(f"params: expected {len(expected)} (W, b) pairs for {_model_text(spec)}, got {got}")
    for l, (leaves, shapes) in enumerate(zip(params, expected), start=1):
        names = _leaf_names(spec, l)
        if not isinstance(leaves, (tuple, list)) or len(leaves) != len(shapes):
            want = f"a (W_{l}, b_{l}) pair" if len(shapes) == 2 else f"a flat tuple of {len(shapes)} arrays {names}"
            got = f"{len(leaves)} arrays" if isinstance(leaves, (tuple, list)) else type(leaves).__name__
            raise ValueError(f"params[{l - 1}]: expected {want}, got {got}")
        for name, arr, shape in zip(names, leaves, shapes):
            got_shape = _shape(arr, f"params {name}")
            if got_shape != shape:
                layout = _param_layout(spec, l) if name.startswith("W") else ""
                raise ValueError(f"params: {name} must have shape {shape}{layout}, got {got_shape}")
            if dtype_name(arr) != spec.dtype:
                raise TypeError(f"params: {name} must have dtype {spec.dtype} (spec.dtype), got {dtype_name(arr)}")


def check_feedback(spec: NetSpec, feedback: FeedbackLike) -> None:
    """feedback must be (B_1, ..., B_{L-1}) with B_l of shape (n_l, n_L) and spec's dtype.

    For a ModelSpec, n_l is the size of block l's output a_l per sample (C * H * W for a conv).
    """
    expected = spec.feedback_shapes
    if not isinstance(feedback, (tuple, list)) or len(feedback) != len(expected):
        got = len(feedback) if isinstance(feedback, (tuple, list)) else type(feedback).__name__
        raise ValueError(
            f"feedback: expected {len(expected)} matrices (one per hidden layer, shapes {list(expected)}), got {got}"
        )
    for l, (b, shape) in enumerate(zip(feedback, expected), start=1):
        got_shape = _shape(b, f"feedback B_{l}")
        if got_shape != shape:
            raise ValueError(f"feedback: B_{l} must have shape {shape} {_feedback_layout(spec, l)}, got {got_shape}")
        if dtype_name(b) != spec.dtype:
            raise TypeError(f"feedback: B_{l} must have dtype {spec.dtype} (spec.dtype), got {dtype_name(b)}")


def check_x(spec: NetSpec, x: ArrayLike) -> int:
    """x must be (batch, n_0) (a ModelSpec: (batch, *input_shape)), batch >= 1, numeric; returns batch."""
    shape = _shape(x, "x")
    per_sample = (spec.n_in,) if isinstance(spec, MLPSpec) else spec.input_shape
    if shape[1:] != per_sample or shape[0] < 1:
        expected = ", ".join(str(n) for n in ("batch", *per_sample))
        hint = ""
        if len(per_sample) > 1 and len(shape) == 2 and shape[1] == spec.n_in:
            hint = f"; flat images need x.reshape(-1, {', '.join(str(n) for n in per_sample)}) first"
        raise ValueError(f"x must have shape ({expected}) with batch >= 1, got {shape}{hint}")
    if not dtype_name(x).startswith(_NUMERIC_PREFIXES):
        raise TypeError(f"x must have a real numeric dtype, got {dtype_name(x)}")
    return shape[0]


def check_batch(spec: NetSpec, x: ArrayLike, y: ArrayLike) -> int:
    """x (batch, n_0) or (batch, *input_shape) and y (batch, n_L); returns batch."""
    batch = check_x(spec, x)
    shape = _shape(y, "y")
    if shape != (batch, spec.n_out):
        raise ValueError(f"y must have shape (batch, n_L) = ({batch}, {spec.n_out}) to match x, got {shape}")
    if not dtype_name(y).startswith(_NUMERIC_PREFIXES):
        raise TypeError(f"y must have a real numeric dtype, got {dtype_name(y)}")
    return batch


def named_leaves(params: ParamsLike, feedback: Optional[FeedbackLike] = None) -> Iterator[Tuple[str, ArrayLike]]:
    """(name, array) for W_1, b_1, ..., W_L, b_L, then B_1, ..., B_{L-1}: for value checks.

    A block of more than two leaves (a composite) names them params[l-1][i].
    """
    for l, leaves in enumerate(params, start=1):
        if len(leaves) == 2:
            yield f"params W_{l}", leaves[0]
            yield f"params b_{l}", leaves[1]
        else:
            for i, leaf in enumerate(leaves):
                yield f"params[{l - 1}][{i}]", leaf
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
