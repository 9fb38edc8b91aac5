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
import it to dispatch), so the few lines it shares with them are written out again.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, NamedTuple, Optional, Tuple

import torch
import torch.func
import torch.nn.functional as F

from dfa_core.model import AvgPool2d, Block, Conv2d, Dense, Flatten, Layer, MaxPool2d, ModelSpec
from dfa_torch import nn
from dfa_torch.nn import reduce_loss

Tensor = torch.Tensor
Params = Tuple[Tuple[Tensor, Tensor], ...]  # ((W_1, b_1), ..., (W_L, b_L)), shapes spec.param_shapes
Grads = Tuple[Tuple[Tensor, Tensor], ...]
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


def _dense(layer: Dense, w_OxI: Tensor, b_O: Tensor, u_BxI: Tensor) -> Tensor:
    del layer
    return torch.addmm(b_O, u_BxI, w_OxI.T)  # as dfa_torch.mlp._linear, so Dense models match MLPs


def _conv(layer: Conv2d, w_OxIxKxK: Tensor, b_O: Tensor, u_BxIxHxW: Tensor) -> Tensor:
    return F.conv2d(u_BxIxHxW, w_OxIxKxK, b_O, stride=layer.stride, padding=layer.pad)


def _dense_vjp(layer: Dense, w: Tensor, b: Tensor, u_KxI: Tensor, delta_KxO: Tensor) -> Tuple[Tensor, Tensor]:
    # The VJP of _dense in closed form: no second forward pass, and dfa_torch.dfa's products.
    del layer, w, b
    return delta_KxO.T @ u_KxI, torch.sum(delta_KxO, dim=0)


def _autodiff_vjp(layer: Any, w: Tensor, b: Tensor, u: Tensor, delta: Tensor) -> Tuple[Tensor, Tensor]:
    # torch.func.vjp is a function transform: it differentiates even under the caller's
    # no_grad, and the graph it builds lives only inside this call.
    pullback = torch.func.vjp(lambda w_, b_: _apply_layer(layer, w_, b_, u), w, b)[1]
    return pullback(delta)


_PARAM_LAYERS: dict[type, Tuple[Callable[..., Tensor], Callable[..., Tuple[Tensor, Tensor]]]] = {
    # type: (g(layer, W, b, u), its (W, b) VJP (layer, W, b, u, delta))
    Dense: (_dense, _dense_vjp),
    Conv2d: (_conv, _autodiff_vjp),
}


def _apply_prefix(prefix: Tuple[Layer, ...], h: Tensor) -> Tensor:
    """u = prefix(h): the block's parameter-free layers in order, (batch, *in_shape) -> (batch, *u_shape)."""
    for layer in prefix:
        h = _PREFIX_LAYERS[type(layer)](layer, h)
    return h


def _apply_layer(layer: Layer, w: Tensor, b: Tensor, u: Tensor) -> Tensor:
    """a = g(theta, u) for a Dense or Conv2d layer: (batch, *u_shape) -> (batch, *a_shape)."""
    return _PARAM_LAYERS[type(layer)][0](layer, w, b, u)


def _layer_vjp(layer: Layer, w: Tensor, b: Tensor, u: Tensor, delta: Tensor) -> Tuple[Tensor, Tensor]:
    """(gW, gb): the VJP of g(., ., u) w.r.t. (W, b) applied to delta (K, *a_shape); u (K, *u_shape).

    For Dense this is (delta^T u, sum_rows delta); for Conv2d the convolution weight gradient
    (``torch.func.vjp``). Builds no autograd graph that outlives the call.
    """
    return _PARAM_LAYERS[type(layer)][1](layer, w, b, u, delta)


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
    blocks = _blocks(spec)
    h, u, a = x, [], []
    for l, (block, (w, b)) in enumerate(zip(blocks, params)):
        u.append(_apply_prefix(block.prefix, h))
        a.append(_apply_layer(block.layer, w, b, u[-1]))
        if l < len(blocks) - 1:
            h = f(a[-1])
    return BlockActivations(tuple(u), tuple(a), nn.output_function(spec.output)(a[-1]))


def _logits(spec: ModelSpec, params: Params, x: Tensor) -> Tensor:
    """a_L, (batch, n_L), without keeping the hidden activations."""
    f = nn.activation(spec.activation).fn
    blocks = _blocks(spec)
    h = x
    for block, (w, b) in zip(blocks[:-1], params[:-1]):
        h = f(_apply_layer(block.layer, w, b, _apply_prefix(block.prefix, h)))
    return _apply_layer(blocks[-1].layer, *params[-1], _apply_prefix(blocks[-1].prefix, h))


def _forward(spec: ModelSpec, params: Params, x: Tensor) -> Tensor:
    """y_hat = out(a_L), (batch, n_L)."""
    return nn.output_function(spec.output)(_logits(spec, params, x))


def _loss(spec: ModelSpec, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """The loss paired with spec.output, from logits, reduced by spec.reduction: ()."""
    return reduce_loss(spec, _logits(spec, params, x), y)


# No jit on torch: ``dfa_torch.mlp``'s public forward, logits, loss and forward_with_activations
# route a ModelSpec to the underscored functions above after casting (dfa_jax.blocks jits them).


# -- DFA ---------------------------------------------------------------------------------------------


def _class_grouping(y_BxC: Tensor) -> Tensor:
    """G for 'class_mean', (C, batch): as ``dfa_torch.dfa._class_grouping`` (absent classes: zero rows)."""
    members_BxC = F.one_hot(torch.argmax(y_BxC, dim=1), y_BxC.shape[1]).to(y_BxC.dtype)
    counts_C = torch.sum(members_BxC, dim=0)
    return members_BxC.T / torch.clamp_min(counts_C, 1)[:, None]


def _grouping(mode: str, y: Tensor) -> Tuple[Optional[Callable[[Tensor], Tensor]], Any]:
    """(avg, K): t (batch, *shape) -> G t (K, *shape) for ``mode`` (None for 'sample'), and K."""
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


@torch.no_grad()
def dfa_grads_and_loss(
    spec: ModelSpec, params: Params, feedback: Feedback, x: Tensor, y: Tensor, mode: str
) -> Tuple[Grads, Tensor]:
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

    Returns:
      (((gW_1, gb_1), ..., (gW_L, gb_L)) shaped like params, loss ()).
    """
    act = nn.activation(spec.activation)
    blocks = _blocks(spec)
    avg, count = _grouping(mode, y)
    keep = (lambda t: t) if avg is None else avg
    kept_u: list[Any] = []  # u'_l per block; a slot is set to None once its update is formed
    kept_a: list[Any] = []  # h_l ('sample') or a'_l per hidden block
    h = x
    for block, (w, b) in zip(blocks[:-1], params[:-1]):
        u = _apply_prefix(block.prefix, h)
        kept_u.append(keep(u))
        a = _apply_layer(block.layer, w, b, u)
        h = act.fn(a)
        kept_a.append(h if avg is None else avg(a))
        del u, a  # free the full-batch tensors before the next block allocates its own
    u = _apply_prefix(blocks[-1].prefix, h)
    kept_u.append(keep(u))
    z = _apply_layer(blocks[-1].layer, *params[-1], u)
    del u, h
    batch_loss = reduce_loss(spec, z, y)
    y_hat = nn.output_function(spec.output)(z)
    e = y_hat - y if avg is None else avg(y_hat) - avg(y)
    if spec.reduction == "mean":
        e = e / count
    grads = [_layer_vjp(blocks[-1].layer, *params[-1], kept_u.pop(), e)]  # delta_L = e'
    for l in reversed(range(len(blocks) - 1)):  # top first, as dfa_torch.dfa, to free memory early
        p = (e @ feedback[l].T).reshape(e.shape[0], *blocks[l].a_shape)
        a_l, u_l = kept_a[l], kept_u[l]
        kept_a[l] = kept_u[l] = None
        fa = a_l if avg is None else act.fn(a_l)  # in 'sample' mode a_l holds h, which stands in for a in f'
        delta = act.backward(p, a_l, fa)
        grads.append(_layer_vjp(blocks[l].layer, *params[l], u_l, delta))
    grads.reverse()
    return tuple(grads), batch_loss


def dfa_grads_unchecked(spec: ModelSpec, params: Params, feedback: Feedback, x: Tensor, y: Tensor, mode: str) -> Grads:
    """DFA gradients on tensors of spec.dtype, without validation."""
    return dfa_grads_and_loss(spec, params, feedback, x, y, mode)[0]


# -- BP ----------------------------------------------------------------------------------------------


def bp_grads_and_loss(spec: ModelSpec, params: Params, x: Tensor, y: Tensor) -> Tuple[Grads, Tensor]:
    """Backprop gradients and the batch loss of a ModelSpec, by reverse-mode autodiff.

    ``torch.autograd.grad`` on detached aliases of the params, as ``dfa_torch.dfa`` does:
    the caller's tensors get no ``requires_grad`` and no ``.grad``.

    Returns:
      (((gW_1, gb_1), ..., (gW_L, gb_L)) shaped like params, loss ()).
    """
    with torch.enable_grad():
        leaves = tuple((w.detach().requires_grad_(), b.detach().requires_grad_()) for w, b in params)
        batch_loss = _loss(spec, leaves, x, y)
        flat = torch.autograd.grad(batch_loss, [t for pair in leaves for t in pair])
    grads = tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
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
    "dfa_grads_unchecked",
    "reduce_loss",
]
