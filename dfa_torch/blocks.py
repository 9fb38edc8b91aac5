"""Models of conv, pool and dense blocks (dfa_core.ModelSpec): forward, loss, DFA and BP (torch).

Block l computes u_l = prefix_l(h_{l-1}), a_l = g_l(theta_l, u_l), h_l = f(a_l) (see
``dfa_core.model``). DFA groups u_l and a_l, projects the grouped error onto each hidden
block's output, delta_l = reshape(e' B_l^T, (K, *a_shape_l)) * f'(a'_l), and takes the
block's parameter gradients as the vector-Jacobian product of g_l at (theta_l, u'_l):
exact backprop inside a block, no autograd graph between blocks. BP is reverse-mode
autodiff of the loss through the whole model.

The functions here take tensors of ``spec.dtype`` and do no validation; the checked
entry points (``dfa_torch.forward``, ``loss``, ``dfa_grads``, ``bp_grads``, ...) route a
ModelSpec here. This module imports neither ``dfa_torch.mlp`` nor ``dfa_torch.dfa`` (they
import it to dispatch); the grouping of a batch lives here and dfa_torch.dfa reads it.
"""

from __future__ import annotations

import collections
import copy
import functools
from typing import TYPE_CHECKING, Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, cast

import numpy as np
import torch
import torch.func
import torch.nn.functional as F

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
    user_block_shapes,
)
from dfa_core.tree import unflatten_pairs
from dfa_torch import nn
from dfa_torch.nn import reduce_loss

if TYPE_CHECKING:  # dfa_torch.parallel imports torch.distributed; only its type is read here
    from dfa_torch.parallel import Reducer

Tensor = torch.Tensor
Params = Tuple[Tuple[Tensor, ...], ...]  # per block (W_l, b_l), or a composite's flat leaves; spec.param_shapes
Grads = Tuple[Tuple[Tensor, ...], ...]
Feedback = Tuple[Tensor, ...]  # (B_1, ..., B_{L-1}), B_l (a_size_l, n_L)


TRACE_COUNTS: collections.Counter[str] = collections.Counter()
"""Kept for symmetry with dfa_jax.blocks (torch eager code is never traced)."""


class BlockActivations(NamedTuple):
    """What a training forward pass keeps, per block (h_l = f(a_l) is not kept)."""

    u: Tuple[Tensor, ...]  # block inputs u_1..u_L, u_l = prefix_l(h_{l-1}): (batch, *u_shape_l)
    a: Tuple[Tensor, ...]  # block outputs a_1..a_L: (batch, *a_shape_l); a_L are the logits (batch, n_L)
    y_hat: Tensor  # out(a_L): (batch, n_L)


# -- layers: one table entry per layer type ----------------------------------------------------------


def _max_pool(layer: MaxPool2d, h_BxCxHxW: Tensor) -> Tensor:
    return F.max_pool2d(h_BxCxHxW, layer.size)  # stride = kernel, ceil_mode=False: floor


def _avg_pool(layer: AvgPool2d, h_BxCxHxW: Tensor) -> Tensor:
    return F.avg_pool2d(h_BxCxHxW, layer.size)


def _flatten(layer: Flatten, h: Tensor) -> Tensor:
    del layer
    return h.reshape(h.shape[0], -1)  # row-major: (C, H, W) order


_PREFIX_LAYERS: dict[type, Callable[[Any, Tensor], Tensor]] = {
    MaxPool2d: _max_pool,
    AvgPool2d: _avg_pool,
    Flatten: _flatten,
}


def _max_pool_forward_only(layer: MaxPool2d, h_BxCxHxW: Tensor) -> Tensor:
    # The same maxima as F.max_pool2d, as an elementwise max over the size^2 strided views: on
    # CPU about 7x faster than max_pool2d's index-tracking kernel, which DFA's forward never needs
    # (no gradient crosses a prefix). Not for autograd: torch.maximum splits ties, max_pool2d does not.
    k = layer.size
    ho, wo = h_BxCxHxW.shape[2] // k, h_BxCxHxW.shape[3] // k
    out = h_BxCxHxW[:, :, 0 : ho * k : k, 0 : wo * k : k]
    for p in range(k):
        for q in range(k):
            if p or q:
                out = torch.maximum(out, h_BxCxHxW[:, :, p : ho * k : k, q : wo * k : k])
    return out


_PREFIX_LAYERS_FORWARD_ONLY: dict[type, Callable[[Any, Tensor], Tensor]] = {
    **_PREFIX_LAYERS,
    MaxPool2d: _max_pool_forward_only,
}
"""The prefix layers for DFA's forward pass, which takes no gradient through them."""


def _dense(layer: Dense, w_OxI: Tensor, b_O: Tensor, u_BxI: Tensor) -> Tensor:
    del layer
    return torch.addmm(b_O, u_BxI, w_OxI.T)  # as dfa_torch.mlp._linear, so Dense models match MLPs


def _conv(layer: Conv2d, w_OxIxKxK: Tensor, b_O: Tensor, u_BxIxHxW: Tensor) -> Tensor:
    return F.conv2d(u_BxIxHxW, w_OxIxKxK, b_O, stride=layer.stride, padding=layer.pad)


def _dense_vjp(layer: Dense, w: Tensor, b: Tensor, u_KxI: Tensor, delta_KxO: Tensor) -> Tuple[Tensor, Tensor]:
    # The VJP of _dense in closed form: no second forward pass, and dfa_torch.dfa's products.
    del layer, w, b
    return delta_KxO.T @ u_KxI, torch.sum(delta_KxO, dim=0)


def _conv_vjp(layer: Conv2d, w: Tensor, b: Tensor, u_KxIxHxW: Tensor, delta_KxOxHxW: Tensor) -> Tuple[Tensor, Tensor]:
    # The conv weight gradient by aten's convolution_backward (what autograd itself calls), asking
    # only for gW and gb: no second forward pass, as torch.func.vjp would run.
    del b
    _, gw, gb = torch.ops.aten.convolution_backward(
        delta_KxOxHxW,
        u_KxIxHxW,
        w,
        [w.shape[0]],
        [layer.stride, layer.stride],
        [layer.pad, layer.pad],
        [1, 1],
        False,
        [0, 0],
        1,
        [False, True, True],
    )
    return gw, gb


_PARAM_LAYERS: dict[type, Tuple[Callable[..., Tensor], Callable[..., Tuple[Tensor, Tensor]]]] = {
    # type: (g(layer, W, b, u), its (W, b) VJP (layer, W, b, u, delta))
    Dense: (_dense, _dense_vjp),
    Conv2d: (_conv, _conv_vjp),
}


def _apply_prefix(prefix: Tuple[Layer, ...], h: Tensor) -> Tensor:
    """u = prefix(h): the block's parameter-free layers in order, (batch, *in_shape) -> (batch, *u_shape)."""
    for layer in prefix:
        h = _PREFIX_LAYERS[type(layer)](layer, h)
    return h


def _apply_prefix_forward_only(prefix: Tuple[Layer, ...], h: Tensor) -> Tensor:
    """``_apply_prefix`` for DFA's forward pass, which takes no gradient through the prefix (torch only:
    XLA compiles JAX's pools already)."""
    for layer in prefix:
        h = _PREFIX_LAYERS_FORWARD_ONLY[type(layer)](layer, h)
    return h


def _apply_layer(layer: Layer, w: Tensor, b: Tensor, u: Tensor) -> Tensor:
    """a = g(theta, u) for a Dense or Conv2d layer: (batch, *u_shape) -> (batch, *a_shape)."""
    return _PARAM_LAYERS[type(layer)][0](layer, w, b, u)


def _layer_vjp(layer: Layer, w: Tensor, b: Tensor, u: Tensor, delta: Tensor) -> Tuple[Tensor, Tensor]:
    """(gW, gb): the VJP of g(., ., u) w.r.t. (W, b) applied to delta (K, *a_shape); u (K, *u_shape).

    For Dense this is (delta^T u, sum_rows delta); for Conv2d the convolution weight and bias
    gradients (aten's ``convolution_backward``). Builds no autograd graph.
    """
    return _PARAM_LAYERS[type(layer)][1](layer, w, b, u, delta)


# -- composite blocks: one feedback point at the output, exact backprop inside -----------------------


def _composite(plan: CompositePlan, leaves: Tuple[Tensor, ...], u: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
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


def _simple_block(block: Block, leaves: Tuple[Tensor, ...], u: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
    del f
    return _apply_layer(block.layer, leaves[0], leaves[1], u)


def _simple_block_vjp(
    block: Block, leaves: Tuple[Tensor, ...], u: Tensor, delta: Tensor, f: Callable[[Tensor], Tensor]
) -> Tuple[Tensor, ...]:
    del f
    return tuple(_layer_vjp(block.layer, leaves[0], leaves[1], u, delta))


def _composite_block(block: Block, leaves: Tuple[Tensor, ...], u: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
    return _composite(cast(CompositePlan, block.plan), leaves, u, f)


def _autodiff_block_vjp(
    block: Block, leaves: Tuple[Tensor, ...], u: Tensor, delta: Tensor, f: Callable[[Tensor], Tensor]
) -> Tuple[Tensor, ...]:
    # torch.func.vjp is a function transform: it differentiates even under the caller's
    # no_grad, and the graph it builds lives only inside this call.
    pullback = torch.func.vjp(lambda *ls: _BLOCK_LAYERS[type(block.layer)][0](block, ls, u, f), *leaves)[1]
    return tuple(pullback(delta))


def _layer_norm(x_BxTxD: Tensor, gamma_D: Tensor, beta_D: Tensor) -> Tensor:
    mean = torch.mean(x_BxTxD, dim=-1, keepdim=True)
    var = torch.mean((x_BxTxD - mean) ** 2, dim=-1, keepdim=True)  # biased, as torch.nn.LayerNorm
    return (x_BxTxD - mean) / torch.sqrt(var + TransformerBlock.LN_EPS) * gamma_D + beta_D


def _transformer_block(
    block: Block, leaves: Tuple[Tensor, ...], x_BxTxD: Tensor, f: Callable[[Tensor], Tensor]
) -> Tensor:
    """x + MHSA(LN_1(x)), then + MLP(LN_2(.)) with f inside the MLP (see dfa_core.TransformerBlock)."""
    g1, be1, w_qkv, b_qkv, w_o, b_o, g2, be2, w_1, b_1, w_2, b_2 = leaves
    bsz, t, d = x_BxTxD.shape
    heads = cast(TransformerBlock, block.layer).heads
    qkv_BxTx3D = _layer_norm(x_BxTxD, g1, be1) @ w_qkv.T + b_qkv
    q, k, v = (
        qkv_BxTx3D[..., i * d : (i + 1) * d].reshape(bsz, t, heads, d // heads).permute(0, 2, 1, 3) for i in range(3)
    )
    scores_BxHxTxT = q @ k.transpose(2, 3) / torch.sqrt(torch.tensor(d // heads, dtype=x_BxTxD.dtype))
    mixed_BxHxTxDh = torch.softmax(scores_BxHxTxT, dim=-1) @ v
    x1 = x_BxTxD + mixed_BxHxTxDh.permute(0, 2, 1, 3).reshape(bsz, t, d) @ w_o.T + b_o
    return x1 + f(_layer_norm(x1, g2, be2) @ w_1.T + b_1) @ w_2.T + b_2


def _user_block(block: Block, leaves: Tuple[Tensor, ...], u: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
    """The user's nn.Module on u, its parameters replaced by ``leaves`` (torch.func.functional_call)."""
    del f
    layer = cast(UserBlock, block.layer)
    if layer.backend != "torch":
        raise TypeError(f"this UserBlock was built for {layer.backend}; dfa_torch runs torch nn.Modules only")
    names = user_block_shapes(layer, block.u_shape)[2]
    return torch.func.functional_call(cast(torch.nn.Module, layer.fn), dict(zip(names, leaves)), (u,))


def user_block(fn: Any, out_activation: Optional[str] = None) -> UserBlock:
    """A torch ``nn.Module`` as one block of a ModelSpec (one feedback point at its output).

    The module maps (batch, *u_shape) to (batch, *a_shape); its parameters (``named_parameters``
    order) are the block's flat params, run through ``torch.func.functional_call``. Buffers are
    read from the module as they are (keep it free of training-time state such as BatchNorm's).
    ``init_params`` draws the params as the module's own ``reset_parameters`` do (torch.nn's
    default init), on a copy and under a torch RNG seeded from init_params' seed.

    Args:
      fn: the torch.nn.Module.
      out_activation: h = out_activation(a); None: the spec's f.

    Returns:
      A dfa_core.model.UserBlock for dfa_torch.

    Raises:
      TypeError: fn is not an nn.Module or has no parameters.
    """
    if not isinstance(fn, torch.nn.Module):
        raise TypeError(f"user_block on torch needs a torch.nn.Module, got {type(fn).__name__}")
    names = tuple(name for name, _ in fn.named_parameters())
    if not names:
        raise TypeError(f"user_block: the module {type(fn).__name__} has no parameters to train")

    def describe(u_shape: Tuple[int, ...]) -> Tuple[Tuple[int, ...], Tuple[Tuple[int, ...], ...], Tuple[str, ...]]:
        params: dict[str, Tensor] = dict(fn.named_parameters())
        dtype = next(iter(params.values())).dtype
        with torch.no_grad():
            a = torch.func.functional_call(fn, params, (torch.zeros((1, *u_shape), dtype=dtype),))
        return tuple(a.shape[1:]), tuple(tuple(p.shape) for p in params.values()), names

    def init(u_shape: Tuple[int, ...], seed: int) -> Tuple[Any, ...]:
        del u_shape
        fresh = copy.deepcopy(fn)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in fresh.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
        return tuple(p.detach().cpu().numpy().copy() for p in fresh.parameters())

    return UserBlock("torch", fn, describe, init, out_activation)


_BLOCK_LAYERS: dict[type, Tuple[Callable[..., Tensor], Callable[..., Tuple[Tensor, ...]]]] = {
    # type: (g(block, leaves, u, f), its VJP w.r.t. the flat leaves (block, leaves, u, delta, f))
    Dense: (_simple_block, _simple_block_vjp),
    Conv2d: (_simple_block, _simple_block_vjp),
    Sequential: (_composite_block, _autodiff_block_vjp),
    Residual: (_composite_block, _autodiff_block_vjp),
    TransformerBlock: (_transformer_block, _autodiff_block_vjp),
    UserBlock: (_user_block, _autodiff_block_vjp),
}


def _apply_block(block: Block, leaves: Tuple[Tensor, ...], u: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
    """a_l = g_l(theta_l, u_l) for any block; f is the spec's activation (used inside composites)."""
    return _BLOCK_LAYERS[type(block.layer)][0](block, leaves, u, f)


def _block_vjp(
    block: Block, leaves: Tuple[Tensor, ...], u: Tensor, delta: Tensor, f: Callable[[Tensor], Tensor]
) -> Tuple[Tensor, ...]:
    """The VJP of g_l w.r.t. its flat params at input u (K, *u_shape), applied to delta (K, *a_shape)."""
    return _BLOCK_LAYERS[type(block.layer)][1](block, leaves, u, delta, f)


@functools.lru_cache(maxsize=None)
def _block_activations(spec: ModelSpec) -> Tuple[nn.Activation, ...]:
    """f_l per block: the spec's f, or a composite's own out_activation (cached per spec)."""
    return tuple(nn.activation(block.out_activation(spec.activation)) for block in spec.blocks)


@functools.lru_cache(maxsize=None)
def _blocks(spec: ModelSpec) -> Tuple[Block, ...]:
    """spec.blocks, cached: the property re-derives every shape, and eager torch calls it per batch."""
    return spec.blocks


# -- forward and loss --------------------------------------------------------------------------------


def _forward_with_activations(spec: ModelSpec, params: Params, x: Tensor) -> BlockActivations:
    """Every block's u_l = prefix_l(h_{l-1}) and a_l = g_l(theta_l, u_l), and y_hat = out(a_L).

    Args:
      spec: the model.
      params: ((W_1, b_1), ..., (W_L, b_L)), shapes spec.param_shapes.
      x: inputs, (batch, *spec.input_shape).

    Returns:
      BlockActivations(u, a, y_hat).
    """
    f = nn.activation(spec.activation).fn
    acts = _block_activations(spec)
    blocks = _blocks(spec)
    h, u, a = x, [], []
    for l, (block, leaves) in enumerate(zip(blocks, params)):
        u.append(_apply_prefix(block.prefix, h))
        a.append(_apply_block(block, leaves, u[-1], f))
        if l < len(blocks) - 1:
            h = acts[l].fn(a[-1])
    return BlockActivations(tuple(u), tuple(a), nn.output_function(spec.output)(a[-1]))


def _logits(spec: ModelSpec, params: Params, x: Tensor, eps: Optional[Tuple[Tensor, ...]] = None) -> Tensor:
    """a_L, (batch, n_L), without keeping the hidden activations.

    ``eps`` (one (batch, *a_shape_l) array per block) is added to each a_l: the gradient of the
    loss at eps = 0 is dLoss/da_l, backprop's teaching signal (``alignment`` reads it).
    """
    f = nn.activation(spec.activation).fn
    blocks = _blocks(spec)
    h = x
    for l, (block, act, leaves) in enumerate(zip(blocks[:-1], _block_activations(spec), params[:-1])):
        a = _apply_block(block, leaves, _apply_prefix(block.prefix, h), f)
        h = act.fn(a if eps is None else a + eps[l])
    z = _apply_block(blocks[-1], params[-1], _apply_prefix(blocks[-1].prefix, h), f)
    return z if eps is None else z + eps[-1]


def _forward(spec: ModelSpec, params: Params, x: Tensor) -> Tensor:
    """y_hat = out(a_L), (batch, n_L)."""
    return nn.output_function(spec.output)(_logits(spec, params, x))


def _loss(spec: ModelSpec, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """The loss paired with spec.output, from logits, reduced by spec.reduction: ()."""
    return reduce_loss(spec, _logits(spec, params, x), y)


# No jit on torch: ``dfa_torch.mlp``'s public forward, logits, loss and forward_with_activations
# route a ModelSpec to the underscored functions above after casting (dfa_jax.blocks jits them).


# -- hardware effects on the projection (dfa_core.hardware: quantised error, noise, a plug-in device) ------------


def _quantize(projection: Projection, e_KxO: Tensor) -> Tensor:
    """q = Q(e'): 'sign', 'ternary' (threshold t) or 'kbit:N' (per-batch scale max|e'|); see dfa_core.hardware."""
    if projection.quantize is None:
        return e_KxO
    if projection.quantize == "sign":
        return torch.sign(e_KxO)
    if projection.quantize == "ternary":
        return torch.where(torch.abs(e_KxO) > projection.threshold, torch.sign(e_KxO), torch.zeros_like(e_KxO))
    m = float(cast(int, projection.levels))
    s = torch.max(torch.abs(e_KxO))
    s = torch.where(s > 0, s, torch.ones_like(s))  # e' = 0 rounds to 0 whatever the scale
    return torch.round(e_KxO * (m / s)) * (s / m)


def present_rows(mode: str, y_BxO: Tensor) -> Optional[Tensor]:
    """(K,) 1 for the classes present in y and 0 for the absent ones in 'class_mean' (their all-zero
    rows get no noise); None in the other modes, where every row is a real group."""
    if mode != "class_mean":
        return None
    members_BxC = F.one_hot(torch.argmax(y_BxO, dim=1), y_BxO.shape[1]).to(y_BxO.dtype)
    return (torch.sum(members_BxC, dim=0) > 0).to(y_BxO.dtype)


def _device_projections(projection: Projection, q_KxO: Tensor, sizes: Tuple[int, ...]) -> Tuple[Tensor, ...]:
    """The plug-in device's (q B_1^T, ..., q B_{L-1}^T): a plain call on the host with q as NumPy (copied
    off the GPU if need be); its answers come back as tensors of q's dtype on q's device."""
    shapes = tuple((q_KxO.shape[0], n) for n in sizes)
    device = cast(Callable[[np.ndarray], Any], projection.device)
    q_np = q_KxO.detach().cpu().numpy()
    out = hardware.check_device_output(device(q_np), shapes)
    return tuple(torch.as_tensor(np.asarray(p, dtype=q_np.dtype), device=q_KxO.device) for p in out)


def _generator(key: Any, device: torch.device) -> torch.Generator:
    """A torch.Generator from key: the Generator itself (its state advances), or a new one seeded with an int."""
    if isinstance(key, torch.Generator):
        return key
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
        raise TypeError(f"key must be a torch.Generator or an int seed on torch, got {type(key).__name__}")
    return torch.Generator(device=device).manual_seed(int(key))


def _standard_normal(key: Any, shapes: Tuple[Tuple[int, int], ...], like: Tensor) -> Tuple[Tensor, ...]:
    """z_l ~ N(0, 1), one tensor per projection in block order, from one generator (``_generator``)."""
    gen = _generator(key, like.device)
    return tuple(torch.randn(shape, generator=gen, dtype=like.dtype, device=like.device) for shape in shapes)


def hardware_projections(
    projection: Projection,
    feedback: Feedback,
    e_KxO: Tensor,
    count: Optional[Any],
    present_K: Optional[Tensor],
    noise: Optional[Tuple[Tensor, ...]],
    key: Optional[Any],
) -> Tuple[Tensor, ...]:
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
      key: a torch.Generator or int seed to draw z_l from (``_standard_normal``) when noise is None.

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
            z = _standard_normal(key, shapes, q)
        else:
            z = tuple(z_l.reshape(shape) for z_l, shape in zip(noise, shapes))
        if projection.noise == "additive":
            peak = torch.max(torch.abs(q))
            added = [peak * (projection.mu + projection.sigma * z_l) for z_l in z]
            if present_K is not None:  # absent classes' zero rows stay zero
                added = [n_l * present_K[:, None] for n_l in added]
            p = [p_l + n_l for p_l, n_l in zip(p, added)]
        else:  # absent classes' rows are zero, and stay so
            p = [p_l * (1 + projection.mu + projection.sigma * z_l) for p_l, z_l in zip(p, z)]
    if count is not None:
        p = [p_l / count for p_l in p]
    return tuple(p)


# -- DFA ---------------------------------------------------------------------------------------------


def _class_grouping(y_BxC: Tensor) -> Tensor:
    """G for 'class_mean': row c averages the samples whose argmax label is c; (C, batch).

    Rows of classes absent from the batch are all zero, so they add nothing to the
    sum-reduced gradients; shapes stay fixed, as on JAX.
    """
    members_BxC = F.one_hot(torch.argmax(y_BxC, dim=1), y_BxC.shape[1]).to(y_BxC.dtype)
    counts_C = torch.sum(members_BxC, dim=0)
    return members_BxC.T / torch.clamp_min(counts_C, 1)[:, None]


def _grouping(mode: str, y: Tensor) -> Tuple[Optional[Callable[[Tensor], Tensor]], Any]:
    """(avg, K): t (batch, *shape) -> G t (K, *shape) for ``mode`` (None for 'sample'), and K; MLPs
    and blocks alike ('class_mean': K counts the classes present, ``_class_grouping``)."""
    if mode == "sample":
        return None, y.shape[0]
    if mode == "batch_mean":
        return (lambda t: torch.mean(t, dim=0, keepdim=True)), 1
    if mode != "class_mean":
        raise ValueError(f"mode must be one of ['sample', 'batch_mean', 'class_mean'], got {mode!r}")
    g_CxB = _class_grouping(y)

    def avg(t: Tensor) -> Tensor:  # G over the batch axis, whatever the trailing shape
        return (g_CxB @ t.reshape(t.shape[0], -1)).reshape(g_CxB.shape[0], *t.shape[1:])

    return avg, torch.sum(torch.any(g_CxB > 0, dim=1)).to(y.dtype)


GroupMeans = Callable[[Sequence[Tensor], Tensor], Tuple[List[Tensor], Any, Tensor]]
"""``_shard_grouping``'s second function: (group sums, extra) -> (G t of each, K, extra summed)."""


def _shard_grouping(mode: str, y: Tensor, reducer: Reducer) -> Tuple[Callable[[Tensor], Tensor], GroupMeans]:
    """The grouping of a global batch ('batch_mean' or 'class_mean') when y (rows, n_L) is one
    process's shard of it (rows may be 0), in ONE all-reduce for any number of grouped tensors.

    Returns:
      (sums, means): ``sums(t)``, t (rows, *shape), is this shard's group sums (K, *shape), no
      communication; ``means(sums_list, extra)`` all-reduces every sum, the class counts and
      ``extra`` (e.g. the loss sum) in one buffer and returns (G t of each, (K, *shape) of the
      global batch; K; extra summed over the processes), the same on every process.
    """
    if mode == "batch_mean":
        sums = lambda t: torch.sum(t, dim=0, keepdim=True)
        counts_C: Optional[Tensor] = None
    elif mode == "class_mean":
        members_BxC = F.one_hot(torch.argmax(y, dim=1), y.shape[1]).to(y.dtype)
        counts_C = torch.sum(members_BxC, dim=0)
        # flatten, not reshape(rows, -1): t may have 0 rows
        sums = lambda t: (members_BxC.T @ t.flatten(1)).reshape(members_BxC.shape[1], *t.shape[1:])
    else:
        raise ValueError(f"grouped mode 'batch_mean' or 'class_mean' expected, got {mode!r}")

    def means(group_sums: Sequence[Tensor], extra: Tensor) -> Tuple[List[Tensor], Any, Tensor]:
        parts = [*group_sums, extra, *(() if counts_C is None else (counts_C,))]
        flat = reducer.psum(torch.cat([t.reshape(-1) for t in parts]))
        total = [v.view_as(t) for v, t in zip(torch.split(flat, [t.numel() for t in parts]), parts)]
        if counts_C is None:
            return [t / reducer.rows for t in total[: len(group_sums)]], 1, total[len(group_sums)]
        counts = total[-1]
        per_group = torch.clamp_min(counts, 1)
        grouped = [t / per_group.reshape(-1, *(1,) * (t.dim() - 1)) for t in total[: len(group_sums)]]
        return grouped, torch.sum(counts > 0).to(y.dtype), total[len(group_sums)]

    return sums, means


@torch.no_grad()
def dfa_grads_and_loss(
    spec: ModelSpec,
    params: Params,
    feedback: Feedback,
    x: Tensor,
    y: Tensor,
    mode: str,
    projection: Optional[Projection] = None,
    noise: Optional[Tuple[Tensor, ...]] = None,
    key: Optional[Any] = None,
) -> Tuple[Grads, Tensor]:
    """DFA gradients of every block and the batch loss: ``dfa_signals`` without the deltas."""
    grads, batch_loss, _ = dfa_signals(spec, params, feedback, x, y, mode, projection=projection, noise=noise, key=key)
    return grads, batch_loss


def dfa_signals(
    spec: ModelSpec,
    params: Params,
    feedback: Feedback,
    x: Tensor,
    y: Tensor,
    mode: str,
    keep_deltas: bool = False,
    projection: Optional[Projection] = None,
    noise: Optional[Tuple[Tensor, ...]] = None,
    key: Optional[Any] = None,
) -> Tuple[Grads, Tensor, Tuple[Tensor, ...]]:
    """DFA gradients and the batch loss of a ModelSpec in one pass (no graph between blocks).

    Keeps, per block, only the grouped u'_l and what f' needs: h_l = f(a_l) in 'sample'
    mode (h determines f' for every activation offered, as in ``dfa_torch.dfa``), the
    grouped a'_l otherwise. Reduction 'mean' scales e' by 1/K.

    Args:
      spec: the model.
      params: ((W_1, b_1), ..., (W_L, b_L)), spec.dtype, shapes spec.param_shapes.
      feedback: (B_1, ..., B_{L-1}), B_l: (a_size_l, n_L).
      x: inputs, (batch, *spec.input_shape).
      y: targets, (batch, n_L); one-hot rows for 'class_mean'.
      mode: 'sample', 'batch_mean' or 'class_mean'.

      keep_deltas: also return the teaching signals (``alignment`` compares them with BP's).
      projection: hardware effects on e' B_l^T (dfa_core.hardware.Projection); None: exact.
      noise: the projection noise's standard-normal draws, one (K, size_l) tensor per hidden block.
      key: a torch.Generator (or int seed) to draw them from in the step instead, block by block.

    Returns:
      (per block the gradients of its flat params, shaped like params; loss (); with
      keep_deltas (delta_1, ..., delta_{L-1}, e'), delta_l (K, *a_shape_l), else ()).
    """
    hw = hardware.active(projection)
    hardware.check_noise_source(hw, noise, key)
    f = nn.activation(spec.activation).fn
    acts = _block_activations(spec)
    blocks = _blocks(spec)
    avg, count = _grouping(mode, y)
    keep = (lambda t: t) if avg is None else avg
    kept_u: list[Any] = []  # u'_l per block; a slot is set to None once its update is formed
    kept_a: list[Any] = []  # h_l ('sample') or a'_l per hidden block
    h = x
    for block, act, leaves in zip(blocks[:-1], acts, params[:-1]):
        u = _apply_prefix_forward_only(block.prefix, h)
        kept_u.append(keep(u))
        a = _apply_block(block, leaves, u, f)
        h = act.fn(a)
        kept_a.append(h if avg is None else avg(a))
        del u, a  # free the full-batch tensors before the next block allocates its own
    u = _apply_prefix_forward_only(blocks[-1].prefix, h)
    kept_u.append(keep(u))
    z = _apply_block(blocks[-1], params[-1], u, f)
    del u, h
    batch_loss = reduce_loss(spec, z, y)
    y_hat = nn.output_function(spec.output)(z)
    e_raw = y_hat - y if avg is None else avg(y_hat) - avg(y)
    e = e_raw / count if spec.reduction == "mean" else e_raw
    projections: Optional[Tuple[Tensor, ...]] = None
    if hw is not None:
        scale_by = count if spec.reduction == "mean" else None
        projections = hardware_projections(hw, feedback, e_raw, scale_by, present_rows(mode, y), noise, key)
    deltas = [e]
    grads = [_block_vjp(blocks[-1], params[-1], kept_u.pop(), e, f)]  # delta_L = e'
    for l in reversed(range(len(blocks) - 1)):  # top first, as dfa_torch.dfa, to free memory early
        p_flat = e @ feedback[l].T if projections is None else projections[l]
        p = p_flat.reshape(e.shape[0], *blocks[l].a_shape)
        a_l, u_l = kept_a[l], kept_u[l]
        kept_a[l] = kept_u[l] = None
        fa = a_l if avg is None else acts[l].fn(a_l)  # in 'sample' mode a_l holds h, which stands in for a in f'
        delta = acts[l].backward(p, a_l, fa)
        if keep_deltas:
            deltas.append(delta)
        grads.append(_block_vjp(blocks[l], params[l], u_l, delta, f))
    grads.reverse()
    return tuple(grads), batch_loss, tuple(reversed(deltas)) if keep_deltas else ()


def dfa_grads_unchecked(
    spec: ModelSpec,
    params: Params,
    feedback: Feedback,
    x: Tensor,
    y: Tensor,
    mode: str,
    projection: Optional[Projection] = None,
    noise: Optional[Tuple[Tensor, ...]] = None,
    key: Optional[Any] = None,
) -> Grads:
    """DFA gradients on tensors of spec.dtype, without validation."""
    return dfa_grads_and_loss(spec, params, feedback, x, y, mode, projection, noise, key)[0]


# -- BP ----------------------------------------------------------------------------------------------


def bp_grads_and_loss(spec: ModelSpec, params: Params, x: Tensor, y: Tensor) -> Tuple[Grads, Tensor]:
    """Backprop gradients and the batch loss of a ModelSpec, by reverse-mode autodiff.

    ``torch.autograd.grad`` on detached aliases of the params, as ``dfa_torch.dfa`` does:
    the caller's tensors get no ``requires_grad`` and no ``.grad``.

    Returns:
      (per block the gradients of its flat params, shaped like params; loss ()).
    """
    with torch.enable_grad():
        leaves = tuple(tuple(t.detach().requires_grad_() for t in block) for block in params)
        batch_loss = _loss(spec, leaves, x, y)
        flat = torch.autograd.grad(batch_loss, [t for block in leaves for t in block])
    grads = unflatten_pairs(flat, params)
    return grads, batch_loss.detach()


def bp_grads_unchecked(spec: ModelSpec, params: Params, x: Tensor, y: Tensor) -> Grads:
    """BP gradients on tensors of spec.dtype, without validation."""
    return bp_grads_and_loss(spec, params, x, y)[0]


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
