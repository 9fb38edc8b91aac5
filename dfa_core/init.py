"""Seeded NumPy initialisation of parameters and feedback matrices.

Both backends start from these NumPy arrays (``backend.asarray``), so a seed gives
the same network on torch and on JAX.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import numpy as np

from dfa_core import feedback
from dfa_core.feedback import DEFAULT_FEEDBACK_SCALE, FEEDBACK_DISTS
from dfa_core.model import SPEC_TYPES, ModelSpec, NetSpec
from dfa_core.validation import dtype_name

PARAM_INITS = ("default", "zeros")

Params = Tuple[Tuple[np.ndarray, ...], ...]  # per block: (W, b), or a composite's flat leaves
Feedback = Tuple[np.ndarray, ...]


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_spec(spec) -> None:
    if not isinstance(spec, SPEC_TYPES):
        raise TypeError(f"spec must be a dfa_core.MLPSpec or dfa_core.ModelSpec, got {type(spec).__name__}")


def init_params(spec: NetSpec, seed: int = 0, init: str = "default") -> Params:
    """Draws the weights and biases of every layer (every block of a ModelSpec).

    Args:
      spec: the network, an MLPSpec or a ModelSpec.
      seed: seed of a NumPy ``default_rng``; layers are drawn in order W_1, b_1, W_2, ...
        (a composite block's inner layers in their params order, see ``Block.param_inits``)
      init: ``"default"`` draws W_l and b_l from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the
        distribution of torch.nn.Linear's and torch.nn.Conv2d's default initialisation, with
        fan_in = n_{l-1} for a dense layer and C_in * k * k for a conv;
        ``"zeros"`` sets everything to 0 (DFA can still learn from zero weights).

    Returns:
      ((W_1, b_1), ..., (W_L, b_L)), all of ``spec.dtype``: W_l of shape (n_l, n_{l-1}) and
      b_l of shape (n_l,) for a dense layer, W_l (C_out, C_in, k, k) and b_l (C_out,) for a
      conv; a composite block's flat tuple (W_1, b_1, W_2, b_2, ...), each inner layer drawn
      with torch's default for its type (``Block.param_shapes``). A Dense-only ModelSpec gets
      exactly the arrays of the equivalent MLPSpec.

    Raises:
      ValueError: unknown ``init``.
      TypeError: ``spec`` is not an MLPSpec/ModelSpec or ``seed`` is not a non-negative int.
    """
    _check_spec(spec)
    seed = _check_seed(seed)
    if init not in PARAM_INITS:
        raise ValueError(f"init must be one of {list(PARAM_INITS)}, got {init!r}")
    rng = np.random.default_rng(seed)
    params = []
    for l, (shapes, inits) in enumerate(_param_plan(spec)):
        if inits and inits[0] == "user":  # a UserBlock draws its own, from a seed drawn here
            block = spec.blocks[l]  # type: ignore[union-attr]
            sub_seed = int(rng.integers(2**31))
            drawn = [np.asarray(t, np.float64) for t in block.layer.init(block.u_shape, sub_seed)]  # type: ignore[union-attr]
            if init == "zeros":
                drawn = [np.zeros_like(t) for t in drawn]
            params.append(tuple(t.astype(spec.dtype) for t in drawn))
            continue
        leaves = []
        for shape, how in zip(shapes, inits):
            if init == "zeros" or how == "zeros":
                leaf = np.zeros(shape)
            elif how == "ones":
                leaf = np.ones(shape)
            else:
                bound = float(how)
                leaf = rng.uniform(-bound, bound, size=shape)
            leaves.append(leaf.astype(spec.dtype))
        params.append(tuple(leaves))
    return tuple(params)


def _param_plan(spec: NetSpec) -> Sequence[Tuple[Tuple[Tuple[int, ...], ...], Tuple[Union[float, str], ...]]]:
    """(shapes, inits) per block: a float c draws U(-c, c); c = 1/sqrt(fan_in), fan_in = everything
    one output unit reads (in, or C_in * k * k for a conv), for W and b alike; 'ones'/'zeros' set
    the leaf; 'user' leaves come from the UserBlock's own init."""
    if isinstance(spec, ModelSpec):
        return [(block.param_shapes, block.param_inits) for block in spec.blocks]
    plan = []
    for w_shape, b_shape in spec.param_shapes:
        bound = 1.0 / np.sqrt(math.prod(w_shape[1:]))
        plan.append(((w_shape, b_shape), (bound, bound)))
    return plan


def _check_real(what: str, m) -> None:
    """Casting a complex matrix to float would silently drop its imaginary part."""
    name = dtype_name(m) if hasattr(m, "dtype") else np.asarray(m).dtype.name
    if name.startswith("complex") or name in ("object", "str", "bytes") or name.startswith(("<U", "<S")):
        raise TypeError(f"{what} must hold real numbers, got dtype {name}")


def init_feedback(
    spec: NetSpec,
    seed: int = 1,
    dist: Optional[str] = None,
    scale: Optional[float] = None,
    transform: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    matrices: Optional[Sequence[np.ndarray]] = None,
    method: Union[str, Sequence[str]] = "dfa",
    **options: Any,
) -> Feedback:
    """Draws (or checks) the fixed random feedback that the learning rule ``method`` reads.

    For ``method='dfa'`` (the default) these are B_1..B_{L-1}: for a ModelSpec, n_l is the size
    of hidden block l's output a_l per sample (C * H * W for a conv block, its rows in (C, H, W)
    order); a Dense-only ModelSpec gets exactly the matrices of the equivalent MLPSpec. The
    presets and rules live in ``dfa_core.feedback`` (each preset's docstring cites its source).

    Args:
      spec: the network, an MLPSpec or a ModelSpec.
      seed: seed of a NumPy ``default_rng``; matrices are drawn in block order (DFA projections
        first, then FA-shaped matrices, see ``dfa_core.feedback.draw_feedback``).
      dist: a preset of ``FEEDBACK_DISTS``: ``"normal"`` N(0, scale^2); ``"uniform"``
        U(-scale, scale); ``"shared"`` TinyDFA's one U[-1, 1) matrix of the widest hidden block,
        sliced per block (B_l = scale * M[:n_l]); ``"sparse"`` k non-zeros per row of B_l, as
        ssdfa (needs ``k=``); ``"ternary"`` {-scale, 0, +scale} at a density (needs
        ``density=``); ``"lowrank"`` scale * U V^T / sqrt(r) (needs ``rank=``); ``"orthogonal"``
        scale * (orthonormal columns). None: ``"normal"`` for DFA projections, ``"uniform"``
        for the FA-shaped feedback of fa/kp/frsf.
      scale: > 0, multiplies the preset (std of normal, half-width of uniform...). None: the
        preset's default – normal 1.9 (the report's), uniform 1/sqrt(n_l) (Nøkland 2016),
        shared 1/sqrt(width) (TinyDFA), sparse (n_L k)^(1/4) / sqrt(n_l) (ssdfa), ternary 1,
        lowrank 1.9, orthogonal 1 – and torch's default weight bound 1/sqrt(fan_in of W_{l+1})
        for the feedback of fa/kp/frsf.
      transform: optional function applied to each drawn float64 matrix (the report's
        ``matrix_transfo``); it must return an array of the same shape, all finite.
      matrices: user-supplied arrays instead of a draw, one per entry of the result, each of
        the entry's shape (for DFA: B_l of shape (n_l, n_L), one per hidden layer); they are
        copied, never modified. ``transform`` applies to them too.
      method: the learning rule (``dfa_core.feedback.FEEDBACK_RULES``), or a sequence of L rules,
        one per block (the last block's rule needs no feedback and is only checked).
      **options: the preset's options: ``k`` (sparse, int in [1, n_L]), ``density`` (ternary,
        in (0, 1]), ``rank`` (lowrank, int in [1, min(n_l, n_L)]); a None value counts as
        not given.

    Returns:
      One entry per hidden block l = 1..L-1, all of ``spec.dtype``:
      - "dfa", "drtp": B_l of shape (size of a_l, n_L);
      - "fa", "kp": a random matrix shaped like W_{l+1}, the weight of the block above (a random
        kernel (C_out, C_in, k, k) for a Conv2d block);
      - "frsf": its absolute value |R|, the fixed random magnitudes of sign-symmetry;
      - "bp", "usf", "brsf", "shallow": nothing: the result is ();
      - a sequence of rules: entry l is what block l's rule needs, ``np.zeros((0,))`` where it
        needs nothing.
      () for a network without hidden layers.

    Raises:
      ValueError: unknown ``dist`` or rule, non-positive ``scale``, bad, missing or unused
        options, fa/kp/frsf below a block that is not a Dense or Conv2d, a preset that cannot
        draw fa's shapes, wrong number or shape of ``matrices`` or of a transformed matrix,
        non-finite values, negative frsf magnitudes among ``matrices``.
      TypeError: bad ``spec``, ``seed``, ``transform``; ``matrices`` or a transformed matrix
        not real.
    """
    _check_spec(spec)
    seed = _check_seed(seed)
    if dist is not None and dist not in FEEDBACK_DISTS:
        raise ValueError(f"dist must be one of {list(FEEDBACK_DISTS)} or None, got {dist!r}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not np.isfinite(scale) or scale <= 0
    ):
        raise ValueError(f"scale must be a finite number > 0 or None, got {scale!r}")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
    options = feedback.check_options(dist, options)
    layout = feedback.feedback_layout(spec, method)
    names = _entry_names(layout)
    if matrices is not None:
        drawn = _checked_matrices(matrices, layout, names)
    else:
        drawn = feedback.draw_feedback(layout, seed, dist, scale, options)
    out = []
    for (need, shape), name, m in zip(layout, names, drawn):
        if need is not None and transform is not None:
            m = transform(m)
            _check_real(f"transform's result for {name}", m)
            m = np.asarray(m, dtype=np.float64)
            if m.shape != shape:
                raise ValueError(f"transform returned shape {m.shape} for {name}, expected {shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError(f"{name} has non-finite values")
        out.append(m.astype(spec.dtype))
    return tuple(out)


def _entry_names(layout) -> Tuple[str, ...]:
    """Names for messages: B_l for a DFA projection, "block l's feedback" otherwise."""
    return tuple(
        f"B_{l}" if need == "projection" else f"block {l}'s feedback" for l, (need, _) in enumerate(layout, start=1)
    )


def _checked_matrices(matrices, layout, names) -> Sequence[np.ndarray]:
    """The user's arrays as float64 copies, checked against ``layout``'s shapes."""
    matrices = tuple(matrices)
    shapes = [shape for _, shape in layout]
    if len(matrices) != len(layout):
        raise ValueError(
            f"matrices: expected {len(layout)} feedback matrices (one per hidden layer, "
            f"shapes {shapes}), got {len(matrices)}"
        )
    out = []
    for (need, shape), name, m in zip(layout, names, matrices):
        _check_real(f"matrices: {name}", m)
        m = np.array(m, dtype=np.float64, copy=True)
        if m.shape != shape:
            raise ValueError(f"matrices: {name} must have shape {shape}, got {m.shape}")
        if need == "magnitude" and np.any(m < 0):
            raise ValueError(f"matrices: {name} holds frsf's magnitudes |R|, which must be >= 0; got negative values")
        out.append(m)
    return out


__all__ = ["DEFAULT_FEEDBACK_SCALE", "FEEDBACK_DISTS", "PARAM_INITS", "init_feedback", "init_params"]
