"""Forward passes and the loss of an MLP over ((W, b), ...) parameters (JAX, pure functions).

The private ``_forward`` etc. take JAX arrays of ``spec.dtype`` and do no validation (the
fast paths use them inside ``jax.jit``); the public ``forward``, ``logits``, ``loss`` and
``forward_with_activations`` also take NumPy arrays, cast to ``spec.dtype`` and keep float64
outside ``precision_scope``, as the torch twins do.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Tuple, TypeVar

import jax

from dfa_core.backend import ArrayLike, ParamsLike
from dfa_core.model import ModelSpec
from dfa_core.spec import MLPSpec
from dfa_core.tree import tree_map
from dfa_jax import blocks, nn
from dfa_jax.arrays import as_input, precision_scope
from dfa_jax.nn import reduce_loss

Array = jax.Array
Params = Tuple[Tuple[Array, ...], ...]  # per block: (W, b), or a composite's flat leaves


class Activations(NamedTuple):
    """What a training forward pass keeps (the report's ``forward_pass_train``)."""

    a: Tuple[Array, ...]  # pre-activations a_1..a_L, a_l: (batch, n_l); a_L are the logits
    h: Tuple[Array, ...]  # post-activations h_0..h_{L-1}, h_0 = x, h_l: (batch, n_l)
    y_hat: Array  # g(a_L): (batch, n_L)


def _linear(h_BxI: Array, w_OxI: Array, b_O: Array) -> Array:
    return h_BxI @ w_OxI.T + b_O[None, :]


def _forward_with_activations(spec: MLPSpec, params: Params, x: Array) -> Activations:
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


def _logits(spec: MLPSpec, params: Params, x: Array) -> Array:
    """a_L, (batch, n_L), without keeping the hidden activations."""
    f = nn.activation(spec.activation).fn
    h = x
    for w, b in params[:-1]:
        h = f(_linear(h, w, b))
    return _linear(h, *params[-1])


def _forward(spec: MLPSpec, params: Params, x: Array) -> Array:
    """y_hat = g(a_L), (batch, n_L) (the report's ``forward``)."""
    return nn.output_function(spec.output)(_logits(spec, params, x))


def _loss(spec: MLPSpec, params: Params, x: Array, y: Array) -> Array:
    """The loss paired with ``spec.output``, computed from logits, reduced by ``spec.reduction``."""
    return reduce_loss(spec, _logits(spec, params, x), y)


_R = TypeVar("_R")


def _entry(fn: Callable[..., _R], block_fn: Callable[..., Any]) -> Callable[..., _R]:
    """The public twin of ``fn``: NumPy or JAX inputs, cast to spec.dtype, float64 kept.

    Outside ``precision_scope`` JAX would compute float64 inputs in float32; the public
    functions scope themselves, as every public function of the backend does. A
    ``ModelSpec`` goes to ``block_fn``, its twin in ``dfa_jax.blocks``.
    """

    @functools.wraps(fn)
    def public(spec: MLPSpec, params: ParamsLike, x: ArrayLike, *targets: ArrayLike) -> _R:
        run = block_fn if isinstance(spec, ModelSpec) else fn
        with precision_scope(spec.dtype):
            params = tree_map(lambda a: as_input(a, spec.dtype), params)
            return run(spec, params, *(as_input(a, spec.dtype) for a in (x, *targets)))

    return public


forward_with_activations = _entry(_forward_with_activations, blocks._jit_forward_with_activations)
logits = _entry(_logits, blocks._jit_logits)
forward = _entry(_forward, blocks._jit_forward)
loss = _entry(_loss, blocks._jit_loss)
