"""Hidden activations with closed-form derivatives, output functions and their losses (torch)."""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Tuple

import torch

from dfa_core.spec import LEAKY_RELU_SLOPE

Tensor = torch.Tensor


class Activation(NamedTuple):
    """f and f'. ``derivative(a, h)`` takes h = f(a) too, so f' reuses it where it can.

    ``backward(g, a, h)`` is g * f'(a): autograd's own fused kernel where torch has one
    (one pass, no temporaries), else the product.
    """

    fn: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor, Tensor], Tensor]
    backward: Callable[[Tensor, Tensor, Tensor], Tensor]


def _times_derivative(derivative):
    return lambda g, a, h: g * derivative(a, h)


def _leaky_relu(a):
    return torch.where(a > 0, a, LEAKY_RELU_SLOPE * a)


def _leaky_relu_derivative(a, h):
    return torch.where(a > 0, torch.ones_like(a), torch.full_like(a, LEAKY_RELU_SLOPE))


_ACTIVATIONS = {
    "tanh": Activation(torch.tanh, lambda a, h: 1 - h * h, lambda g, a, h: torch.ops.aten.tanh_backward(g, h)),
    "relu": Activation(
        torch.relu, lambda a, h: (a > 0).to(a.dtype), lambda g, a, h: torch.ops.aten.threshold_backward(g, a, 0)
    ),
    # aten's leaky_relu_backward rounds the slope through float32, so it is not used here.
    "leaky_relu": Activation(_leaky_relu, _leaky_relu_derivative, _times_derivative(_leaky_relu_derivative)),
    "sigmoid": Activation(
        torch.sigmoid, lambda a, h: h * (1 - h), lambda g, a, h: torch.ops.aten.sigmoid_backward(g, h)
    ),
    "identity": Activation(lambda a: a, lambda a, h: torch.ones_like(a), lambda g, a, h: g),
}


def activation(name: str) -> Activation:
    return _ACTIVATIONS[name]


def _softplus(z):
    # log(1 + exp(z)) without overflow; written out so both backends round alike.
    return torch.clamp_min(z, 0) + torch.log1p(torch.exp(-torch.abs(z)))


def _bce_from_logits(z_BxO, y_BxO):
    return torch.sum(_softplus(z_BxO) - y_BxO * z_BxO, dim=-1)


def _ce_from_logits(z_BxO, y_BxO):
    return -torch.sum(y_BxO * torch.log_softmax(z_BxO, dim=-1), dim=-1)


def _half_squared_error(z_BxO, y_BxO):
    d = z_BxO - y_BxO
    return 0.5 * torch.sum(d * d, dim=-1)


_OUTPUTS: Dict[str, Tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]] = {
    # name: (g, per-sample loss from logits, with dLoss/dz = g(z) - y)
    "sigmoid": (torch.sigmoid, _bce_from_logits),
    "softmax": (lambda z: torch.softmax(z, dim=-1), _ce_from_logits),
    "identity": (lambda z: z, _half_squared_error),
}


def output_function(name: str) -> Callable[[Tensor], Tensor]:
    return _OUTPUTS[name][0]


def per_sample_loss(name: str, logits_BxO: Tensor, y_BxO: Tensor) -> Tensor:
    """Loss paired with output ``name``, one value per sample: shape (batch,)."""
    return _OUTPUTS[name][1](logits_BxO, y_BxO)


def reduce_loss(spec, logits_BxO: Tensor, y_BxO: Tensor) -> Tensor:
    """Per-sample losses of ``spec.output`` summed ('sum') or averaged ('mean') over the batch: ().

    Shared by the MLP path (``mlp``) and the blocks path (``blocks``); ``spec`` is an MLPSpec
    or a ModelSpec (only ``output`` and ``reduction`` are read).
    """
    per_sample = per_sample_loss(spec.output, logits_BxO, y_BxO)
    return torch.sum(per_sample) if spec.reduction == "sum" else torch.mean(per_sample)
