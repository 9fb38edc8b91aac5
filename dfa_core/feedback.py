"""The fixed random feedback each learning rule needs, and the seeded presets that draw it (NumPy only).

Two tables, each one entry per name:

- ``RULE_NEEDS``: what a learning rule reads for hidden block l = 1..L-1. ``"projection"``:
  DFA's B_l of shape (size of a_l per sample, n_L) ("dfa"; "drtp" projects the one-hot target
  with it instead of the error). ``"weight"``: a random matrix shaped like W_{l+1}, the weight of
  the block above (a kernel shaped like it for a Conv2d): feedback alignment's B_{l+1} in
  delta_l = (delta_{l+1} B_{l+1}) * f'(a_l) ("fa"; "kp" starts from it and trains it).
  ``"magnitude"``: the fixed random magnitudes |R| shaped like W_{l+1} ("frsf": B = |R| * sign(W)).
  ``None``: nothing ("bp", "usf", "brsf" draws its magnitudes per batch inside the step, "shallow").
- ``FEEDBACK_PRESETS``: how the matrices are drawn, ``name -> Preset``; each draw function
  cites its source. All draws come from one ``np.random.default_rng(seed)`` (the DFA
  projections first, in block order, then the FA-shaped matrices), so a seed gives the same
  arrays on every backend.

``dfa_core.init.init_feedback`` dispatches to these tables. A new preset is one ``Preset``
entry in ``FEEDBACK_PRESETS`` (``FEEDBACK_DISTS``, the CLI's choices and RunConfig's check
read its names); a new rule is one ``RULE_NEEDS`` entry.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from dfa_core.model import Conv2d, Dense, ModelSpec, NetSpec

Shape = Tuple[int, ...]

DEFAULT_FEEDBACK_SCALE = 1.9
"""The report draws B_l from N(0, 1.9^2): the ``normal`` preset's default scale."""

FEEDBACK_RULES: Tuple[str, ...] = ("dfa", "bp", "fa", "usf", "brsf", "frsf", "kp", "drtp", "shallow")
"""The learning rules ``init_feedback(..., method=...)`` knows (``RULE_NEEDS`` says what each reads)."""

RULE_NEEDS: Dict[str, Optional[str]] = {
    "dfa": "projection",
    "drtp": "projection",
    "fa": "weight",
    "kp": "weight",
    "frsf": "magnitude",
    "bp": None,
    "usf": None,
    "brsf": None,
    "shallow": None,
}
"""Per rule: ``"projection"`` (B_l, (size of a_l, n_L)), ``"weight"`` (shaped like W_{l+1}),
``"magnitude"`` (|R| shaped like W_{l+1}) or None (nothing)."""


def _is_density(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and 0 < float(value) <= 1


def _is_count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and int(value) >= 1


OPTION_CHECKS: Dict[str, Tuple[str, Callable[[Any], bool]]] = {
    "density": ("a number in (0, 1]", _is_density),
    "k": ("an int >= 1", _is_count),
    "rank": ("an int >= 1", _is_count),
}
"""Every preset option: (what it must be, its check). Bounds that depend on the shapes
(k <= n_L, rank <= min(rows, columns)) are checked when drawing."""

Draw = Callable[[np.random.Generator, Sequence[Shape], Sequence[float], Mapping[str, Any]], List[np.ndarray]]
DefaultScales = Callable[[Sequence[Shape], Mapping[str, Any]], List[float]]


class Preset(NamedTuple):
    """One feedback distribution: how it draws, its default scale, the options it needs."""

    draw: Draw  # (rng, shapes, one scale per shape, options) -> float64 arrays, drawn in order
    default_scales: DefaultScales  # (shapes, options) -> the scale of each matrix when none is given
    options: Tuple[str, ...]  # keyword options it requires (names in OPTION_CHECKS); no others allowed
    any_shape: bool  # draws element-wise, so it can draw FA's kernels too (else DFA's 2-D B_l only)


# ---------------------------------------------------------------------------------------------
# The presets


def _each(draw_one: Callable[[np.random.Generator, Shape, float, Mapping[str, Any]], np.ndarray]) -> Draw:
    """A preset that draws its matrices one after another from the same generator."""

    def draw(rng, shapes, scales, options):
        return [draw_one(rng, shape, scale, options) for shape, scale in zip(shapes, scales)]

    draw.__doc__ = draw_one.__doc__
    return draw


def _constant(value: float) -> DefaultScales:
    return lambda shapes, options: [value] * len(shapes)


def _draw_normal(rng: np.random.Generator, shape: Shape, scale: float, options: Mapping[str, Any]) -> np.ndarray:
    """N(0, scale^2) element-wise; default scale 1.9, the report's B_l ~ N(0, 1.9^2)."""
    return rng.normal(0.0, scale, size=shape)


def _draw_uniform(rng: np.random.Generator, shape: Shape, scale: float, options: Mapping[str, Any]) -> np.ndarray:
    """U(-scale, scale) element-wise.

    Default scale 1/sqrt(n_l), n_l = the rows of B_l (the size of a_l): Nøkland (2016), "Direct
    Feedback Alignment Provides Learning in Deep Neural Networks", NeurIPS, draws the feedback
    weights uniformly, scaled by 1/sqrt(fan-out); ssdfa's ``FeedbackMatrix`` (Crafton et al.
    2019, github.com/bcrafton/ssdfa, lib/FeedbackMatrix.py) implements it as U(+-1/sqrt(n_l)),
    each error component fanning out to the n_l units of the hidden block.
    """
    return rng.uniform(-scale, scale, size=shape)


def _uniform_scales(shapes: Sequence[Shape], options: Mapping[str, Any]) -> List[float]:
    return [1.0 / math.sqrt(shape[0]) for shape in shapes]


def _draw_shared(
    rng: np.random.Generator, shapes: Sequence[Shape], scales: Sequence[float], options: Mapping[str, Any]
) -> List[np.ndarray]:
    """TinyDFA's one shared matrix: M ~ U[-1, 1) of shape (width, n_L), width = the widest
    hidden block; B_l = scale * M[:n_l] (its first n_l rows, copied).

    Launay et al. (2020), "Direct Feedback Alignment Scales to Modern Deep Learning Tasks and
    Architectures", NeurIPS; their TinyDFA (github.com/lightonai/dfa-scales-to-modern-deep-learning,
    TinyDFA/tinydfa/dfa.py) draws ``torch.rand(n_L, width) * 2 - 1`` once, projects the error
    through it and divides the projection by sqrt(width) (``normalization=True``), each feedback
    point reading the first n_l numbers. Here that 1/sqrt(width) is the default scale and is
    baked into the returned slices, so the DFA step (e B_l^T) stays unchanged.
    """
    if not shapes:
        return []
    width = max(shape[0] for shape in shapes)
    n_out = {shape[1] for shape in shapes}
    if len(n_out) != 1:
        raise ValueError(f"shared: every B_l must have the same n_L columns, got shapes {list(shapes)}")
    m = rng.uniform(-1.0, 1.0, size=(width, n_out.pop()))
    return [scale * m[: shape[0]] for shape, scale in zip(shapes, scales)]


def _shared_scales(shapes: Sequence[Shape], options: Mapping[str, Any]) -> List[float]:
    if not shapes:
        return []
    return [1.0 / math.sqrt(max(shape[0] for shape in shapes))] * len(shapes)


def _draw_sparse(rng: np.random.Generator, shape: Shape, scale: float, options: Mapping[str, Any]) -> np.ndarray:
    """k non-zeros per hidden unit, each U(-scale, scale); the k columns of each row chosen at random.

    As ssdfa (Crafton et al. 2019, "Direct Feedback Alignment With Sparse Connections for Local
    Learning", Frontiers in Neuroscience 13:525; lib/FeedbackMatrix.py): each of the n_l units of a
    hidden block receives exactly k of the n_L error components – k non-zeros per column of
    ssdfa's (n_L, n_l) matrix, that is per row of our B_l (n_l, n_L). Default scale ssdfa's
    bound (n_L k)^(1/4) / sqrt(n_l).
    """
    n, m = shape
    k = int(options["k"])
    if k > m:
        raise ValueError(f"sparse: k={k} non-zeros per row needs k <= n_L = {m} (a B of shape {shape})")
    columns = np.argsort(rng.random((n, m)), axis=1)[:, :k]  # a uniformly random k-subset per row
    out = np.zeros(shape)
    np.put_along_axis(out, columns, rng.uniform(-scale, scale, size=(n, k)), axis=1)
    return out


def _sparse_scales(shapes: Sequence[Shape], options: Mapping[str, Any]) -> List[float]:
    return [(shape[1] * int(options["k"])) ** 0.25 / math.sqrt(shape[0]) for shape in shapes]


def _draw_ternary(rng: np.random.Generator, shape: Shape, scale: float, options: Mapping[str, Any]) -> np.ndarray:
    """Values in {-scale, 0, +scale}: exactly max(1, round(density * size)) non-zeros at random
    places (round half up), each sign +-1 with probability 1/2; default scale 1.

    Issue 11's ternary feedback: a projection that hardware with ternary synapses (or a binary
    optical modulator, as LightOn's photonic DFA) can store exactly.
    """
    size = math.prod(shape)
    count = max(1, int(math.floor(float(options["density"]) * size + 0.5)))
    flat = np.zeros(size)
    flat[rng.permutation(size)[:count]] = 2.0 * rng.integers(0, 2, size=count) - 1.0
    return scale * flat.reshape(shape)


def _draw_lowrank(rng: np.random.Generator, shape: Shape, scale: float, options: Mapping[str, Any]) -> np.ndarray:
    """Rank r: B = scale * U V^T / sqrt(r), U (n_l, r) and V (n_L, r) standard normal.

    Each entry then has variance scale^2, so with the default scale 1.9 a low-rank B differs from
    the report's N(0, 1.9^2) one only in its rank (ssdfa's low-rank feedback, Crafton et al. 2019,
    also rescales its sum of rank-1 terms to a fixed entry std).
    """
    n, m = shape
    r = int(options["rank"])
    if r > min(n, m):
        raise ValueError(f"lowrank: rank={r} exceeds min(rows, columns) = {min(n, m)} for a B of shape {shape}")
    u, v = rng.normal(size=(n, r)), rng.normal(size=(m, r))
    return (scale / math.sqrt(r)) * (u @ v.T)


def _draw_orthogonal(rng: np.random.Generator, shape: Shape, scale: float, options: Mapping[str, Any]) -> np.ndarray:
    """scale * Q, Q with orthonormal columns (n_l >= n_L) or orthonormal rows (n_l < n_L).

    torch.nn.init.orthogonal_'s recipe (Saxe et al. 2014, "Exact solutions to the nonlinear
    dynamics of learning in deep linear neural networks", ICLR): the QR decomposition of a
    standard normal matrix, Q's columns multiplied by the signs of R's diagonal (so Q is
    Haar-distributed). Default scale 1 (torch's gain).
    """
    n, m = shape
    g = rng.normal(size=(n, m) if n >= m else (m, n))
    q, r = np.linalg.qr(g)
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    return scale * (q if n >= m else q.T)


def _two_dims_only(name: str, draw_one):
    def draw_checked(rng, shape, scale, options):
        if len(shape) != 2:
            raise ValueError(f"{name} draws 2-D matrices, got shape {shape}")
        return draw_one(rng, shape, scale, options)

    draw_checked.__doc__ = draw_one.__doc__
    return draw_checked


FEEDBACK_PRESETS: Dict[str, Preset] = {
    "normal": Preset(_each(_draw_normal), _constant(DEFAULT_FEEDBACK_SCALE), (), True),
    "uniform": Preset(_each(_draw_uniform), _uniform_scales, (), True),
    "shared": Preset(_draw_shared, _shared_scales, (), False),
    "sparse": Preset(_each(_two_dims_only("sparse", _draw_sparse)), _sparse_scales, ("k",), False),
    "ternary": Preset(_each(_draw_ternary), _constant(1.0), ("density",), True),
    "lowrank": Preset(
        _each(_two_dims_only("lowrank", _draw_lowrank)), _constant(DEFAULT_FEEDBACK_SCALE), ("rank",), False
    ),
    "orthogonal": Preset(_each(_two_dims_only("orthogonal", _draw_orthogonal)), _constant(1.0), (), False),
}
"""name -> Preset. The scale multiplies every preset (std for normal, half-width for uniform and
sparse, the value of the non-zeros for ternary, the norm of each column for orthogonal)."""

FEEDBACK_DISTS: Tuple[str, ...] = tuple(FEEDBACK_PRESETS)
"""The preset names, in the table's order."""


# ---------------------------------------------------------------------------------------------
# Checks


def check_options(dist: Optional[str], options: Mapping[str, Any]) -> Dict[str, Any]:
    """Checks the keyword options of ``dist`` (None: the rule's default preset, which takes none).

    Args:
      dist: a preset name (``FEEDBACK_DISTS``) or None.
      options: name -> value; a None value counts as not given.

    Returns:
      The options of ``dist`` as plain Python numbers (int k and rank, float density).

    Raises:
      ValueError: an option ``dist`` does not take, a missing one, or a bad value.
    """
    options = {name: value for name, value in options.items() if value is not None}  # None: not given
    takes = FEEDBACK_PRESETS[dist].options if dist is not None else ()
    unknown = sorted(set(options) - set(takes))
    if unknown:
        where = f"dist {dist!r}" if dist is not None else "the default dist (no dist= given)"
        users = {name: [d for d, p in FEEDBACK_PRESETS.items() if name in p.options] for name in unknown}
        raise ValueError(
            f"feedback option(s) {unknown} do not apply to {where}, which takes {list(takes) or 'none'}; "
            + "; ".join(f"{name!r} is an option of {users[name] or 'no preset'}" for name in unknown)
        )
    missing = [name for name in takes if options.get(name) is None]
    if missing:
        raise ValueError(
            f"dist {dist!r} needs the option(s) {missing}: "
            + ", ".join(f"{name}= ({OPTION_CHECKS[name][0]})" for name in missing)
        )
    out: Dict[str, Any] = {}
    for name in takes:
        what, ok = OPTION_CHECKS[name]
        value = options[name]
        if not ok(value) or (isinstance(value, numbers.Real) and not math.isfinite(value)):
            raise ValueError(f"{dist}: {name} must be {what}, got {value!r}")
        out[name] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return out


def rule_names(spec: NetSpec, method: Union[str, Sequence[str]]) -> Tuple[Tuple[str, ...], bool]:
    """(one rule per block, whether ``method`` was a sequence), after checking the names.

    Raises:
      ValueError: an unknown rule, or a sequence whose length is not the number of blocks.
    """
    if isinstance(method, str):
        if method not in FEEDBACK_RULES:
            raise ValueError(
                f"method must be one of {list(FEEDBACK_RULES)} or a sequence of them (one per block), got {method!r}"
            )
        return (method,) * spec.num_layers, False
    if not isinstance(method, (tuple, list)):
        raise ValueError(
            f"method must be one of {list(FEEDBACK_RULES)} or a sequence of them (one per block), "
            f"got {type(method).__name__} {method!r}"
        )
    if len(method) != spec.num_layers:
        raise ValueError(f"method: expected {spec.num_layers} rules (one per block), got {len(method)}: {list(method)}")
    for l, rule in enumerate(method, start=1):
        if not isinstance(rule, str) or rule not in FEEDBACK_RULES:
            raise ValueError(f"method: block {l}'s rule must be one of {list(FEEDBACK_RULES)}, got {rule!r}")
    return tuple(method), True


def _weight_shape(spec: NetSpec, rule: str, l: int) -> Shape:
    """The shape of W_{l+1} (hidden block l's feedback for fa/kp/frsf); l is 1-based."""
    if isinstance(spec, ModelSpec):
        above = spec.blocks[l].layer
        if not isinstance(above, (Dense, Conv2d)):
            raise ValueError(
                f"{rule} needs the block above to be Dense or Conv2d, block {l + 1} is a {type(above).__name__} "
                f"(block {l}'s feedback is shaped like block {l + 1}'s weight)"
            )
    return tuple(spec.param_shapes[l][0])


def feedback_layout(spec: NetSpec, method: Union[str, Sequence[str]]) -> Tuple[Tuple[Optional[str], Shape], ...]:
    """What ``init_feedback(spec, method=method)`` returns, entry by entry: (need, shape).

    One entry per hidden block l = 1..L-1, need one of ``RULE_NEEDS``' values: (size of a_l, n_L)
    for "projection", W_{l+1}'s shape for "weight" and "magnitude", and (0,) for None. A single
    rule that needs nothing (bp, usf, brsf, shallow) gives () instead.

    Raises:
      ValueError: an unknown rule, a wrong number of rules, or fa/kp/frsf below a block that is
        not a Dense or Conv2d.
    """
    rules, per_block = rule_names(spec, method)
    if not per_block and RULE_NEEDS[rules[0]] is None:
        return ()
    layout: List[Tuple[Optional[str], Shape]] = []
    for l, (rule, projection_shape) in enumerate(zip(rules, spec.feedback_shapes), start=1):
        need = RULE_NEEDS[rule]
        if need == "projection":
            layout.append((need, tuple(projection_shape)))
        elif need in ("weight", "magnitude"):
            layout.append((need, _weight_shape(spec, rule, l)))
        else:
            layout.append((None, (0,)))
    return tuple(layout)


# ---------------------------------------------------------------------------------------------
# Drawing


def draw_feedback(
    layout: Sequence[Tuple[Optional[str], Shape]],
    seed: int,
    dist: Optional[str],
    scale: Optional[float],
    options: Mapping[str, Any],
) -> List[np.ndarray]:
    """Draws the float64 arrays of ``layout`` (``feedback_layout``'s) from ``default_rng(seed)``.

    The DFA projections are drawn first, together, in block order (so ``method='dfa'`` draws
    exactly what it always did); then the FA-shaped matrices, in block order. ``dist`` None
    means ``normal`` for projections and ``uniform`` for FA shapes. ``scale`` None means each
    preset's default for projections, and torch's default weight bound 1/sqrt(fan_in) of W_{l+1}
    for FA shapes (fan_in = everything one output unit of W_{l+1} reads), so B starts with W's own
    distribution, U(+-1/sqrt(fan_in)) under the default dist. biotorch (Sanfiz & Akrout 2021,
    github.com/jsalbert/biotorch, layers/fa_constructor) likewise draws B with the
    initialiser of W (its ``xavier_uniform_`` for both); Lillicrap et al. (2016), "Random synaptic
    feedback weights support error backpropagation for deep learning", Nat. Commun. 7:13276,
    draw B uniformly with a scale set per task. "magnitude" entries are the absolute values of
    such a draw.

    Raises:
      ValueError: a preset that cannot draw FA shapes (only normal, uniform and ternary can),
        or a shape-dependent option out of range (k > n_L, rank > min(rows, columns)).
    """
    out: List[Optional[np.ndarray]] = [None] * len(layout)
    rng = np.random.default_rng(seed)
    for group in ("projection", "weight"):
        idx = [
            i for i, (need, _) in enumerate(layout) if (need == group or (group == "weight" and need == "magnitude"))
        ]
        if not idx:
            continue
        shapes = [layout[i][1] for i in idx]
        name = dist if dist is not None else ("normal" if group == "projection" else "uniform")
        preset = FEEDBACK_PRESETS[name]
        if group == "weight" and not preset.any_shape:
            usable = [d for d, p in FEEDBACK_PRESETS.items() if p.any_shape]
            raise ValueError(
                f"dist {name!r} draws DFA projections B_l (size of a_l, n_L) only; the FA-shaped feedback of "
                f"fa/kp/frsf (block {idx[0] + 1}, shaped like W_{idx[0] + 2} {shapes[0]}) needs one of {usable}"
            )
        if scale is not None:
            scales = [float(scale)] * len(shapes)
        elif group == "projection":
            scales = preset.default_scales(shapes, options)
        else:
            scales = [1.0 / math.sqrt(math.prod(shape[1:])) for shape in shapes]
        for i, drawn in zip(idx, preset.draw(rng, shapes, scales, options)):
            out[i] = np.abs(drawn) if layout[i][0] == "magnitude" else drawn
    return [np.zeros((0,)) if m is None else m for m in out]


__all__ = [
    "DEFAULT_FEEDBACK_SCALE",
    "FEEDBACK_DISTS",
    "FEEDBACK_PRESETS",
    "FEEDBACK_RULES",
    "OPTION_CHECKS",
    "Preset",
    "RULE_NEEDS",
    "check_options",
    "draw_feedback",
    "feedback_layout",
    "rule_names",
]
