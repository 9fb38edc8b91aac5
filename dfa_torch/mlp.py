"""Forward passes and the loss of an MLP over ((W, b), ...) parameters (torch, pure functions).

The private ``_forward`` etc. take tensors of ``spec.dtype`` and do no validation (the fast
paths use them); the public ``forward``, ``logits``, ``loss`` and ``forward_with_activations``
also take NumPy arrays, cast to ``spec.dtype`` on the params' device, and name both devices
when tensors disagree, as the JAX twins do.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple, TypeVar

import torch

from dfa_core.backend import ArrayLike, ParamsLike
from dfa_core.model import ModelSpec
from dfa_core.spec import MLPSpec
from dfa_core.tree import tree_map
from dfa_torch import blocks, nn
from dfa_torch.arrays import as_input, torch_dtype
from dfa_torch.nn import reduce_loss

Tensor = torch.Tensor
Params = Tuple[Tuple[Tensor, ...], ...]  # per block: (W, b), or a composite's flat leaves


class Activations(NamedTuple):
    """What a training forward pass keeps (the report's ``forward_pass_train``)."""

    a: Tuple[Tensor, ...]  # pre-activations a_1..a_L, a_l: (batch, n_l); a_L are the logits
    h: Tuple[Tensor, ...]  # post-activations h_0..h_{L-1}, h_0 = x, h_l: (batch, n_l)
    y_hat: Tensor  # g(a_L): (batch, n_L)


def _linear(h_BxI: Tensor, w_OxI: Tensor, b_O: Tensor) -> Tensor:
    return torch.addmm(b_O, h_BxI, w_OxI.T)


def _forward_with_activations(spec: MLPSpec, params: Params, x: Tensor) -> Activations:
    """a_l = h_{l-1} W_l^T + b_l, h_l = f(a_l) for hidden layers, y_hat = g(a_L).

    Args:
      spec: the network.
      params: ((W_1, b_1), ..., (W_L, b_L)), W_l: (n_l, n_{l-1}), b_l: (n_l,).
      x: inputs, (batch, n_0).

    Returns:
      Activations(a, h, y_hat).
    """
    f = nn.activation(spec.activation).fn
    h, a = [x], []
    for w, b in params[:-1]:
        a.append(_linear(h[-1], w, b))
        h.append(f(a[-1]))
    a.append(_linear(h[-1], *params[-1]))
    return Activations(tuple(a), tuple(h), nn.output_function(spec.output)(a[-1]))


def _logits(spec: MLPSpec, params: Params, x: Tensor) -> Tensor:
    """a_L, (batch, n_L), without keeping the hidden activations."""
    f = nn.activation(spec.activation).fn
    h = x
    for w, b in params[:-1]:
        h = f(_linear(h, w, b))
    return _linear(h, *params[-1])


def _forward(spec: MLPSpec, params: Params, x: Tensor) -> Tensor:
    """y_hat = g(a_L), (batch, n_L) (the report's ``forward``)."""
    return nn.output_function(spec.output)(_logits(spec, params, x))


def _loss(spec: MLPSpec, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """The loss paired with ``spec.output``, computed from logits, reduced by ``spec.reduction``."""
    return reduce_loss(spec, _logits(spec, params, x), y)


def _device_of(params: ParamsLike, arrays: Sequence[Tuple[str, ArrayLike]]) -> Optional[torch.device]:
    """The device the params live on; tensors elsewhere are an error naming both devices."""
    leaf = params[0][0]
    device = leaf.device if isinstance(leaf, torch.Tensor) else None
    for name, a in arrays:
        if device is not None and isinstance(a, torch.Tensor) and a.device != device:
            raise ValueError(f"{name} is on {a.device} but the params are on {device}; move them to one device")
    return device


_R = TypeVar("_R")


def _entry(fn: Callable[..., _R], block_fn: Callable[..., Any]) -> Callable[..., _R]:
    """The public twin of ``fn``: NumPy arrays or tensors in, cast to spec.dtype on the params' device.

    A ``ModelSpec`` is routed to ``block_fn``, its twin in ``dfa_torch.blocks``.
    """

    @functools.wraps(fn)
    def public(spec: MLPSpec, params: ParamsLike, x: ArrayLike, *targets: ArrayLike) -> _R:
        device = _device_of(params, (("x", x),) + tuple(("y", t) for t in targets))

        def cast(a):  # tensors keep their autograd history (torch.func.grad over loss works)
            return (
                a.to(device=device, dtype=torch_dtype(spec.dtype))
                if isinstance(a, torch.Tensor)
                else as_input(a, spec.dtype, device)
            )

        impl = block_fn if isinstance(spec, ModelSpec) else fn
        return impl(spec, tree_map(cast, params), *(cast(a) for a in (x, *targets)))

    return public


forward_with_activations = _entry(_forward_with_activations, blocks._forward_with_activations)
logits = _entry(_logits, blocks._logits)
forward = _entry(_forward, blocks._forward)
loss = _entry(_loss, blocks._loss)
