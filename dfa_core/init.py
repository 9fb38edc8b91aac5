"""Seeded NumPy initialisation of parameters and feedback matrices.

Both backends start from these NumPy arrays (``backend.asarray``), so a seed gives
the same network on torch and on JAX.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np

from dfa_core.model import SPEC_TYPES, ModelSpec, NetSpec
from dfa_core.validation import dtype_name

PARAM_INITS = ("default", "zeros")
FEEDBACK_DISTS = ("normal", "uniform")
DEFAULT_FEEDBACK_SCALE = 1.9
"""The report draws B_l from N(0, 1.9^2)."""

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
    dist: str = "normal",
    scale: float = DEFAULT_FEEDBACK_SCALE,
    transform: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    matrices: Optional[Sequence[np.ndarray]] = None,
) -> Feedback:
    """Draws (or checks) the fixed random feedback matrices B_1..B_{L-1}.

    For a ModelSpec, n_l is the size of hidden block l's output a_l per sample (C * H * W
    for a conv block, its rows in (C, H, W) order); a Dense-only ModelSpec gets exactly the
    matrices of the equivalent MLPSpec.

    Args:
      spec: the network, an MLPSpec or a ModelSpec.
      seed: seed of a NumPy ``default_rng``; matrices are drawn in layer order.
      dist: ``"normal"`` draws N(0, scale^2) (the report's default, scale 1.9);
        ``"uniform"`` draws U(-scale, scale).
      scale: standard deviation (normal) or half-width (uniform), > 0.
      transform: optional function applied to each drawn float64 matrix (the report's
        ``matrix_transfo``); it must return an array of the same shape, all finite.
      matrices: user-supplied matrices instead of a draw, one per hidden layer, each
        of shape (n_l, n_L); they are copied, never modified. ``transform`` applies
        to them too.

    Returns:
      (B_1, ..., B_{L-1}), B_l of shape (n_l, n_L) and ``spec.dtype``; () for a network
      without hidden layers.

    Raises:
      ValueError: unknown ``dist``, non-positive ``scale``, wrong number or shape of
        ``matrices`` or of a transformed matrix, non-finite values.
      TypeError: bad ``spec``, ``seed``, ``transform``; ``matrices`` or a transformed matrix
        not real.
    """
    _check_spec(spec)
    seed = _check_seed(seed)
    if dist not in FEEDBACK_DISTS:
        raise ValueError(f"dist must be one of {list(FEEDBACK_DISTS)}, got {dist!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
    shapes = spec.feedback_shapes
    if matrices is not None:
        matrices = tuple(matrices)
        if len(matrices) != len(shapes):
            raise ValueError(
                f"matrices: expected {len(shapes)} feedback matrices (one per hidden layer, "
                f"shapes {list(shapes)}), got {len(matrices)}"
            )
        drawn = []
        for l, (m, shape) in enumerate(zip(matrices, shapes), start=1):
            _check_real(f"matrices: B_{l}", m)
            m = np.array(m, dtype=np.float64, copy=True)
            if m.shape != shape:
                raise ValueError(f"matrices: B_{l} must have shape {shape}, got {m.shape}")
            drawn.append(m)
    else:
        rng = np.random.default_rng(seed)
        if dist == "normal":
            drawn = [rng.normal(0.0, scale, size=shape) for shape in shapes]
        else:
            drawn = [rng.uniform(-scale, scale, size=shape) for shape in shapes]
    out = []
    for l, (m, shape) in enumerate(zip(drawn, shapes), start=1):
        if transform is not None:
            m = transform(m)
            _check_real(f"transform's result for B_{l}", m)
            m = np.asarray(m, dtype=np.float64)
            if m.shape != shape:
                raise ValueError(f"transform returned shape {m.shape} for B_{l}, expected {shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError(f"B_{l} has non-finite values")
        out.append(m.astype(spec.dtype))
    return tuple(out)
