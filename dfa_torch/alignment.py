"""Alignment of DFA updates with backprop (torch): angles per layer.

Mirrors ``dfa_jax.alignment`` name for name.

For layer l the DFA teaching signal is delta_l = (e' B_l^T) * f'(a'_l) (delta_L = e')
and the BP one is dLoss/da_l, obtained by autodiff (torch.func.grad) through zero
perturbations of the pre-activations. Both are compared after the batch is grouped by
the same mode (the BP deltas are averaged with the same grouping matrix G), so in
'sample' mode they are compared sample by sample. Weight angles compare gW_l of DFA
with gW_l of BP (the biases are left out). An angle is 2 * atan2(|u - v|, |u + v|)
for the unit vectors u, v, which stays accurate near 0 degrees; it is NaN where
either vector is zero.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Tuple, cast

import torch
import torch.func

from dfa_core import hardware, validation
from dfa_core.backend import ArrayLike, FeedbackLike, ParamsLike
from dfa_core.hardware import Projection
from dfa_core.model import Block, Conv2d, Dense, ModelSpec, NetSpec
from dfa_core.rules import as_model
from dfa_core.spec import MLPSpec
from dfa_torch import blocks, nn
from dfa_torch import rules as rules_
from dfa_torch.arrays import precision_scope
from dfa_torch.blocks import _class_grouping
from dfa_torch.dfa import Feedback, dfa_layer_grads, feedback_projection, group, prepare
from dfa_torch.mlp import Params
from dfa_torch.mlp import _forward_with_activations as forward_with_activations
from dfa_torch.nn import reduce_loss

if TYPE_CHECKING:  # dfa_torch.parallel imports torch.distributed; only its type is read here
    from dfa_torch.parallel import Reducer

Tensor = torch.Tensor


class Angles(NamedTuple):
    """Angles in degrees between DFA and BP, index l - 1 for layer l (the last is the output layer)."""

    weights: Tensor  # (L,): angle between DFA's and BP's gradient of W_l
    deltas: Tensor  # (L,): angle between DFA's and BP's (grouped) teaching signal of layer l


def angle_degrees(u: Tensor, v: Tensor) -> Tensor:
    """Angle in degrees between two tensors of the same shape, flattened: (); NaN if one is zero."""
    u, v = torch.flatten(u), torch.flatten(v)
    nu, nv = torch.linalg.vector_norm(u), torch.linalg.vector_norm(v)
    un, vn = u / nu, v / nv
    angle = 2 * torch.atan2(torch.linalg.vector_norm(un - vn), torch.linalg.vector_norm(un + vn))
    return torch.where((nu > 0) & (nv > 0), angle * (180 / math.pi), torch.full_like(angle, math.nan))


def _bp_grads_and_deltas(spec: MLPSpec, params: Params, x: Tensor, y: Tensor) -> Tuple[Any, Any]:
    """BP gradients of the params and dLoss/da_l for l = 1..L, each (batch, n_l)."""
    f = nn.activation(spec.activation).fn

    def perturbed_loss(params, eps):
        h = x
        for (w, b), e in zip(params[:-1], eps[:-1]):
            h = f(torch.addmm(b, h, w.T) + e)
        w, b = params[-1]
        return reduce_loss(spec, torch.addmm(b, h, w.T) + eps[-1], y)

    zeros = tuple(torch.zeros((x.shape[0], n), dtype=x.dtype, device=x.device) for n in spec.layer_sizes[1:])
    return torch.func.grad(perturbed_loss, argnums=(0, 1))(params, zeros)


def _weight_leaves(block: Block, leaves) -> Tensor:
    """What a block's weight angle compares: W for Dense and Conv2d (biases left out, as for MLPs),
    every leaf of a composite, transformer or user block."""
    return leaves[0] if isinstance(block.layer, (Dense, Conv2d)) else torch.cat([torch.flatten(t) for t in leaves])


def _block_angles(spec: ModelSpec, params, feedback: Feedback, x: Tensor, y: Tensor, mode: str) -> Angles:
    """Angles for a ModelSpec: per block, DFA's update vs BP's gradient and delta_l vs dLoss/da_l."""
    with torch.no_grad():
        dfa_grads, _, dfa_deltas = blocks.dfa_signals(spec, params, feedback, x, y, mode, keep_deltas=True)
    return _against_bp(spec, params, x, y, mode, dfa_grads, dfa_deltas)


def _against_bp(spec: ModelSpec, params, x: Tensor, y: Tensor, mode: str, grads, deltas) -> Angles:
    """Angles of a rule's per-block gradients and teaching signals (delta_1, ..., delta_{L-1}, e')
    to BP's gradients and dLoss/da_l (grouped by ``mode`` as the rule's are)."""
    zeros = tuple(torch.zeros((x.shape[0], *block.a_shape), dtype=x.dtype, device=x.device) for block in spec.blocks)
    loss = lambda p, eps: reduce_loss(spec, blocks._logits(spec, p, x, eps), y)
    bp_grads, bp_deltas = torch.func.grad(loss, argnums=(0, 1))(params, zeros)
    with torch.no_grad():
        avg = blocks._grouping(mode, y)[0]
        regroup = (lambda t: t) if avg is None else avg
        weights = [
            angle_degrees(_weight_leaves(b, d), _weight_leaves(b, g)) for b, d, g in zip(spec.blocks, grads, bp_grads)
        ]
        signals = [angle_degrees(d, regroup(g)) for d, g in zip(deltas, bp_deltas)]
    return Angles(torch.stack(weights), torch.stack(signals))


def update_angles(
    spec: NetSpec,
    params,
    feedback: Tuple[Tensor, ...],
    x: Tensor,
    y: Tensor,
    rules: Tuple[str, ...],
    mode: str,
    key: Optional[torch.Generator] = None,
    projection: Optional[Projection] = None,
) -> Angles:
    """Angles between the update a rule applies and BP's gradient, per block (unchecked).

    What ``train_step`` applies is measured: each block's gradients under its rule (``rules.signals``;
    with an active ``projection``, every rule 'dfa', the quantised / noisy / device projections of
    ``blocks.dfa_signals``) against BP's, and its teaching signal delta_l against dLoss/da_l. A
    'shallow' block has a zero update: NaN. An MLPSpec runs as its Dense ModelSpec (same numbers).

    Args:
      spec: the network.
      params: per block (W, b) or a composite's leaves, tensors of spec.dtype.
      feedback: ``rules.grads``'s feedback for ``rules`` (kp entries: the trained B), or ().
      x: inputs, (batch, n_0) or (batch, *input_shape).
      y: targets, (batch, n_L); one-hot for 'class_mean'.
      rules: one rule per block (``dfa_core.validation.method_rules``).
      mode: the grouping of the direct rules ('sample' when a chain rule is present).
      key: the step's generator: brsf's magnitudes, or the projection noise's draws (``train_step``
        passes a generator seeded as its own, so the angles are those of the update it applies);
        None without draws.
      projection: hardware effects on DFA's projections, or None.

    Returns:
      Angles(weights (L,), deltas (L,)) in degrees, NaN where either vector is zero.
    """
    model = as_model(spec)
    with torch.no_grad():
        if hardware.active(projection) is not None:
            grads, _, deltas = blocks.dfa_signals(
                model, params, feedback, x, y, mode, keep_deltas=True, projection=projection, key=key
            )
        else:
            grads, _, deltas = rules_.signals(model, params, feedback, x, y, rules, mode, key, keep_deltas=True)
    return _against_bp(model, params, x, y, mode, grads, deltas)


def _sharded_angles(
    spec: NetSpec,
    params,
    feedback: Feedback,
    x: Tensor,
    y: Tensor,
    mode: str,
    reducer: Reducer,
    rules: Optional[Tuple[str, ...]] = None,
    key: Optional[torch.Generator] = None,
) -> Angles:
    """``alignment_angles_unchecked`` (``rules`` None) or ``update_angles`` (``rules`` given, no
    projection) of the global batch whose rows x, y (rows >= 0) are this process's shard (data
    parallel), the same on every process.

    The rule's side is ``rules.signals`` with the reducer (global groups, gradients summed); BP's is
    this shard's part of the global loss, its gradients all-reduced. Grouped modes: BP's deltas
    are regrouped by the global groups in the same all-reduce as its gradients, then every angle
    is ``angle_degrees`` of global tensors. 'sample' mode: the deltas stay split by rows, so their
    angles come from sums over the processes: |u|^2 and |v|^2 (with BP's gradients), then
    |u/|u| - v/|v||^2 and |u/|u| + v/|v||^2 (the same formula as ``angle_degrees``).
    An MLPSpec runs as its Dense ModelSpec (the same numbers).
    """
    model = as_model(spec)
    chain = blocks._blocks(model)
    if rules is None and len(feedback) != len(chain) - 1:
        raise ValueError(
            f"the DFA-vs-BP angles need DFA's feedback (B_1, ..., B_{len(chain) - 1}), also when training "
            f"with 'bp'; got {len(feedback)} entries"
        )
    scale = 1 / reducer.rows if model.reduction == "mean" else 1.0
    zeros = tuple(torch.zeros((x.shape[0], *block.a_shape), dtype=x.dtype, device=x.device) for block in chain)
    shard_loss = lambda p, eps: torch.sum(nn.per_sample_loss(model.output, blocks._logits(model, p, x, eps), y)) * scale
    bp_grads, bp_deltas = torch.func.grad(shard_loss, argnums=(0, 1))(params, zeros)
    with torch.no_grad():
        rules = ("dfa",) * len(chain) if rules is None else rules
        dfa_grads, _, dfa_deltas = rules_.signals(
            model, params, feedback, x, y, rules, mode, key, keep_deltas=True, reducer=reducer
        )
        bp_w = [_weight_leaves(b, g) for b, g in zip(chain, bp_grads)]
        flat_w = torch.cat([w.reshape(-1) for w in bp_w])
        if mode == "sample":
            squares = torch.stack([torch.sum(t * t) for pair in zip(dfa_deltas, bp_deltas) for t in pair])
            flat = reducer.psum(torch.cat([flat_w, squares]))
            flat_w, norms = flat[: flat_w.numel()], torch.sqrt(flat[flat_w.numel() :])
            deltas = _row_sharded_angles(dfa_deltas, bp_deltas, norms[0::2], norms[1::2], reducer)
        else:
            sums, means = blocks._shard_grouping(mode, y, reducer)
            bp_grouped, _, flat_w = means([sums(g) for g in bp_deltas], flat_w)
            deltas = torch.stack([angle_degrees(d, g) for d, g in zip(dfa_deltas, bp_grouped)])
        bp_w = [t.view_as(w) for t, w in zip(torch.split(flat_w, [w.numel() for w in bp_w]), bp_w)]
        weights = torch.stack([angle_degrees(_weight_leaves(b, d), w) for b, d, w in zip(chain, dfa_grads, bp_w)])
    return Angles(weights, deltas)


def _row_sharded_angles(us, vs, norms_u: Tensor, norms_v: Tensor, reducer: Reducer) -> Tensor:
    """``angle_degrees(u_l, v_l)`` per l, (L,), where every process holds some rows of u_l and v_l
    and the global norms: one all-reduce of |u/|u| - v/|v||^2 and |u/|u| + v/|v||^2."""
    halves = []
    for u, v, nu, nv in zip(us, vs, norms_u, norms_v):
        un, vn = u / nu, v / nv
        halves += [torch.sum((un - vn) ** 2), torch.sum((un + vn) ** 2)]
    total = reducer.psum(torch.stack(halves))
    angle = 2 * torch.atan2(torch.sqrt(total[0::2]), torch.sqrt(total[1::2]))
    return torch.where((norms_u > 0) & (norms_v > 0), angle * (180 / math.pi), torch.full_like(angle, math.nan))


def alignment_angles_unchecked(
    spec: MLPSpec, params: Params, feedback: Feedback, x: Tensor, y: Tensor, mode: str
) -> Angles:
    """``alignment_angles`` on tensors of spec.dtype, without validation."""
    if isinstance(spec, ModelSpec):
        return _block_angles(spec, params, feedback, x, y, mode)
    bp_grads, bp_deltas = _bp_grads_and_deltas(spec, params, x, y)
    with torch.no_grad():
        grouped = group(spec, forward_with_activations(spec, params, x), y, mode)
        projections = feedback_projection(spec, feedback, grouped.e)
        dfa_grads = dfa_layer_grads(spec, grouped, projections)
        df = nn.activation(spec.activation).derivative
        dfa_deltas = [p * df(a, fa) for p, a, fa in zip(projections, grouped.a, grouped.f_a)] + [grouped.e]
        if mode == "sample":
            regroup = lambda t: t
        elif mode == "batch_mean":
            regroup = lambda t: torch.mean(t, dim=0, keepdim=True)
        else:
            g_CxB = _class_grouping(y)
            regroup = lambda t: g_CxB @ t
        weights = torch.stack([angle_degrees(d[0], b[0]) for d, b in zip(dfa_grads, bp_grads)])
        deltas = torch.stack([angle_degrees(d, regroup(b)) for d, b in zip(dfa_deltas, bp_deltas)])
    return Angles(weights, deltas)


def alignment_angles(
    spec: MLPSpec,
    params: ParamsLike,
    feedback: FeedbackLike,
    x: ArrayLike,
    y: ArrayLike,
    mode: str = "sample",
    check_values: bool = True,
) -> Angles:
    """Angles between the DFA update and the BP gradient of every layer, for one batch.

    Args:
      spec: the network.
      params: ((W_l, b_l), ...) NumPy arrays or tensors of spec.dtype, W_l: (n_l, n_{l-1}).
      feedback: (B_1, ..., B_{L-1}), B_l: (n_l, n_L), spec.dtype.
      x: inputs, (batch, n_0).
      y: targets, (batch, n_L); one-hot rows for mode 'class_mean'.
      mode: the DFA grouping, one of dfa_core.MODES.
      check_values: reject non-finite x or y (and non-one-hot y for 'class_mean').

    Returns:
      Angles(weights (L,), deltas (L,)) in degrees, in [0, 180] or NaN where a gradient
      is exactly zero. The output layer's delta angle is 0 in every mode, its weight
      angle 0 in 'sample' mode.

    Raises:
      ValueError, TypeError: bad spec, mode, shapes, dtypes or values, before any compute.
    """
    with precision_scope(getattr(spec, "dtype", "float32")):
        validation.check_spec(spec)
        validation.check_feedback(spec, feedback)  # None is not "no feedback" for DFA
        params_t, feedback_t, x, y = prepare(spec, params, feedback, x, y, mode, check_values)
        # check_feedback refused None above, so prepare returned the feedback as tensors.
        return alignment_angles_unchecked(spec, params_t, cast(Feedback, feedback_t), x, y, mode)


__all__ = ["Angles", "alignment_angles", "alignment_angles_unchecked", "angle_degrees", "update_angles"]
