"""DFA and BP gradients (torch): grouping, feedback projection, layer gradients, checked entry points.

The pure building blocks (``group``, ``feedback_projection``, ``dfa_layer_grads``)
take tensors and build no autograd graph. ``dfa_grads`` and ``bp_grads`` validate
their arguments in Python first; DFA runs under ``torch.no_grad`` and BP uses
reverse-mode autodiff (``torch.autograd.grad``).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, NamedTuple, Optional, Tuple, cast

import torch

from dfa_core import hardware, validation
from dfa_core.backend import ArrayLike, FeedbackLike, ParamsLike
from dfa_core.hardware import Projection
from dfa_core.model import ModelSpec
from dfa_core.spec import MLPSpec
from dfa_torch import blocks, nn
from dfa_torch.arrays import as_input, precision_scope
from dfa_torch.blocks import _class_grouping, _grouping
from dfa_torch.mlp import Activations, Params
from dfa_torch.mlp import _loss as loss
from dfa_torch.nn import reduce_loss

Tensor = torch.Tensor
Grads = Tuple[Tuple[Tensor, ...], ...]  # per block: (gW, gb), or a composite's flat leaves
Feedback = Tuple[Tensor, ...]  # (B_1, ..., B_{L-1}), B_l (n_l, n_L)

TRACE_COUNTS: collections.Counter[str] = collections.Counter()
"""Kept for symmetry with dfa_jax (torch eager code is never traced)."""


class Grouped(NamedTuple):
    """Activations and error after the batch is grouped into K rows (see ``group``)."""

    a: Tuple[Tensor, ...]  # hidden pre-activations a'_1..a'_{L-1}, each (K, n_l)
    f_a: Tuple[Tensor, ...]  # f(a'_l) for the hidden layers, each (K, n_l)
    h: Tuple[Tensor, ...]  # post-activations h'_0..h'_{L-1}, each (K, n_l)
    e: Tensor  # error e' = G y_hat - G y, (K, n_L)
    count: Tensor  # type: ignore[assignment]  # K, non-empty groups, (); shadows tuple.count


def group(spec: MLPSpec, acts: Activations, y: Tensor, mode: str) -> Grouped:
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
        count = torch.tensor(y.shape[0], dtype=y.dtype, device=y.device)
        return Grouped(hidden_a, acts.h[1:], acts.h, acts.y_hat - y, count)
    if mode == "batch_mean":
        avg = lambda t: torch.mean(t, dim=0, keepdim=True)
        count = torch.tensor(1, dtype=y.dtype, device=y.device)
    elif mode == "class_mean":
        g_CxB = _class_grouping(y)
        avg = lambda t: g_CxB @ t
        count = torch.sum(torch.any(g_CxB > 0, dim=1)).to(y.dtype)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    a = tuple(avg(t) for t in hidden_a)
    return Grouped(a, tuple(f(t) for t in a), tuple(avg(t) for t in acts.h), avg(acts.y_hat) - avg(y), count)


def feedback_projection(spec: MLPSpec, feedback: Feedback, e: Tensor) -> Tuple[Tensor, ...]:
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
    b_HxO = torch.cat(tuple(feedback), dim=0)  # H = n_1 + ... + n_{L-1}
    p_KxH = e @ b_HxO.T
    return tuple(torch.split(p_KxH, list(spec.hidden_sizes), dim=1))


def dfa_layer_grads(spec: MLPSpec, grouped: Grouped, projections: Tuple[Tensor, ...]) -> Grads:
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
        grads.append((delta_KxO.T @ h_KxI, torch.sum(delta_KxO, dim=0)))
    return tuple(grads)


PROJECT_PER_LAYER_ELEMENTS = 1 << 18
"""Above this many elements (K x (n_1 + ... + n_{L-1})) the fused DFA step projects the
error layer by layer, so only one layer's projection is alive at a time; below it, one
product against the concatenated feedback is faster (fewer, larger kernels)."""


def _projector(spec: MLPSpec, feedback: Feedback, e: Tensor) -> Callable[[int], Tensor]:
    """l -> e B_l^T: from one ``feedback_projection`` when small, else computed on demand."""
    if e.shape[0] * sum(spec.hidden_sizes) <= PROJECT_PER_LAYER_ELEMENTS:
        return feedback_projection(spec, feedback, e).__getitem__
    return lambda l: e @ feedback[l].T


@torch.no_grad()
def dfa_grads_and_loss(
    spec: MLPSpec,
    params: Params,
    feedback: Feedback,
    x: Tensor,
    y: Tensor,
    mode: str,
    projection: Optional[Projection] = None,
    noise: Optional[Tuple[Tensor, ...]] = None,
    key: Optional[Any] = None,
) -> Tuple[Grads, Tensor]:
    """DFA gradients and the batch loss in one memory-lean pass (the training fast path).

    Computes exactly what ``group`` + ``feedback_projection`` + ``dfa_layer_grads``
    compute, while keeping only what the update needs: h_0..h_{L-1} in 'sample' mode
    (f' is read off h = f(a), which determines it for every activation offered), or
    only the grouped a' and h' (K rows) in the averaged modes. 'mean' scales e' by 1/K.

    Args:
      spec, params, feedback, x, y, mode: as ``dfa_grads``, as tensors of spec.dtype.
      projection: hardware effects on the projections e' B_l^T (dfa_core.hardware.Projection:
        quantised error, noise, a plug-in device); None, or an identity Projection: exact.
      noise: the projection noise's standard-normal draws z_l, one (K, n_l) tensor per hidden
        layer (K: batch, 1 or n_L by mode); the same draws give the same grads on both backends.
      key: a torch.Generator on the params' device (its state advances, so one generator serves
        every step) or an int seed (a fresh generator each call: pass a new seed every step), to
        draw z_l inside the step instead, layer 1 first. Draws differ from JAX's for the same seed.

    Returns:
      (((gW_1, gb_1), ..., (gW_L, gb_L)), loss ()).

    Raises:
      ValueError: noise and key both given, or given without projection noise, or neither with it.
    """
    if isinstance(spec, ModelSpec):  # conv/pool/dense blocks: per-block VJPs (dfa_torch.blocks)
        return blocks.dfa_grads_and_loss(spec, params, feedback, x, y, mode, projection, noise, key)
    hw = hardware.active(projection)
    hardware.check_noise_source(hw, noise, key)
    act = nn.activation(spec.activation)
    avg, count = _grouping(mode, y)
    keep = (lambda t: t) if avg is None else avg
    a: Optional[Tensor]  # set to None to free memory as soon as a tensor is not needed
    h: Optional[Tensor]
    kept_h: list[Any]  # h'_{l-1} per layer; each slot is set to None once its update is formed
    kept_a: list[Any]
    h, kept_h, kept_a = x, [], []
    for w, b in params[:-1]:
        kept_h.append(keep(h))
        a = torch.addmm(b, h, w.T)
        h = act.fn(a)
        kept_a.append(h if avg is None else avg(a))
        a = None  # free a_l before a_{l+1} is allocated
    h_last = keep(h)
    z = torch.addmm(params[-1][1], h, params[-1][0].T)
    a = h = None  # the full-batch activations are no longer needed
    batch_loss = reduce_loss(spec, z, y)
    y_hat = nn.output_function(spec.output)(z)
    e_raw = y_hat - y if avg is None else avg(y_hat) - avg(y)
    e = e_raw / count if spec.reduction == "mean" else e_raw
    # Top layer first, as backprop does, so each layer's activations are released as
    # soon as its update is formed (h_{L-1} first) and peak memory stays near BP's.
    grads = [(e.T @ h_last, torch.sum(e, dim=0))]
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
        grads.append((delta.T @ h_in, torch.sum(delta, dim=0)))
    grads.reverse()
    return tuple(grads), batch_loss


def dfa_grads_unchecked(
    spec: MLPSpec,
    params: Params,
    feedback: Feedback,
    x: Tensor,
    y: Tensor,
    mode: str,
    projection: Optional[Projection] = None,
    noise: Optional[Tuple[Tensor, ...]] = None,
    key: Optional[Any] = None,
) -> Grads:
    """``dfa_grads`` on tensors of spec.dtype, without validation (the fast path); projection,
    noise and key as in ``dfa_grads_and_loss``."""
    return dfa_grads_and_loss(spec, params, feedback, x, y, mode, projection, noise, key)[0]


def bp_grads_and_loss(spec: MLPSpec, params: Params, x: Tensor, y: Tensor) -> Tuple[Grads, Tensor]:
    """Backprop gradients and the batch loss, by reverse-mode autodiff (the training fast path).

    Uses ``torch.autograd.grad`` on detached aliases of the params: the caller's tensors
    get no ``requires_grad`` and no ``.grad``. On this workload it is faster than
    ``torch.func.grad`` (about 2x on a GPU at small batches), with the same values.

    Returns:
      (((gW_1, gb_1), ..., (gW_L, gb_L)), loss ()).
    """
    if isinstance(spec, ModelSpec):
        return blocks.bp_grads_and_loss(spec, params, x, y)
    with torch.enable_grad():
        leaves = tuple((w.detach().requires_grad_(), b.detach().requires_grad_()) for w, b in params)
        batch_loss = loss(spec, leaves, x, y)
        flat = torch.autograd.grad(batch_loss, [t for pair in leaves for t in pair])
    grads = tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
    return grads, batch_loss.detach()


def bp_grads_unchecked(spec: MLPSpec, params: Params, x: Tensor, y: Tensor) -> Grads:
    """``bp_grads`` on tensors of spec.dtype, without validation (the fast path)."""
    return bp_grads_and_loss(spec, params, x, y)[0]


def _value_flags(x: Tensor, y: Tensor, needs_one_hot: bool) -> Tuple[bool, bool, bool]:
    x_ok = bool(torch.isfinite(x).all())
    y_ok = bool(torch.isfinite(y).all())
    if not needs_one_hot:
        return x_ok, y_ok, True
    binary = bool(((y == 0) | (y == 1)).all())
    return x_ok, y_ok, binary and bool((torch.sum(y, dim=1) == 1).all())


def prepare(
    spec: MLPSpec,
    params: ParamsLike,
    feedback: Optional[FeedbackLike],
    x: ArrayLike,
    y: ArrayLike,
    mode: str = "sample",
    check_values: bool = True,
) -> Tuple[Params, Optional[Feedback], Tensor, Tensor]:
    """Validates a call and converts its arrays to tensors on the params' device."""
    validation.check_spec(spec)
    validation.check_mode(mode)
    validation.check_params(spec, params)
    if feedback is not None:
        validation.check_feedback(spec, feedback)
    validation.check_batch(spec, x, y)
    w0 = params[0][0]
    device = w0.device if isinstance(w0, torch.Tensor) else None
    x, y = as_input(x, spec.dtype, device), as_input(y, spec.dtype, device)
    if check_values:
        validation.raise_for_values(*_value_flags(x, y, validation.needs_one_hot(mode)), mode=mode)
    params_t = tuple(tuple(as_input(t, spec.dtype, device) for t in block) for block in params)
    feedback_t = None if feedback is None else tuple(as_input(b, spec.dtype, device) for b in feedback)
    if check_values:  # the checked entry points reject non-finite params and feedback too
        for name, arr in validation.named_leaves(params_t, feedback_t):
            validation.raise_for_nonfinite(name, bool(torch.isfinite(arr).all()))
    return params_t, feedback_t, x, y


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
      params: ((W_l, b_l), ...) NumPy arrays or tensors of spec.dtype, W_l: (n_l, n_{l-1}).
      feedback: (B_1, ..., B_{L-1}), B_l: (n_l, n_L), spec.dtype.
      x: inputs, (batch, n_0), any real dtype (cast to spec.dtype).
      y: targets, (batch, n_L); one-hot rows for mode 'class_mean'.
      mode: 'sample', 'batch_mean' or 'class_mean'.
      check_values: reject non-finite x or y (and non-one-hot y for 'class_mean');
        costs one reduction over the batch.
      projection: hardware effects on e' B_l^T (dfa_core.hardware.Projection); None: exact DFA.
      noise: explicit standard-normal draws for the projection noise, one array per hidden
        block shaped like its projection (K, size_l) (``dfa_core.hardware.projection_shapes``).
      key: instead of noise, a torch.Generator or an int seed to draw it in the step.

    Returns:
      ((gW_1, gb_1), ..., (gW_L, gb_L)) tensors shaped like params.

    Raises:
      ValueError, TypeError: bad spec, mode, shapes, dtypes, values, projection, noise or key,
        before any compute.
    """
    with precision_scope(getattr(spec, "dtype", "float32")):
        validation.check_spec(spec)
        validation.check_feedback(spec, feedback)  # None is not "no feedback" for DFA
        hw = hardware.active(projection)
        hardware.check_noise_source(hw, noise, key)
        if key is not None and not isinstance(key, torch.Generator):
            if isinstance(key, bool) or not isinstance(key, int):
                raise TypeError(f"key must be a torch.Generator or an int seed on torch, got {type(key).__name__}")
        params_t, feedback_t, x, y = prepare(spec, params, feedback, x, y, mode, check_values)
        noise_t = None
        if noise is not None:
            hardware.check_noise(spec, noise, x.shape[0], mode)
            noise_t = tuple(as_input(z, spec.dtype, x.device) for z in noise)
        # check_feedback refused None above, so prepare returned the feedback as tensors.
        return dfa_grads_unchecked(spec, params_t, cast(Feedback, feedback_t), x, y, mode, hw, noise_t, key)


def bp_grads(spec: MLPSpec, params: ParamsLike, x: ArrayLike, y: ArrayLike, check_values: bool = True) -> Grads:
    """Backprop gradients of the same loss (autodiff), shaped like params; see ``dfa_grads``."""
    with precision_scope(getattr(spec, "dtype", "float32")):
        params_t, _, x, y = prepare(spec, params, None, x, y, "sample", check_values)
        return bp_grads_unchecked(spec, params_t, x, y)
