"""Models of blocks (dfa_core.ModelSpec: dense, conv, pool, flatten): forward, loss, DFA and BP (JAX).

Block l computes u_l = prefix_l(h_{l-1}), a_l = g_l(theta_l, u_l), h_l = f(a_l); the last
block's a_L are the logits. DFA gives every hidden block one feedback point at a_l and takes
the block's gradients as the vector-Jacobian product of g_l (``jax.vjp``) at the grouped
input u'_l, applied to delta_l = reshape(e' B_l^T, a_l's shape) * f'(a'_l): exact backprop
inside a block, nothing between blocks. A model of Dense layers only computes exactly what
``dfa_jax.mlp`` and ``dfa_jax.dfa`` compute for the matching MLPSpec.

Layers are entries in two tables (``_PREFIX_LAYERS``, ``_PARAM_LAYERS``): a new layer type is
one new entry. This module sits below ``mlp`` and ``dfa`` (which route ModelSpec calls here),
so it imports neither. Arrays are JAX arrays of spec.dtype; validation happens in the checked
entry points of ``dfa_jax.dfa`` before anything here is traced.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from dfa_core.model import AvgPool2d, Conv2d, Dense, Flatten, Layer, MaxPool2d, ModelSpec
from dfa_jax import nn
from dfa_jax.nn import reduce_loss

Array = jax.Array
Params = Tuple[Tuple[Array, Array], ...]  # ((W_1, b_1), ..., (W_L, b_L)), shapes spec.param_shapes
Grads = Params
Feedback = Tuple[Array, ...]  # (B_1, ..., B_{L-1}), B_l (a_size_l, n_L)

TRACE_COUNTS: collections.Counter[str] = collections.Counter()
"""How many times each jitted block entry point was traced (compiled); tests read it."""


class BlockActivations(NamedTuple):
    """What a training forward pass keeps, per block (h_l = f(a_l) is not kept)."""

    u: Tuple[Array, ...]  # block inputs u_1..u_L, u_l = prefix_l(h_{l-1}): (batch, *u_shape_l)
    a: Tuple[Array, ...]  # block outputs a_1..a_L: (batch, *a_shape_l); a_L are the logits (batch, n_L)
    y_hat: Array  # out(a_L): (batch, n_L)


# -- layers --------------------------------------------------------------------------------------


def _pool(h_BxCxHxW: Array, size: int, init: Any, op: Callable[[Array, Array], Array]) -> Array:
    # 'VALID' windows with stride = size drop what does not fit: torch's floor.
    window = (1, 1, size, size)
    return jax.lax.reduce_window(h_BxCxHxW, init, op, window, window, "VALID")


def _max_pool(layer: MaxPool2d, h: Array) -> Array:
    return _pool(h, layer.size, -jnp.inf, jax.lax.max)


def _avg_pool(layer: AvgPool2d, h: Array) -> Array:
    return _pool(h, layer.size, 0.0, jax.lax.add) / (layer.size * layer.size)


def _flatten(layer: Flatten, h: Array) -> Array:
    del layer
    return h.reshape(h.shape[0], -1)  # row-major: (C, H, W) order, as torch


_PREFIX_LAYERS: dict[type, Callable[[Any, Array], Array]] = {
    MaxPool2d: _max_pool,
    AvgPool2d: _avg_pool,
    Flatten: _flatten,
}


def _dense(layer: Dense, w_OxI: Array, b_O: Array, u_BxI: Array) -> Array:
    del layer
    return u_BxI @ w_OxI.T + b_O[None, :]  # as dfa_jax.mlp._linear, so Dense models match MLPs


def _conv(layer: Conv2d, w_OxIxKxK: Array, b_O: Array, u_BxIxHxW: Array) -> Array:
    p = layer.pad
    a = jax.lax.conv_general_dilated(
        u_BxIxHxW,
        w_OxIxKxK,
        window_strides=(layer.stride, layer.stride),
        padding=((p, p), (p, p)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    return a + b_O[None, :, None, None]


_PARAM_LAYERS: dict[type, Callable[[Any, Array, Array, Array], Array]] = {
    Dense: _dense,
    Conv2d: _conv,
}


def _apply_prefix(prefix: Tuple[Layer, ...], h: Array) -> Array:
    """u = prefix(h): the block's parameter-free layers in order, (batch, *in_shape) -> (batch, *u_shape)."""
    for layer in prefix:
        h = _PREFIX_LAYERS[type(layer)](layer, h)
    return h


def _apply_layer(layer: Layer, w: Array, b: Array, u: Array) -> Array:
    """a = g(theta, u) for a Dense or Conv2d layer: (batch, *u_shape) -> (batch, *a_shape)."""
    return _PARAM_LAYERS[type(layer)](layer, w, b, u)


def _layer_vjp(layer: Layer, w: Array, b: Array, u: Array, delta: Array) -> Tuple[Array, Array]:
    """(gW, gb): the VJP of g(., ., u) w.r.t. (W, b) applied to delta (K, *a_shape); u (K, *u_shape).

    For Dense this is (delta^T u, sum_rows delta); for Conv2d the convolution weight gradient.
    """
    _, pullback = jax.vjp(lambda w_, b_: _apply_layer(layer, w_, b_, u), w, b)
    return pullback(delta)


# -- forward and loss ----------------------------------------------------------------------------


def _forward_with_activations(spec: ModelSpec, params: Params, x: Array) -> BlockActivations:
    """Every block's u_l and a_l, the hidden h_l and y_hat = out(a_L).

    Args:
      spec: the model.
      params: ((W_1, b_1), ..., (W_L, b_L)), shapes spec.param_shapes.
      x: inputs, (batch, *spec.input_shape).

    Returns:
      BlockActivations(u, a, y_hat).
    """
    f = nn.activation(spec.activation).fn
    h = x
    u: list[Array] = []
    a: list[Array] = []
    for block, (w, b) in zip(spec.blocks, params):
        if a:
            h = f(a[-1])
        u.append(_apply_prefix(block.prefix, h))
        a.append(_apply_layer(block.layer, w, b, u[-1]))
    return BlockActivations(tuple(u), tuple(a), nn.output_function(spec.output)(a[-1]))


def _logits(spec: ModelSpec, params: Params, x: Array) -> Array:
    """a_L, (batch, n_L), without keeping the hidden activations."""
    f = nn.activation(spec.activation).fn
    blocks = spec.blocks
    h = x
    for block, (w, b) in zip(blocks[:-1], params[:-1]):
        h = f(_apply_layer(block.layer, w, b, _apply_prefix(block.prefix, h)))
    return _apply_layer(blocks[-1].layer, *params[-1], _apply_prefix(blocks[-1].prefix, h))


def _forward(spec: ModelSpec, params: Params, x: Array) -> Array:
    """y_hat = out(a_L), (batch, n_L)."""
    return nn.output_function(spec.output)(_logits(spec, params, x))


def _loss(spec: ModelSpec, params: Params, x: Array, y: Array) -> Array:
    """The loss paired with spec.output, from logits, reduced by spec.reduction: ()."""
    return reduce_loss(spec, _logits(spec, params, x), y)


# Jitted per spec, on JAX arrays of spec.dtype: ``dfa_jax.mlp``'s public forward, logits, loss and
# forward_with_activations route a ModelSpec here after casting.
_jit_forward_with_activations = jax.jit(_forward_with_activations, static_argnames=("spec",))
_jit_logits = jax.jit(_logits, static_argnames=("spec",))
_jit_forward = jax.jit(_forward, static_argnames=("spec",))
_jit_loss = jax.jit(_loss, static_argnames=("spec",))


# -- DFA and BP ----------------------------------------------------------------------------------


def _grouping(mode: str, y_BxO: Array) -> Tuple[Optional[Callable[[Array], Array]], Any]:
    """(avg, K): t (batch, ...) -> G t (K, ...) for ``mode`` (None for 'sample') and K.

    As dfa_jax.dfa._grouping, with G applied over the batch axis of any trailing shape.
    'class_mean': row c of G averages the samples whose argmax label is c; rows of absent
    classes are zero (they add nothing; shapes stay static) and K counts the present ones.
    """
    if mode == "sample":
        return None, y_BxO.shape[0]
    if mode == "batch_mean":
        return (lambda t: jnp.mean(t, axis=0, keepdims=True)), 1
    if mode != "class_mean":
        raise ValueError(f"unknown mode {mode!r}")
    members_BxC = jax.nn.one_hot(jnp.argmax(y_BxO, axis=1), y_BxO.shape[1], dtype=y_BxO.dtype)
    g_CxB = members_BxC.T / jnp.maximum(jnp.sum(members_BxC, axis=0), 1)[:, None]
    count = jnp.sum(jnp.any(g_CxB > 0, axis=1)).astype(y_BxO.dtype)
    return (lambda t: jnp.tensordot(g_CxB, t, axes=1)), count


def dfa_grads_and_loss(
    spec: ModelSpec, params: Params, feedback: Feedback, x: Array, y: Array, mode: str
) -> Tuple[Grads, Array]:
    """DFA gradients of every block and the batch loss (pure; compose under jax.jit).

    e' = G y_hat - G y (scaled by 1/K for reduction 'mean'); output block: VJP of g_L at u'_L
    applied to e'; hidden block l: delta_l = reshape(e' B_l^T, (K, *a_shape_l)) * f'(a'_l),
    then the VJP of g_l at u'_l applied to delta_l. u_l and a_l are grouped separately, so f'
    is evaluated at the grouped a'. Only the grouped u', a' are kept (all rows for 'sample').

    Args:
      spec: the model.
      params: ((W_l, b_l), ...), shapes spec.param_shapes.
      feedback: (B_1, ..., B_{L-1}), B_l (a_size_l, n_L).
      x: inputs, (batch, *spec.input_shape).
      y: targets, (batch, n_L); one-hot for 'class_mean'.
      mode: 'sample', 'batch_mean' or 'class_mean'.

    Returns:
      (((gW_1, gb_1), ..., (gW_L, gb_L)) shaped like params, loss ()).
    """
    act = nn.activation(spec.activation)
    blocks = spec.blocks
    avg, count = _grouping(mode, y)
    keep = (lambda t: t) if avg is None else avg
    kept_u, kept_a = [], []
    h = x
    for block, (w, b) in zip(blocks[:-1], params[:-1]):
        u = _apply_prefix(block.prefix, h)
        kept_u.append(keep(u))
        a = _apply_layer(block.layer, w, b, u)
        h = act.fn(a)
        # In 'sample' mode keep h = f(a): it determines f'(a) for every activation offered
        # (as dfa_jax.dfa does); the grouped modes need f' at the grouped a'.
        kept_a.append(h if avg is None else avg(a))
    u = _apply_prefix(blocks[-1].prefix, h)
    u_last = keep(u)
    z = _apply_layer(blocks[-1].layer, *params[-1], u)
    batch_loss = reduce_loss(spec, z, y)
    y_hat = nn.output_function(spec.output)(z)
    e = y_hat - y if avg is None else avg(y_hat) - avg(y)
    if spec.reduction == "mean":
        e = e / count
    grads = [_layer_vjp(blocks[-1].layer, *params[-1], u_last, e)]
    for l in reversed(range(len(blocks) - 1)):  # top first, as dfa_jax.dfa, to free memory early
        p = (e @ feedback[l].T).reshape(e.shape[0], *blocks[l].a_shape)
        a_l = kept_a[l]
        fa = a_l if avg is None else act.fn(a_l)
        delta = act.backward(p, a_l, fa)
        grads.append(_layer_vjp(blocks[l].layer, *params[l], kept_u[l], delta))
    grads.reverse()
    return tuple(grads), batch_loss


def bp_grads_and_loss(spec: ModelSpec, params: Params, x: Array, y: Array) -> Tuple[Grads, Array]:
    """Backprop gradients of the loss through the whole model (jax.value_and_grad) and the loss."""
    batch_loss, grads = jax.value_and_grad(_loss, argnums=1)(spec, params, x, y)
    return grads, batch_loss


def _dfa_grads(spec: ModelSpec, params: Params, feedback: Feedback, x: Array, y: Array, mode: str) -> Grads:
    TRACE_COUNTS["dfa_grads"] += 1
    return dfa_grads_and_loss(spec, params, feedback, x, y, mode)[0]


def _bp_grads(spec: ModelSpec, params: Params, x: Array, y: Array) -> Grads:
    TRACE_COUNTS["bp_grads"] += 1
    return bp_grads_and_loss(spec, params, x, y)[0]


dfa_grads_unchecked = jax.jit(_dfa_grads, static_argnames=("spec", "mode"))
"""DFA gradients on JAX arrays of spec.dtype, without validation; jitted per (spec, mode)."""
bp_grads_unchecked = jax.jit(_bp_grads, static_argnames=("spec",))
"""BP gradients on JAX arrays of spec.dtype, without validation; jitted per spec."""


__all__ = [
    "BlockActivations",
    "TRACE_COUNTS",
    "bp_grads_and_loss",
    "bp_grads_unchecked",
    "dfa_grads_and_loss",
    "dfa_grads_unchecked",
    "reduce_loss",
]
