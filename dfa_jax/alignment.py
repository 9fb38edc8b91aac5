"""Alignment of DFA updates with backprop (JAX): angles per layer, jitted once per (spec, mode).

Mirrors ``dfa_torch.alignment`` name for name.

For layer l the DFA teaching signal is delta_l = (e' B_l^T) * f'(a'_l) (delta_L = e')
and the BP one is dLoss/da_l, obtained by autodiff through zero perturbations of the
pre-activations. Both are compared after the batch is grouped by the same mode (the
BP deltas are averaged with the same grouping matrix G), so in 'sample' mode they are
compared sample by sample. Weight angles compare gW_l of DFA with gW_l of BP (the
biases are left out). An angle is 2 * atan2(|u - v|, |u + v|) for the unit vectors
u, v, which stays accurate near 0 degrees; it is NaN where either vector is zero.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, cast

import jax
import jax.numpy as jnp

from dfa_core import hardware, validation
from dfa_core.backend import ArrayLike, FeedbackLike, ParamsLike
from dfa_core.hardware import Projection
from dfa_core.model import Block, Conv2d, Dense, ModelSpec, NetSpec
from dfa_core.rules import as_model
from dfa_core.spec import MLPSpec
from dfa_jax import blocks, nn
from dfa_jax import rules as rules_
from dfa_jax.arrays import precision_scope
from dfa_jax.blocks import _class_grouping
from dfa_jax.dfa import TRACE_COUNTS, Feedback, dfa_layer_grads, feedback_projection, group, prepare
from dfa_jax.mlp import Params
from dfa_jax.mlp import _forward_with_activations as forward_with_activations
from dfa_jax.nn import reduce_loss

Array = jax.Array


class Angles(NamedTuple):
    """Angles in degrees between DFA and BP, index l - 1 for layer l (the last is the output layer)."""

    weights: Array  # (L,): angle between DFA's and BP's gradient of W_l
    deltas: Array  # (L,): angle between DFA's and BP's (grouped) teaching signal of layer l


def angle_degrees(u: Array, v: Array) -> Array:
    """Angle in degrees between two arrays of the same shape, flattened: (); NaN if one is zero."""
    u, v = jnp.ravel(u), jnp.ravel(v)
    nu, nv = jnp.linalg.norm(u), jnp.linalg.norm(v)
    un, vn = u / nu, v / nv
    angle = 2 * jnp.arctan2(jnp.linalg.norm(un - vn), jnp.linalg.norm(un + vn))
    return jnp.where((nu > 0) & (nv > 0), jnp.degrees(angle), jnp.nan)


def _bp_grads_and_deltas(spec: MLPSpec, params: Params, x: Array, y: Array):
    """BP gradients of the params and dLoss/da_l for l = 1..L, each (batch, n_l)."""
    f = nn.activation(spec.activation).fn

    def perturbed_loss(params, eps):
        h = x
        for (w, b), e in zip(params[:-1], eps[:-1]):
            h = f(h @ w.T + b[None, :] + e)
        w, b = params[-1]
        return reduce_loss(spec, h @ w.T + b[None, :] + eps[-1], y)

    zeros = tuple(jnp.zeros((x.shape[0], n), dtype=x.dtype) for n in spec.layer_sizes[1:])
    return jax.grad(perturbed_loss, argnums=(0, 1))(params, zeros)


def _weight_leaves(block: Block, leaves):
    """What a block's weight angle compares: W for Dense and Conv2d (biases left out, as for MLPs),
    every leaf of a composite, transformer or user block."""
    return leaves[0] if isinstance(block.layer, (Dense, Conv2d)) else jnp.concatenate([jnp.ravel(t) for t in leaves])


def _block_angles(spec: ModelSpec, params, feedback: Feedback, x: Array, y: Array, mode: str) -> Angles:
    """Angles for a ModelSpec: per block, DFA's update vs BP's gradient and delta_l vs dLoss/da_l."""
    dfa_grads, _, dfa_deltas = blocks.dfa_signals(spec, params, feedback, x, y, mode, keep_deltas=True)
    return _against_bp(spec, params, x, y, mode, dfa_grads, dfa_deltas)


def _against_bp(spec: ModelSpec, params, x: Array, y: Array, mode: str, grads, deltas) -> Angles:
    """Angles of a rule's per-block gradients and teaching signals (delta_1, ..., delta_{L-1}, e')
    to BP's gradients and dLoss/da_l (grouped by ``mode`` as the rule's are)."""
    zeros = tuple(jnp.zeros((x.shape[0], *block.a_shape), dtype=x.dtype) for block in spec.blocks)
    loss = lambda p, eps: reduce_loss(spec, blocks._logits(spec, p, x, eps), y)
    bp_grads, bp_deltas = jax.grad(loss, argnums=(0, 1))(params, zeros)
    avg = blocks._grouping(mode, y)[0]
    regroup = (lambda t: t) if avg is None else avg
    weights = [
        angle_degrees(_weight_leaves(b, d), _weight_leaves(b, g)) for b, d, g in zip(spec.blocks, grads, bp_grads)
    ]
    signals = [angle_degrees(d, regroup(g)) for d, g in zip(deltas, bp_deltas)]
    return Angles(jnp.stack(weights), jnp.stack(signals))


def update_angles(
    spec: NetSpec,
    params,
    feedback: Tuple[Array, ...],
    x: Array,
    y: Array,
    rules: Tuple[str, ...],
    mode: str,
    key: Optional[Array] = None,
    projection: Optional[Projection] = None,
) -> Angles:
    """Angles between the update a rule applies and BP's gradient, per block (pure, unchecked).

    What ``train_step`` applies is measured: each block's gradients under its rule (``rules.signals``;
    with an active ``projection``, every rule 'dfa', the quantised / noisy / device projections of
    ``blocks.dfa_signals``) against BP's, and its teaching signal delta_l against dLoss/da_l. A
    'shallow' block has a zero update: NaN. An MLPSpec runs as its Dense ModelSpec (same numbers).

    Args:
      spec: the network.
      params: per block (W, b) or a composite's leaves, JAX arrays of spec.dtype.
      feedback: ``rules.grads``'s feedback for ``rules`` (kp entries: the trained B), or ().
      x: inputs, (batch, n_0) or (batch, *input_shape).
      y: targets, (batch, n_L); one-hot for 'class_mean'.
      rules: one rule per block (``dfa_core.validation.method_rules``).
      mode: the grouping of the direct rules ('sample' when a chain rule is present).
      key: the step's key: brsf's magnitudes, or the projection noise's draws (``train_step`` passes
        the step's own, so the angles are those of the update it applies); None without draws.
      projection: hardware effects on DFA's projections, or None.

    Returns:
      Angles(weights (L,), deltas (L,)) in degrees, NaN where either vector is zero.
    """
    model = as_model(spec)
    if hardware.active(projection) is not None:
        grads, _, deltas = blocks.dfa_signals(
            model, params, feedback, x, y, mode, keep_deltas=True, projection=projection, key=key
        )
    else:
        grads, _, deltas = rules_.signals(model, params, feedback, x, y, rules, mode, key, keep_deltas=True)
    return _against_bp(model, params, x, y, mode, grads, deltas)


def _alignment_angles(spec: MLPSpec, params: Params, feedback: Feedback, x: Array, y: Array, mode: str) -> Angles:
    TRACE_COUNTS["alignment_angles"] += 1
    if isinstance(spec, ModelSpec):  # decided while tracing
        return _block_angles(spec, params, feedback, x, y, mode)
    bp_grads, bp_deltas = _bp_grads_and_deltas(spec, params, x, y)
    grouped = group(spec, forward_with_activations(spec, params, x), y, mode)
    projections = feedback_projection(spec, feedback, grouped.e)
    dfa_grads = dfa_layer_grads(spec, grouped, projections)
    df = nn.activation(spec.activation).derivative
    dfa_deltas = [p * df(a, fa) for p, a, fa in zip(projections, grouped.a, grouped.f_a)] + [grouped.e]
    if mode == "sample":
        regroup = lambda t: t
    elif mode == "batch_mean":
        regroup = lambda t: jnp.mean(t, axis=0, keepdims=True)
    else:
        g_CxB = _class_grouping(y)
        regroup = lambda t: g_CxB @ t
    weights = jnp.stack([angle_degrees(d[0], b[0]) for d, b in zip(dfa_grads, bp_grads)])
    deltas = jnp.stack([angle_degrees(d, regroup(b)) for d, b in zip(dfa_deltas, bp_deltas)])
    return Angles(weights, deltas)


alignment_angles_unchecked = jax.jit(_alignment_angles, static_argnames=("spec", "mode"))
"""``alignment_angles`` on JAX arrays of spec.dtype, without validation; jitted per (spec, mode)."""


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
      params: ((W_l, b_l), ...) NumPy or JAX arrays of spec.dtype, W_l: (n_l, n_{l-1}).
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
      ValueError, TypeError: bad spec, mode, shapes, dtypes or values, before any tracing.
    """
    with precision_scope(getattr(spec, "dtype", "float32")):
        validation.check_spec(spec)
        validation.check_feedback(spec, feedback)  # None is not "no feedback" for DFA
        params_j, feedback_j, x, y = prepare(spec, params, feedback, x, y, mode, check_values)
        # check_feedback refused None above, so prepare returned the feedback as JAX arrays.
        return alignment_angles_unchecked(spec, params_j, cast(Feedback, feedback_j), x, y, mode)


__all__ = ["Angles", "alignment_angles", "alignment_angles_unchecked", "angle_degrees", "update_angles"]
