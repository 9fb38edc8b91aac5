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
from typing import Any, Callable, NamedTuple, Optional, Tuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dfa_core import hardware
from dfa_core.hardware import Projection
from dfa_core.model import (
    AvgPool2d,
    Block,
    CompositePlan,
    Conv2d,
    Dense,
    Flatten,
    Layer,
    MaxPool2d,
    ModelSpec,
    Residual,
    Sequential,
    TransformerBlock,
    UserBlock,
)
from dfa_jax import nn
from dfa_jax.nn import reduce_loss

Array = jax.Array
Params = Tuple[Tuple[Array, ...], ...]  # per block (W_l, b_l), or a composite's flat leaves; spec.param_shapes
Grads = Tuple[Tuple[Array, ...], ...]
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


# -- composite blocks: one feedback point at the output, exact backprop inside -----------------------


def _composite(plan: CompositePlan, leaves: Tuple[Array, ...], u: Array, f: Callable[[Array], Array]) -> Array:
    """a = body(u) (+ shortcut(u)): f after each inner Dense/Conv2d but the last; leaves in params order."""
    h, i = u, 0
    for j, layer in enumerate(plan.layers):
        if type(layer) in _PREFIX_LAYERS:
            h = _PREFIX_LAYERS[type(layer)](layer, h)
            continue
        h = _apply_layer(layer, leaves[i], leaves[i + 1], h)
        i += 2
        if j < len(plan.layers) - 1:
            h = f(h)
    if plan.residual:
        h = h + (u if plan.shortcut is None else _apply_layer(plan.shortcut, leaves[i], leaves[i + 1], u))
    return h


def _simple_block(block: Block, leaves: Tuple[Array, ...], u: Array, f: Callable[[Array], Array]) -> Array:
    del f
    return _apply_layer(block.layer, leaves[0], leaves[1], u)


def _simple_block_vjp(
    block: Block, leaves: Tuple[Array, ...], u: Array, delta: Array, f: Callable[[Array], Array]
) -> Tuple[Array, ...]:
    del f
    return tuple(_layer_vjp(block.layer, leaves[0], leaves[1], u, delta))


def _composite_block(block: Block, leaves: Tuple[Array, ...], u: Array, f: Callable[[Array], Array]) -> Array:
    return _composite(cast(CompositePlan, block.plan), leaves, u, f)


def _autodiff_block_vjp(
    block: Block, leaves: Tuple[Array, ...], u: Array, delta: Array, f: Callable[[Array], Array]
) -> Tuple[Array, ...]:
    _, pullback = jax.vjp(lambda *ls: _BLOCK_LAYERS[type(block.layer)][0](block, ls, u, f), *leaves)
    return tuple(pullback(delta))


def _layer_norm(x_BxTxD: Array, gamma_D: Array, beta_D: Array) -> Array:
    mean = jnp.mean(x_BxTxD, axis=-1, keepdims=True)
    var = jnp.mean((x_BxTxD - mean) ** 2, axis=-1, keepdims=True)  # biased, as torch.nn.LayerNorm
    return (x_BxTxD - mean) / jnp.sqrt(var + TransformerBlock.LN_EPS) * gamma_D[None, None, :] + beta_D[None, None, :]


def _tokens_linear(x_BxTxI: Array, w_OxI: Array, b_O: Array) -> Array:
    """x W^T + b on every token (explicit broadcasting: the tests raise on rank promotion)."""
    return jnp.einsum("bti,oi->bto", x_BxTxI, w_OxI) + b_O[None, None, :]


def _transformer_block(block: Block, leaves: Tuple[Array, ...], x_BxTxD: Array, f: Callable[[Array], Array]) -> Array:
    """x + MHSA(LN_1(x)), then + MLP(LN_2(.)) with f inside the MLP (see dfa_core.TransformerBlock)."""
    g1, be1, w_qkv, b_qkv, w_o, b_o, g2, be2, w_1, b_1, w_2, b_2 = leaves
    bsz, t, d = x_BxTxD.shape
    heads = cast(TransformerBlock, block.layer).heads
    qkv_BxTx3D = _tokens_linear(_layer_norm(x_BxTxD, g1, be1), w_qkv, b_qkv)
    q, k, v = (
        qkv_BxTx3D[..., i * d : (i + 1) * d].reshape(bsz, t, heads, d // heads).transpose(0, 2, 1, 3) for i in range(3)
    )
    scores_BxHxTxT = jnp.einsum("bhte,bhse->bhts", q, k) / jnp.sqrt(jnp.asarray(d // heads, x_BxTxD.dtype))
    mixed_BxHxTxDh = jnp.einsum("bhts,bhse->bhte", jax.nn.softmax(scores_BxHxTxT, axis=-1), v)
    x1 = x_BxTxD + _tokens_linear(mixed_BxHxTxDh.transpose(0, 2, 1, 3).reshape(bsz, t, d), w_o, b_o)
    return x1 + _tokens_linear(f(_tokens_linear(_layer_norm(x1, g2, be2), w_1, b_1)), w_2, b_2)


def _user_block(block: Block, leaves: Tuple[Array, ...], u: Array, f: Callable[[Array], Array]) -> Array:
    """The user's pure apply(params, u), its params pytree rebuilt from ``leaves``."""
    del f
    layer = cast(UserBlock, block.layer)
    if layer.backend != "jax":
        raise TypeError(f"this UserBlock was built for {layer.backend}; dfa_jax runs (init, apply) pairs only")
    _, apply = cast(Tuple[Callable[..., Any], Callable[..., Array]], layer.fn)
    return apply(jax.tree_util.tree_unflatten(_user_treedef(layer, block.u_shape), list(leaves)), u)


def _user_example(u_shape: Tuple[int, ...]) -> Any:
    return jax.ShapeDtypeStruct((1, *u_shape), jnp.float32)


def _user_treedef(layer: UserBlock, u_shape: Tuple[int, ...]) -> Any:
    init, _ = cast(Tuple[Callable[..., Any], Callable[..., Array]], layer.fn)
    return jax.tree_util.tree_structure(jax.eval_shape(init, jax.random.PRNGKey(0), _user_example(u_shape)))


def user_block(fn: Any, out_activation: Optional[str] = None) -> UserBlock:
    """A pure JAX ``(init, apply)`` pair as one block of a ModelSpec (one feedback point at its output).

    ``init(key, x)`` returns a params pytree for an example input x (1, *u_shape) and
    ``apply(params, u)`` maps (batch, *u_shape) to (batch, *a_shape): a Flax module's
    ``(module.init, module.apply)`` fits. The pytree's leaves, in ``jax.tree_util`` order, are
    the block's flat params; ``init_params`` calls init with ``jax.random.PRNGKey`` of a seed
    drawn from its own.

    Args:
      fn: the (init, apply) pair.
      out_activation: h = out_activation(a); None: the spec's f.

    Returns:
      A dfa_core.model.UserBlock for dfa_jax.

    Raises:
      TypeError: fn is not a pair of callables.
    """
    if not (isinstance(fn, tuple) and len(fn) == 2 and all(callable(g) for g in fn)):
        raise TypeError(f"user_block on jax needs a pure (init, apply) pair of callables, got {fn!r}")
    init_fn, apply_fn = fn

    def describe(u_shape: Tuple[int, ...]) -> Tuple[Tuple[int, ...], Tuple[Tuple[int, ...], ...], Tuple[str, ...]]:
        params = jax.eval_shape(init_fn, jax.random.PRNGKey(0), _user_example(u_shape))
        a = jax.eval_shape(apply_fn, params, _user_example(u_shape))
        paths = jax.tree_util.tree_flatten_with_path(params)[0]
        names = tuple(jax.tree_util.keystr(path) for path, _ in paths)
        return tuple(a.shape[1:]), tuple(tuple(leaf.shape) for _, leaf in paths), names

    def init(u_shape: Tuple[int, ...], seed: int) -> Tuple[Any, ...]:
        params = init_fn(jax.random.PRNGKey(seed), jnp.zeros((1, *u_shape), jnp.float32))
        return tuple(np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(params))

    return UserBlock("jax", fn, describe, init, out_activation)


_BLOCK_LAYERS: dict[type, Tuple[Callable[..., Array], Callable[..., Tuple[Array, ...]]]] = {
    # type: (g(block, leaves, u, f), its VJP w.r.t. the flat leaves (block, leaves, u, delta, f))
    Dense: (_simple_block, _simple_block_vjp),
    Conv2d: (_simple_block, _simple_block_vjp),
    Sequential: (_composite_block, _autodiff_block_vjp),
    Residual: (_composite_block, _autodiff_block_vjp),
    TransformerBlock: (_transformer_block, _autodiff_block_vjp),
    UserBlock: (_user_block, _autodiff_block_vjp),
}


def _apply_block(block: Block, leaves: Tuple[Array, ...], u: Array, f: Callable[[Array], Array]) -> Array:
    """a_l = g_l(theta_l, u_l) for any block; f is the spec's activation (used inside composites)."""
    return _BLOCK_LAYERS[type(block.layer)][0](block, leaves, u, f)


def _block_vjp(
    block: Block, leaves: Tuple[Array, ...], u: Array, delta: Array, f: Callable[[Array], Array]
) -> Tuple[Array, ...]:
    """The VJP of g_l w.r.t. its flat params at input u (K, *u_shape), applied to delta (K, *a_shape)."""
    return _BLOCK_LAYERS[type(block.layer)][1](block, leaves, u, delta, f)


def _block_activations(spec: ModelSpec) -> Tuple[nn.Activation, ...]:
    """f_l per block: the spec's f, or a composite's own out_activation."""
    return tuple(nn.activation(block.out_activation(spec.activation)) for block in spec.blocks)


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
    acts = _block_activations(spec)
    h = x
    u: list[Array] = []
    a: list[Array] = []
    for l, (block, leaves) in enumerate(zip(spec.blocks, params)):
        if a:
            h = acts[l - 1].fn(a[-1])
        u.append(_apply_prefix(block.prefix, h))
        a.append(_apply_block(block, leaves, u[-1], f))
    return BlockActivations(tuple(u), tuple(a), nn.output_function(spec.output)(a[-1]))


def _logits(spec: ModelSpec, params: Params, x: Array, eps: Optional[Tuple[Array, ...]] = None) -> Array:
    """a_L, (batch, n_L), without keeping the hidden activations.

    ``eps`` (one (batch, *a_shape_l) array per block) is added to each a_l: the gradient of the
    loss at eps = 0 is dLoss/da_l, backprop's teaching signal (``alignment`` reads it).
    """
    f = nn.activation(spec.activation).fn
    blocks = spec.blocks
    h = x
    for l, (block, act, leaves) in enumerate(zip(blocks[:-1], _block_activations(spec), params[:-1])):
        a = _apply_block(block, leaves, _apply_prefix(block.prefix, h), f)
        h = act.fn(a if eps is None else a + eps[l])
    z = _apply_block(blocks[-1], params[-1], _apply_prefix(blocks[-1].prefix, h), f)
    return z if eps is None else z + eps[-1]


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


# -- hardware effects on the projection (dfa_core.hardware: quantised error, noise, a plug-in device) ------------


def _quantize(projection: Projection, e_KxO: Array) -> Array:
    """q = Q(e'): 'sign', 'ternary' (threshold t) or 'kbit:N' (per-batch scale max|e'|); see dfa_core.hardware."""
    if projection.quantize is None:
        return e_KxO
    if projection.quantize == "sign":
        return jnp.sign(e_KxO)
    if projection.quantize == "ternary":
        return jnp.where(jnp.abs(e_KxO) > projection.threshold, jnp.sign(e_KxO), jnp.zeros_like(e_KxO))
    m = float(cast(int, projection.levels))
    s = jnp.max(jnp.abs(e_KxO))
    s = jnp.where(s > 0, s, jnp.ones_like(s))  # e' = 0 rounds to 0 whatever the scale
    return jnp.round(e_KxO * (m / s)) * (s / m)


def present_rows(mode: str, y_BxO: Array) -> Optional[Array]:
    """(K,) 1 for the classes present in y and 0 for the absent ones in 'class_mean' (their all-zero
    rows get no noise); None in the other modes, where every row is a real group."""
    if mode != "class_mean":
        return None
    members_BxC = jax.nn.one_hot(jnp.argmax(y_BxO, axis=1), y_BxO.shape[1], dtype=y_BxO.dtype)
    return (jnp.sum(members_BxC, axis=0) > 0).astype(y_BxO.dtype)


def _device_projections(projection: Projection, q_KxO: Array, sizes: Tuple[int, ...]) -> Tuple[Array, ...]:
    """The plug-in device's (q B_1^T, ..., q B_{L-1}^T) through ``jax.pure_callback``: it runs on the host,
    outside the compiled program, once per call of the step (JAX may repeat or drop a pure callback, so
    the device should answer as a function of q). Shapes and dtype are checked on the host.

    XLA may run the callback on a thread of its own, where JAX's float64 switch (thread-local) is off
    and float64 arrays crossing the callback would be cast to float32 both ways; float64 therefore
    crosses it bit for bit as pairs of uint32 (``_to_words``), which no switch touches.
    """
    shapes = tuple((q_KxO.shape[0], n) for n in sizes)
    dtype = np.dtype(q_KxO.dtype)
    wide = dtype == np.float64
    word = jnp.uint32 if wide else dtype
    result = tuple(jax.ShapeDtypeStruct(shape + ((2,) if wide else ()), word) for shape in shapes)
    device = cast(Callable[[np.ndarray], Any], projection.device)

    def host(q: Any) -> Tuple[np.ndarray, ...]:
        q_np = np.ascontiguousarray(q).view(np.float64)[..., 0] if wide else np.asarray(q)
        out = hardware.check_device_output(device(q_np), shapes)
        if wide:
            return tuple(np.ascontiguousarray(p, dtype=np.float64)[..., None].view(np.uint32) for p in out)
        return tuple(np.asarray(p, dtype=dtype) for p in out)

    operand = lax.bitcast_convert_type(q_KxO, jnp.uint32) if wide else q_KxO
    outs = jax.pure_callback(host, result, operand, vmap_method="sequential")
    return tuple(lax.bitcast_convert_type(o, jnp.float64) if wide else o for o in outs)


def _standard_normal(key: Any, shapes: Tuple[Tuple[int, int], ...], dtype: Any) -> Tuple[Array, ...]:
    """z_l ~ N(0, 1), one array per projection, from jax.random.split(key, L - 1) in block order."""
    keys = jax.random.split(key, len(shapes))
    return tuple(jax.random.normal(keys[l], shape, dtype) for l, shape in enumerate(shapes))


def hardware_projections(
    projection: Projection,
    feedback: Feedback,
    e_KxO: Array,
    count: Optional[Any],
    present_K: Optional[Array],
    noise: Optional[Tuple[Array, ...]],
    key: Optional[Any],
) -> Tuple[Array, ...]:
    """(p_1, ..., p_{L-1}), p_l (K, size_l): DFA's projections as the hardware computes them.

    q = Q(e'); p_l = q B_l^T (or device(q)[l]); additive noise p_l + max|q| (mu + sigma z_l) or
    multiplicative p_l (1 + mu + sigma z_l); then p_l / K for reduction 'mean' (the equations of
    dfa_core.hardware).

    Args:
      projection: an active dfa_core.hardware.Projection.
      feedback: (B_1, ..., B_{L-1}), B_l (size_l, n_L).
      e_KxO: the grouped error e' before reduction 'mean''s 1/K, (K, n_L).
      count: K to divide by (reduction 'mean'), or None.
      present_K: ``present_rows`` (class_mean), or None.
      noise: explicit z_l, each (K, size_l) or (K, *a_shape_l), or None.
      key: a JAX PRNG key to draw z_l from (``_standard_normal``) when noise is None.

    Returns:
      The projections, each (K, size_l).
    """
    if not feedback:
        return ()
    q = _quantize(projection, e_KxO)
    sizes = tuple(b.shape[0] for b in feedback)
    if projection.device is None:
        p = [q @ b.T for b in feedback]
    else:
        p = list(_device_projections(projection, q, sizes))
        if present_K is not None:  # whatever the device answers for an absent class's zero row, it adds nothing
            p = [p_l * present_K[:, None] for p_l in p]
    if projection.noise is not None:
        shapes = tuple((q.shape[0], n) for n in sizes)
        if noise is None:
            z = _standard_normal(key, shapes, q.dtype)
        else:
            z = tuple(z_l.reshape(shape) for z_l, shape in zip(noise, shapes))
        if projection.noise == "additive":
            peak = jnp.max(jnp.abs(q))
            added = [peak * (projection.mu + projection.sigma * z_l) for z_l in z]
            if present_K is not None:  # absent classes' zero rows stay zero
                added = [n_l * present_K[:, None] for n_l in added]
            p = [p_l + n_l for p_l, n_l in zip(p, added)]
        else:  # absent classes' rows are zero, and stay so
            p = [p_l * (1 + projection.mu + projection.sigma * z_l) for p_l, z_l in zip(p, z)]
    if count is not None:
        p = [p_l / count for p_l in p]
    return tuple(p)


# -- DFA and BP ----------------------------------------------------------------------------------


def _class_grouping(y_BxC: Array) -> Array:
    """G for 'class_mean': row c averages the samples whose argmax label is c; (C, batch).

    Rows of classes absent from the batch are all zero, so they add nothing to the
    sum-reduced gradients; shapes stay static under jit.
    """
    members_BxC = jax.nn.one_hot(jnp.argmax(y_BxC, axis=1), y_BxC.shape[1], dtype=y_BxC.dtype)
    counts_C = jnp.sum(members_BxC, axis=0)
    return members_BxC.T / jnp.maximum(counts_C, 1)[:, None]


def _grouping(mode: str, y_BxO: Array) -> Tuple[Optional[Callable[[Array], Array]], Any]:
    """(avg, K): t (batch, ...) -> G t (K, ...) for ``mode`` (None for 'sample') and K; MLPs and
    blocks alike ('class_mean': K counts the classes present, ``_class_grouping``)."""
    if mode == "sample":
        return None, y_BxO.shape[0]
    if mode == "batch_mean":
        return (lambda t: jnp.mean(t, axis=0, keepdims=True)), 1
    if mode != "class_mean":
        raise ValueError(f"unknown mode {mode!r}")
    g_CxB = _class_grouping(y_BxO)

    def avg(t: Array) -> Array:  # G over the batch axis, whatever the trailing shape
        return (g_CxB @ t.reshape(t.shape[0], -1)).reshape(g_CxB.shape[0], *t.shape[1:])

    return avg, jnp.sum(jnp.any(g_CxB > 0, axis=1)).astype(y_BxO.dtype)


def dfa_grads_and_loss(
    spec: ModelSpec,
    params: Params,
    feedback: Feedback,
    x: Array,
    y: Array,
    mode: str,
    projection: Optional[Projection] = None,
    noise: Optional[Tuple[Array, ...]] = None,
    key: Optional[Any] = None,
) -> Tuple[Grads, Array]:
    """DFA gradients of every block and the batch loss: ``dfa_signals`` without the deltas."""
    grads, batch_loss, _ = dfa_signals(spec, params, feedback, x, y, mode, projection=projection, noise=noise, key=key)
    return grads, batch_loss


def dfa_signals(
    spec: ModelSpec,
    params: Params,
    feedback: Feedback,
    x: Array,
    y: Array,
    mode: str,
    keep_deltas: bool = False,
    projection: Optional[Projection] = None,
    noise: Optional[Tuple[Array, ...]] = None,
    key: Optional[Any] = None,
) -> Tuple[Grads, Array, Tuple[Array, ...]]:
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

      keep_deltas: also return the teaching signals (``alignment`` compares them with BP's).
      projection: hardware effects on e' B_l^T (dfa_core.hardware.Projection); None: exact.
      noise: the projection noise's standard-normal draws, one (K, size_l) array per hidden block.
      key: a JAX PRNG key to draw them from inside the step instead (one split per hidden block).

    Returns:
      (per block the gradients of its flat params, shaped like params; loss (); with
      keep_deltas (delta_1, ..., delta_{L-1}, e'), delta_l (K, *a_shape_l), else ()).
    """
    hw = hardware.active(projection)
    hardware.check_noise_source(hw, noise, key)
    f = nn.activation(spec.activation).fn
    acts = _block_activations(spec)
    blocks = spec.blocks
    avg, count = _grouping(mode, y)
    keep = (lambda t: t) if avg is None else avg
    kept_u, kept_a = [], []
    h = x
    for block, act, leaves in zip(blocks[:-1], acts, params[:-1]):
        u = _apply_prefix(block.prefix, h)
        kept_u.append(keep(u))
        a = _apply_block(block, leaves, u, f)
        h = act.fn(a)
        # In 'sample' mode keep h = f(a): it determines f'(a) for every activation offered
        # (as dfa_jax.dfa does); the grouped modes need f' at the grouped a'.
        kept_a.append(h if avg is None else avg(a))
    u = _apply_prefix(blocks[-1].prefix, h)
    u_last = keep(u)
    z = _apply_block(blocks[-1], params[-1], u, f)
    batch_loss = reduce_loss(spec, z, y)
    y_hat = nn.output_function(spec.output)(z)
    e_raw = y_hat - y if avg is None else avg(y_hat) - avg(y)
    e = e_raw / count if spec.reduction == "mean" else e_raw
    projections: Optional[Tuple[Array, ...]] = None
    if hw is not None:
        scale_by = count if spec.reduction == "mean" else None
        projections = hardware_projections(hw, feedback, e_raw, scale_by, present_rows(mode, y), noise, key)
    deltas = [e]
    grads = [_block_vjp(blocks[-1], params[-1], u_last, e, f)]
    for l in reversed(range(len(blocks) - 1)):  # top first, as dfa_jax.dfa, to free memory early
        p_flat = e @ feedback[l].T if projections is None else projections[l]
        p = p_flat.reshape(e.shape[0], *blocks[l].a_shape)
        a_l = kept_a[l]
        fa = a_l if avg is None else acts[l].fn(a_l)
        delta = acts[l].backward(p, a_l, fa)
        if keep_deltas:
            deltas.append(delta)
        grads.append(_block_vjp(blocks[l], params[l], kept_u[l], delta, f))
    grads.reverse()
    return tuple(grads), batch_loss, tuple(reversed(deltas)) if keep_deltas else ()


def bp_grads_and_loss(spec: ModelSpec, params: Params, x: Array, y: Array) -> Tuple[Grads, Array]:
    """Backprop gradients of the loss through the whole model (jax.value_and_grad) and the loss."""
    batch_loss, grads = jax.value_and_grad(_loss, argnums=1)(spec, params, x, y)
    return grads, batch_loss


def _dfa_grads(
    spec: ModelSpec,
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


def _bp_grads(spec: ModelSpec, params: Params, x: Array, y: Array) -> Grads:
    TRACE_COUNTS["bp_grads"] += 1
    return bp_grads_and_loss(spec, params, x, y)[0]


dfa_grads_unchecked = jax.jit(_dfa_grads, static_argnames=("spec", "mode", "projection"))
"""DFA gradients on JAX arrays of spec.dtype, without validation; jitted per (spec, mode, projection)."""
bp_grads_unchecked = jax.jit(_bp_grads, static_argnames=("spec",))
"""BP gradients on JAX arrays of spec.dtype, without validation; jitted per spec."""


__all__ = [
    "BlockActivations",
    "TRACE_COUNTS",
    "bp_grads_and_loss",
    "bp_grads_unchecked",
    "dfa_grads_and_loss",
    "dfa_signals",
    "dfa_grads_unchecked",
    "hardware_projections",
    "present_rows",
    "reduce_loss",
    "user_block",
]
