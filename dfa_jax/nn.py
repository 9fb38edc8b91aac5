"""Hidden activations with closed-form derivatives, output functions and their losses (JAX)."""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Tuple

import jax
import jax.numpy as jnp

from dfa_core.spec import LEAKY_RELU_SLOPE

Array = jax.Array


class Activation(NamedTuple):
    """f and f'. ``derivative(a, h)`` takes h = f(a) too, so f' reuses it where it can.

    ``backward(g, a, h)`` is g * f'(a) (XLA fuses the product into one loop).
    """

    fn: Callable[[Array], Array]
    derivative: Callable[[Array, Array], Array]
    backward: Callable[[Array, Array, Array], Array]


def _times_derivative(derivative):
    return lambda g, a, h: g * derivative(a, h)


def _leaky_relu(a):
    return jnp.where(a > 0, a, LEAKY_RELU_SLOPE * a)


def _activation(fn, derivative):
    return Activation(fn, derivative, _times_derivative(derivative))


_ACTIVATIONS = {
    "tanh": _activation(jnp.tanh, lambda a, h: 1 - h * h),
    "relu": _activation(jax.nn.relu, lambda a, h: (a > 0).astype(a.dtype)),
    "leaky_relu": _activation(
        _leaky_relu, lambda a, h: jnp.where(a > 0, jnp.ones_like(a), jnp.full_like(a, LEAKY_RELU_SLOPE))
    ),
    "sigmoid": _activation(jax.nn.sigmoid, lambda a, h: h * (1 - h)),
    "identity": _activation(lambda a: a, lambda a, h: jnp.ones_like(a)),
}


def activation(name: str) -> Activation:
    return _ACTIVATIONS[name]


def _softplus(z):
    # log(1 + exp(z)) without overflow; written out so both backends round alike.
    return jnp.maximum(z, 0) + jnp.log1p(jnp.exp(-jnp.abs(z)))


def _bce_from_logits(z_BxO, y_BxO):
    return jnp.sum(_softplus(z_BxO) - y_BxO * z_BxO, axis=-1)


def _ce_from_logits(z_BxO, y_BxO):
    return -jnp.sum(y_BxO * jax.nn.log_softmax(z_BxO, axis=-1), axis=-1)


def _half_squared_error(z_BxO, y_BxO):
    d = z_BxO - y_BxO
    return 0.5 * jnp.sum(d * d, axis=-1)


_OUTPUTS: Dict[str, Tuple[Callable[[Array], Array], Callable[[Array, Array], Array]]] = {
    # name: (g, per-sample loss from logits, with dLoss/dz = g(z) - y)
    "sigmoid": (jax.nn.sigmoid, _bce_from_logits),
    "softmax": (lambda z: jax.nn.softmax(z, axis=-1), _ce_from_logits),
    "identity": (lambda z: z, _half_squared_error),
}


def output_function(name: str) -> Callable[[Array], Array]:
    return _OUTPUTS[name][0]


def per_sample_loss(name: str, logits_BxO: Array, y_BxO: Array) -> Array:
    """Loss paired with output ``name``, one value per sample: shape (batch,)."""
    return _OUTPUTS[name][1](logits_BxO, y_BxO)


def reduce_loss(spec, logits_BxO: Array, y_BxO: Array) -> Array:
    """Per-sample losses of ``spec.output`` summed ('sum') or averaged ('mean') over the batch: ().

    Shared by the MLP path (``mlp``) and the blocks path (``blocks``); ``spec`` is an MLPSpec
    or a ModelSpec (only ``output`` and ``reduction`` are read).
    """
    per_sample = per_sample_loss(spec.output, logits_BxO, y_BxO)
    return jnp.sum(per_sample) if spec.reduction == "sum" else jnp.mean(per_sample)
