"""DFA and BP gradients (JAX): grouping, feedback projection, layer gradients, checked entry points.

The pure building blocks (``group``, ``feedback_projection``, ``dfa_layer_grads``)
take JAX arrays and can be composed under ``jax.jit``. ``dfa_grads`` and
``bp_grads`` validate their arguments in Python, then run one function jitted once
per (spec, mode).
"""

from __future__ import annotations

import collections
import functools
import itertools
from typing import Any, Callable, NamedTuple, Optional, Tuple, cast

import jax
import jax.numpy as jnp

from dfa_core import hardware, validation
from dfa_core.backend import ArrayLike, FeedbackLike, ParamsLike
from dfa_core.hardware import Projection
from dfa_core.model import ModelSpec
from dfa_core.spec import MLPSpec
from dfa_jax import blocks, nn
from dfa_jax.arrays import as_input, precision_scope
from dfa_jax.blocks import _class_grouping, _grouping
from dfa_jax.mlp import Activations, Params
from dfa_jax.mlp import _loss as loss
from dfa_jax.nn import reduce_loss

Array = jax.Array
Grads = Tuple[Tuple[Array, ...], ...]  # per block: (gW, gb), or a composite's flat leaves
Feedback = Tuple[Array, ...]  # (B_1, ..., B_{L-1}), B_l (n_l, n_L)

TRACE_COUNTS: collections.Counter[str] = collections.Counter()
"""How many times each jitted entry point was traced (compiled); tests read it."""


class Grouped(NamedTuple):
    """Activations and error after the batch is grouped into K rows (see ``group``)."""

    a: Tuple[Array, ...]  # hidden pre-activations a'_1..a'_{L-1}, each (K, n_l)
    f_a: Tuple[Array, ...]  # f(a'_l) for the hidden layers, each (K, n_l)
    h: Tuple[Array, ...]  # post-activations h'_0..h'_{L-1}, each (K, n_l)
    e: Array  # error e' = G y_hat - G y, (K, n_L)
    count: Array  # type: ignore[assignment]  # K, non-empty groups, (); shadows tuple.count


def group(spec: MLPSpec, acts: Activations, y: Array, mode: str) -> Grouped:
    """Groups a batch as the report's three training loops do.

    ``sample``: G = identity (K = batch). ``batch_mean``: one row of 1/batch (K = 1).
    ``class_mean``: one row per class present in y, averaging that class's samples.
    a and h are averaged separately, so f' is later evaluated at the averaged a.

    Args:
      spec: the network.
      acts: ``forward_with_activations`` of the batch.
      y: targets, (batch, n_L); one-hot for ``class_mean``.
      mode: one of dfa_core.MODES.

    Returns:
      Grouped(a, f_a, h, e, count).
    """
    f = nn.activation(spec.activation).fn
    hidden_a = acts.a[:-1]
    if mode == "sample":
        count = jnp.asarray(y.shape[0], dtype=y.dtype)
        return Grouped(hidden_a, acts.h[1:], acts.h, acts.y_hat - y, count)
    if mode == "batch_mean":
        avg = lambda t: jnp.mean(t, axis=0, keepdims=True)
        count = jnp.asarray(1, dtype=y.dtype)
    elif mode == "class_mean":
        g_CxB = _class_grouping(y)
        avg = lambda t: g_CxB @ t
        count = jnp.sum(jnp.any(g_CxB > 0, axis=1)).astype(y.dtype)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    a = tuple(avg(t) for t in hidden_a)
    return Grouped(a, tuple(f(t) for t in a), tuple(avg(t) for t in acts.h), avg(acts.y_hat) - avg(y), count)


def feedback_projection(spec: MLPSpec, feedback: Feedback, e: Array) -> Tuple[Array, ...]:
    """e B_l^T for every hidden layer, as one matmul against [B_1; ...; B_{L-1}].

    Args:
      spec: the network.
      feedback: (B_1, ..., B_{L-1}), B_l: (n_l, n_L).
      e: error, (K, n_L).

    Returns:
      (e B_1^T, ..., e B_{L-1}^T), each (K, n_l); () without hidden layers.
    """
    if not feedback:
        return ()
    if len(feedback) == 1:
        return (e @ feedback[0].T,)
    b_HxO = jnp.concatenate(feedback, axis=0)  # H = n_1 + ... + n_{L-1}
    p_KxH = e @ b_HxO.T
    splits = list(itertools.accumulate(spec.hidden_sizes))[:-1]
    return tuple(jnp.split(p_KxH, splits, axis=1))


def dfa_layer_grads(spec: MLPSpec, grouped: Grouped, projections: Tuple[Array, ...]) -> Grads:
    """DFA gradients of every layer from grouped activations and projected errors.

    delta_l = (e' B_l^T) * f'(a'_l); gW_l = delta_l^T h'_{l-1}; gb_l = sum_rows delta_l.
    Output layer: gW_L = e'^T h'_{L-1}; gb_L = sum_rows e'. Reduction 'mean' divides by K.

    Returns:
      ((gW_1, gb_1), ..., (gW_L, gb_L)), shaped like params.
    """
    df = nn.activation(spec.activation).derivative
    scale = 1 / grouped.count if spec.reduction == "mean" else None
    deltas = [p * df(a, fa) for p, a, fa in zip(projections, grouped.a, grouped.f_a)]
    deltas.append(grouped.e)
    grads = []
    for delta_KxO, h_KxI in zip(deltas, grouped.h):
        if scale is not None:
            delta_KxO = delta_KxO * scale
        grads.append((delta_KxO.T @ h_KxI, jnp.sum(delta_KxO, axis=0)))
    return tuple(grads)


PROJECT_PER_LAYER_ELEMENTS = 1 << 18
"""Above this many elements (K x (n_1 + ... + n_{L-1})) the fused DFA step projects the
error layer by layer, so only one layer's projection is alive at a time; below it, one
product against the concatenated feedback is faster (fewer, larger kernels)."""


def _projector(spec: MLPSpec, feedback: Feedback, e: Array) -> Callable[[int], Array]:
    """l -> e B_l^T: from one ``feedback_projection`` when small, else computed on demand."""
    if e.shape[0] * sum(spec.hidden_sizes) <= PROJECT_PER_LAYER_ELEMENTS:
        return feedback_projection(spec, feedback, e).__getitem__
    return lambda l: e @ feedback[l].T


def dfa_grads_and_loss(
    spec: MLPSpec,
    params: Params,
    feedback: Feedback,
    x: Array,
    y: Array,
    mode: str,
    projection: Optional[Projection] = None,
    noise: Optional[Tuple[Array, ...]] = None,
    key: Optional[Any] = None,
) -> Tuple[Grads, Array]:
    """DFA gradients and the batch loss in one memory-lean pass (the training fast path).

    Computes exactly what ``group`` + ``feedback_projection`` + ``dfa_layer_grads``
    compute, while keeping only what the update needs: h_0..h_{L-1} in 'sample' mode
    (f' is read off h = f(a), which determines it for every activation offered), or
    only the grouped a' and h' (K rows) in the averaged modes. 'mean' scales e' by 1/K.

    Args:
      spec, params, feedback, x, y, mode: as ``dfa_grads``, as JAX arrays of spec.dtype.
      projection: hardware effects on the projections e' B_l^T (dfa_core.hardware.Projection:
        quantised error, noise, a plug-in device); None, or an identity Projection: exact.
      noise: the projection noise's standard-normal draws z_l, one (K, n_l) array per hidden
        layer (K: batch, 1 or n_L by mode); the same draws give the same grads on both backends.
      key: a JAX PRNG key (``jax.random.key(seed)``) to draw z_l inside the step instead, by
        ``jax.random.split(key, L - 1)``; pass a new key every step (``jax.random.fold_in``).

    Returns:
      (((gW_1, gb_1), ..., (gW_L, gb_L)), loss ()).

    Raises:
      ValueError: noise and key both given, or given without projection noise, or neither with it.
    """
    if isinstance(spec, ModelSpec):  # decided while tracing: the MLP program is unchanged
        return blocks.dfa_grads_and_loss(spec, params, feedback, x, y, mode, projection, noise, key)
    hw = hardware.active(projection)
    hardware.check_noise_source(hw, noise, key)
    act = nn.activation(spec.activation)
    avg, count = _grouping(mode, y)
    keep = (lambda t: t) if avg is None else avg
    a: Optional[Array]  # set to None to free memory as soon as an array is not needed
    h: Optional[Array]
    kept_h: list[Any]  # h'_{l-1} per layer; each slot is set to None once its update is formed
    kept_a: list[Any]
    h, kept_h, kept_a = x, [], []
    for w, b in params[:-1]:
        kept_h.append(keep(h))
        a = h @ w.T + b[None, :]
        h = act.fn(a)
        kept_a.append(h if avg is None else avg(a))
        a = None  # free a_l before a_{l+1} is allocated
    h_last = keep(h)
    z = h @ params[-1][0].T + params[-1][1][None, :]
    a = h = None  # the full-batch activations are no longer needed (a no-op under jit)
    batch_loss = reduce_loss(spec, z, y)
    y_hat = nn.output_function(spec.output)(z)
    e_raw = y_hat - y if avg is None else avg(y_hat) - avg(y)
    e = e_raw / count if spec.reduction == "mean" else e_raw
    # Top layer first, as backprop does, so each layer's activations are released as
    # soon as its update is formed (h_{L-1} first) and peak memory stays near BP's.
    grads = [(e.T @ h_last, jnp.sum(e, axis=0))]
    h_last = None
    if hw is None:
        project = _projector(spec, feedback, e)
    else:  # hardware effects act on the unscaled e' (dfa_core.hardware); 1/K comes after
        scale_by = count if spec.reduction == "mean" else None
        present = blocks.present_rows(mode, y)
        project = blocks.hardware_projections(hw, feedback, e_raw, scale_by, present, noise, key).__getitem__
    for l in reversed(range(spec.num_hidden)):
        p = project(l)
        a_l, h_in = kept_a[l], kept_h[l]
        kept_a[l] = kept_h[l] = None
        fa = a_l if avg is None else act.fn(a_l)  # in 'sample' mode a_l holds h, which stands in for a in f'
        delta = act.backward(p, a_l, fa)
        grads.append((delta.T @ h_in, jnp.sum(delta, axis=0)))
    grads.reverse()
    return tuple(grads), batch_loss


def _dfa_grads(
    spec: MLPSpec,
    params: Params,
    feedback: Feedback,
    x: Array,
    y: Array,
    mode: str,
    projection: Optional[Projection] = None,
    noise: Optional[Tuple[Array, ...]] = None,
    key: Optional[Any] = None,
) -> Grads:
    TRACE_COUNTS["dfa_grads"] += 1
    return dfa_grads_and_loss(spec, params, feedback, x, y, mode, projection, noise, key)[0]


def bp_grads_and_loss(spec: MLPSpec, params: Params, x: Array, y: Array) -> Tuple[Grads, Array]:
    """Backprop gradients and the batch loss, by reverse-mode autodiff (jax.value_and_grad).

    Returns:
      (((gW_1, gb_1), ..., (gW_L, gb_L)), loss ()).
    """
    if isinstance(spec, ModelSpec):
        return blocks.bp_grads_and_loss(spec, params, x, y)
    batch_loss, grads = jax.value_and_grad(loss, argnums=1)(spec, params, x, y)
    return grads, batch_loss


def _bp_grads(spec: MLPSpec, params: Params, x: Array, y: Array) -> Grads:
    TRACE_COUNTS["bp_grads"] += 1
    return bp_grads_and_loss(spec, params, x, y)[0]


dfa_grads_unchecked = jax.jit(_dfa_grads, static_argnames=("spec", "mode", "projection"))
"""``dfa_grads`` on JAX arrays of spec.dtype, without validation (the fast path); jitted per
(spec, mode, projection); projection, noise and key as in ``dfa_grads_and_loss``."""
bp_grads_unchecked = jax.jit(_bp_grads, static_argnames=("spec",))
"""``bp_grads`` on JAX arrays of spec.dtype, without validation (the fast path); jitted."""


@functools.lru_cache(maxsize=None)
def _value_flags_fn(needs_one_hot: bool) -> Callable[[Array, Array], Tuple[Array, Array, Array]]:
    def flags(x, y):
        x_ok = jnp.all(jnp.isfinite(x))
        y_ok = jnp.all(jnp.isfinite(y))
        if not needs_one_hot:
            return x_ok, y_ok, jnp.asarray(True)
        binary = jnp.all((y == 0) | (y == 1))
        return x_ok, y_ok, binary & jnp.all(jnp.sum(y, axis=1) == 1)

    return jax.jit(flags)


def prepare(
    spec: MLPSpec,
    params: ParamsLike,
    feedback: Optional[FeedbackLike],
    x: ArrayLike,
    y: ArrayLike,
    mode: str = "sample",
    check_values: bool = True,
) -> Tuple[Params, Optional[Feedback], Array, Array]:
    """Validates a call and converts its arrays; must be called inside precision_scope(spec.dtype)."""
    validation.check_spec(spec)
    validation.check_mode(mode)
    validation.check_params(spec, params)
    if feedback is not None:
        validation.check_feedback(spec, feedback)
    validation.check_batch(spec, x, y)
    x, y = as_input(x, spec.dtype), as_input(y, spec.dtype)
    if check_values:
        x_ok, y_ok, one_hot = (bool(f) for f in _value_flags_fn(validation.needs_one_hot(mode))(x, y))
        validation.raise_for_values(x_ok, y_ok, one_hot, mode=mode)
    params_j = tuple(tuple(as_input(t, spec.dtype) for t in block) for block in params)
    feedback_j = None if feedback is None else tuple(as_input(b, spec.dtype) for b in feedback)
    if check_values:  # the checked entry points reject non-finite params and feedback too
        for name, arr in validation.named_leaves(params_j, feedback_j):
            validation.raise_for_nonfinite(name, bool(jnp.all(jnp.isfinite(arr))))
    return params_j, feedback_j, x, y


def _check_key(key: Any) -> None:
    """A JAX PRNG key: typed (jax.random.key) or a raw uint32 (2,) one (jax.random.PRNGKey); else TypeError."""
    typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)
    if not (typed or raw):
        raise TypeError(f"key must be a JAX PRNG key (jax.random.key(seed)), got {type(key).__name__}")


def dfa_grads(
    spec: MLPSpec,
    params: ParamsLike,
    feedback: FeedbackLike,
    x: ArrayLike,
    y: ArrayLike,
    mode: str = "sample",
    check_values: bool = True,
    projection: Optional[Projection] = None,
    noise: Optional[Any] = None,
    key: Optional[Any] = None,
) -> Grads:
    """DFA gradients of the loss for one batch (signs as gradients: SGD does W -= lr * g).

    Args:
      spec: the network.
      params: ((W_l, b_l), ...) NumPy or JAX arrays of spec.dtype, W_l: (n_l, n_{l-1}).
      feedback: (B_1, ..., B_{L-1}), B_l: (n_l, n_L), spec.dtype.
      x: inputs, (batch, n_0), any real dtype (cast to spec.dtype).
      y: targets, (batch, n_L); one-hot rows for mode 'class_mean'.
      mode: 'sample', 'batch_mean' or 'class_mean'.
      check_values: reject non-finite x or y (and non-one-hot y for 'class_mean');
        costs one reduction over the batch.
      projection: hardware effects on e' B_l^T (dfa_core.hardware.Projection); None: exact DFA.
      noise: explicit standard-normal draws for the projection noise, one array per hidden
        block shaped like its projection (K, size_l) (``dfa_core.hardware.projection_shapes``).
      key: instead of noise, a JAX PRNG key (``jax.random.key(seed)``) to draw it in the step.

    Returns:
      ((gW_1, gb_1), ..., (gW_L, gb_L)) JAX arrays shaped like params.

    Raises:
      ValueError, TypeError: bad spec, mode, shapes, dtypes, values, projection, noise or key,
        before any tracing.
    """
    with precision_scope(getattr(spec, "dtype", "float32")):
        validation.check_spec(spec)
        validation.check_feedback(spec, feedback)  # None is not "no feedback" for DFA
        hw = hardware.active(projection)
        hardware.check_noise_source(hw, noise, key)
        params_j, feedback_j, x, y = prepare(spec, params, feedback, x, y, mode, check_values)
        noise_j = None
        if noise is not None:
            hardware.check_noise(spec, noise, x.shape[0], mode)
            noise_j = tuple(as_input(z, spec.dtype) for z in noise)
        if key is not None:
            _check_key(key)
        # check_feedback refused None above, so prepare returned the feedback as JAX arrays.
        unchecked = blocks.dfa_grads_unchecked if isinstance(spec, ModelSpec) else dfa_grads_unchecked
        if hw is None:  # today's call, so today's compiled program
            return unchecked(spec, params_j, cast(Feedback, feedback_j), x, y, mode)
        return unchecked(spec, params_j, cast(Feedback, feedback_j), x, y, mode, hw, noise_j, key)


def bp_grads(spec: MLPSpec, params: ParamsLike, x: ArrayLike, y: ArrayLike, check_values: bool = True) -> Grads:
    """Backprop gradients of the same loss (jax.grad), shaped like params; see ``dfa_grads``."""
    with precision_scope(getattr(spec, "dtype", "float32")):
        params_j, _, x, y = prepare(spec, params, None, x, y, "sample", check_values)
        unchecked = blocks.bp_grads_unchecked if isinstance(spec, ModelSpec) else bp_grads_unchecked
        return unchecked(spec, params_j, x, y)
