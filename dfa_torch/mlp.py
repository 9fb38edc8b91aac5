"""Forward passes and the loss of an MLP over ((W, b), ...) parameters (torch, pure functions).

These take tensors of ``spec.dtype`` and do no validation, so they can run under
torch.func transforms; the checked entry points are in ``dfa_torch.dfa``.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from dfa_core.spec import MLPSpec
from dfa_torch import nn

Tensor = torch.Tensor
Params = Tuple[Tuple[Tensor, Tensor], ...]


class Activations(NamedTuple):
    """What a training forward pass keeps (the report's ``forward_pass_train``)."""

    a: Tuple[Tensor, ...]  # pre-activations a_1..a_L, a_l: (batch, n_l); a_L are the logits
    h: Tuple[Tensor, ...]  # post-activations h_0..h_{L-1}, h_0 = x, h_l: (batch, n_l)
    y_hat: Tensor  # g(a_L): (batch, n_L)


def _linear(h_BxI: Tensor, w_OxI: Tensor, b_O: Tensor) -> Tensor:
    return torch.addmm(b_O, h_BxI, w_OxI.T)


def forward_with_activations(spec: MLPSpec, params: Params, x: Tensor) -> Activations:
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


def logits(spec: MLPSpec, params: Params, x: Tensor) -> Tensor:
    """a_L, (batch, n_L), without keeping the hidden activations."""
    f = nn.activation(spec.activation).fn
    h = x
    for w, b in params[:-1]:
        h = f(_linear(h, w, b))
    return _linear(h, *params[-1])


def forward(spec: MLPSpec, params: Params, x: Tensor) -> Tensor:
    """y_hat = g(a_L), (batch, n_L) (the report's ``forward``)."""
    return nn.output_function(spec.output)(logits(spec, params, x))


def reduce_loss(spec: MLPSpec, logits_BxO: Tensor, y_BxO: Tensor) -> Tensor:
    """Per-sample losses summed (reduction 'sum') or averaged ('mean') over the batch: ()."""
    per_sample = nn.per_sample_loss(spec.output, logits_BxO, y_BxO)
    return torch.sum(per_sample) if spec.reduction == "sum" else torch.mean(per_sample)


def loss(spec: MLPSpec, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """The loss paired with ``spec.output``, computed from logits, reduced by ``spec.reduction``."""
    return reduce_loss(spec, logits(spec, params, x), y)
