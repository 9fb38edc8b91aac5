"""Shape, dtype and value checks shared by both backends, run before any tracing.

Only ``.shape`` and ``.dtype`` are read here, so the checks work on NumPy arrays,
torch tensors and JAX arrays alike; value checks (finiteness, one-hot labels) are
reduced natively by each backend and reported through :func:`raise_for_values`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterator, Optional, Tuple

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


GROUPING_RULES: Tuple[str, ...] = ("dfa", "drtp")
"""Rules whose hidden signal is a direct projection of the grouped error (or target), so they
accept every grouping mode; every other rule needs mode 'sample'."""

DIRECT_RULES: Tuple[str, ...] = ("dfa", "drtp")
"""Hidden block l's signal comes from B_l (a_size_l, n_L) applied to e' (dfa) or y' (drtp)."""

CHAIN_RULES: Tuple[str, ...] = ("bp", "fa", "kp", "usf", "brsf", "frsf")
"""Hidden block l's signal is delta_{l+1} carried back through block l+1 (its own W for 'bp',
a stand-in for the others), so block l+1 must have a teaching signal (not be 'shallow')."""

MIRROR_RULES: Tuple[str, ...] = ("fa", "kp", "usf", "brsf", "frsf")
"""Chain rules that replace W_{l+1} by another matrix: block l+1 must be a Dense or Conv2d."""

WEIGHT_SHAPED_FEEDBACK: Tuple[str, ...] = ("fa", "kp", "frsf")
"""Rules whose feedback entry l is shaped like W_{l+1} (B for fa/kp, the fixed |R| for frsf)."""

STATEFUL_RULES: Tuple[str, ...] = ("kp", "brsf")
"""Rules that make ``train_step`` carry state next to the optimizer's (``RuleState``)."""


def method_rules(spec: NetSpec, method: object) -> Tuple[str, ...]:
    """The rule of every block, L names, from ``method``: one name, or one name per block.

    One name ``m`` gives every block ``m``. A sequence gives block l (1..L) its entry l; the
    output block (the last entry) always trains from e' whatever its entry says (every rule,
    'drtp' and 'shallow' included, trains the output block by its true gradient), so that entry
    is only checked to be a rule name. Undefined combinations raise:

    * a chain rule (``CHAIN_RULES``) on hidden block l below a 'shallow' hidden block l+1:
      a frozen block has no teaching signal to carry back;
    * a rule that replaces W_{l+1} (``MIRROR_RULES``: fa, kp, usf, brsf, frsf) on hidden block
      l when block l+1 is a composite, transformer or user block (no single W_{l+1}).

    Args:
      spec: the network (an MLPSpec or a ModelSpec).
      method: a name in METHODS, or a tuple/list of L such names.

    Returns:
      (rule_1, ..., rule_L).

    Raises:
      ValueError, TypeError: an unknown name, a sequence of the wrong length or type, or an
        undefined combination, naming the block.
    """
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        rules: Tuple[str, ...] = (method,) * spec.num_layers
    elif isinstance(method, (tuple, list)):
        if len(method) != spec.num_layers:
            raise ValueError(
                f"method: a sequence needs one rule per block ({spec.num_layers} for {_model_text(spec)}), "
                f"got {len(method)}: {tuple(method)!r}"
            )
        for i, name in enumerate(method):
            if not isinstance(name, str) or name not in METHODS:
                raise ValueError(f"method[{i}] must be one of {list(METHODS)}, got {name!r}")
        rules = tuple(method)
    else:
        raise ValueError(f"method must be one of {list(METHODS)} or a sequence of them (one per block), got {method!r}")
    for l in range(1, spec.num_layers):  # hidden block l (1-based) under block l + 1
        rule = rules[l - 1]
        if rule in CHAIN_RULES and l + 1 < spec.num_layers and rules[l] == "shallow":
            raise ValueError(
                f"method: block {l}'s rule {rule!r} carries delta_{l + 1} back through block {l + 1}, but block "
                f"{l + 1} is 'shallow' (frozen, no teaching signal); use 'dfa', 'drtp' or 'shallow' for block {l}"
            )
        if rule in MIRROR_RULES and isinstance(spec, ModelSpec):
            above = spec.blocks[l].layer
            if not isinstance(above, (Dense, Conv2d)):
                raise ValueError(
                    f"method: block {l}'s rule {rule!r} replaces W_{l + 1} by another matrix, but block {l + 1} is a "
                    f"{type(above).__name__} (no single W); use 'bp', 'dfa', 'drtp' or 'shallow' for block {l}"
                )
    return rules


def method_key(method: Any) -> Any:
    """``method`` as a hashable value (a list becomes a tuple), for caches and static arguments."""
    return tuple(method) if isinstance(method, list) else method


def check_rules_mode(rules: Tuple[str, ...], mode: object) -> None:
    """Grouping modes belong to the direct rules (dfa, drtp); every other rule needs 'sample'."""
    check_mode(mode)
    if mode == "sample":
        return
    others = sorted({r for r in rules if r not in GROUPING_RULES})
    if others:
        which = f"method {others[0]!r}" if len(others) == 1 else f"methods {others}"
        raise ValueError(
            f"{which} has no grouping mode (only {list(GROUPING_RULES)} group a batch); use mode='sample', got {mode!r}"
        )


def check_train_step(spec: object, opt: object, method: object, mode: object) -> None:
    """Arguments of ``train_step``: a spec, an OptimizerSpec, a method (or one per block) and a mode it can use."""
    check_spec(spec)
    if not isinstance(opt, OptimizerSpec):
        raise TypeError(f"opt must be a dfa_core.OptimizerSpec, got {type(opt).__name__}")
    rules = method_rules(spec, method)  # type: ignore[arg-type]
    check_rules_mode(rules, mode)


def rule_feedback_shapes(spec: NetSpec, rules: Tuple[str, ...]) -> Tuple[Optional[Tuple[int, ...]], ...]:
    """Per hidden block l, the feedback shape its rule needs, or None where it needs nothing.

    dfa/drtp: (a_size_l, n_L); fa/kp/frsf: the shape of W_{l+1} (a kernel for a Conv2d block
    l + 1); bp/usf/brsf/shallow: None (brsf also takes explicit |R| shaped like W_{l+1}).
    """
    shapes: list = []
    for l in range(1, spec.num_layers):
        rule = rules[l - 1]
        if rule in DIRECT_RULES:
            shapes.append(spec.feedback_shapes[l - 1])
        elif rule in WEIGHT_SHAPED_FEEDBACK:
            shapes.append(tuple(spec.param_shapes[l][0]))
        else:
            shapes.append(None)
    return tuple(shapes)


def check_rule_feedback(spec: NetSpec, rules: Tuple[str, ...], feedback: object) -> None:
    """feedback for ``rules``: one entry per hidden block, or () when no rule needs any.

    Entry l is what hidden block l's rule needs (``rule_feedback_shapes``), in spec.dtype; a
    rule that needs nothing takes a zero-size array (or any array: it is ignored), and
    'brsf' takes either a zero-size array (magnitudes drawn from the key) or this batch's
    magnitudes |R| shaped like W_{l+1}.
    """
    shapes = rule_feedback_shapes(spec, rules)
    needs = any(s is not None for s in shapes)
    if not isinstance(feedback, (tuple, list)):
        raise ValueError(f"feedback must be a tuple of arrays (one per hidden block), got {type(feedback).__name__}")
    if not feedback and not needs:
        return
    if len(feedback) != len(shapes):
        want = [s if s is not None else "zero-size" for s in shapes]
        raise ValueError(
            f"feedback for rules {rules}: expected {len(shapes)} entries (one per hidden block: {want}), "
            f"got {len(feedback)}"
        )
    for l, (entry, shape, rule) in enumerate(zip(feedback, shapes, rules), start=1):
        got = _shape(entry, f"feedback entry {l}")
        if rule == "brsf":
            w_shape = tuple(spec.param_shapes[l][0])
            if math.prod(got) and got != w_shape:
                raise ValueError(
                    f"feedback entry {l} (rule 'brsf'): expected a zero-size array (draw |R| from the key) or this "
                    f"batch's magnitudes shaped like W_{l + 1} {w_shape}, got {got}"
                )
        if shape is None:
            continue
        if got != shape:
            what = "B_l (size of a_l, n_L)" if rule in DIRECT_RULES else f"like W_{l + 1}"
            raise ValueError(f"feedback entry {l} (rule {rule!r}) must have shape {shape} ({what}), got {got}")
        if dtype_name(entry) != spec.dtype:
            raise TypeError(f"feedback entry {l} must have dtype {spec.dtype} (spec.dtype), got {dtype_name(entry)}")


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
