"""Optimizers (JAX): optax transformations built from a dfa_core.OptimizerSpec."""

from __future__ import annotations

from typing import Any

import jax
import optax

from dfa_core.spec import OptimizerSpec
from dfa_jax.arrays import precision_scope
from dfa_jax.mlp import Params


def make_optimizer(opt: OptimizerSpec, dtype: str = "float32") -> optax.GradientTransformation:
    """optax.sgd / sgd with momentum / adam for ``opt``.

    Args:
      opt: the optimizer and its hyper-parameters.
      dtype: 'float64' scopes init and update in jax.enable_x64 so the state keeps
        float64 without changing JAX's global default.

    Returns:
      An optax.GradientTransformation (init, update); update returns updates to add
      to params (``apply_updates``), i.e. already scaled by -learning_rate.
    """
    if not isinstance(opt, OptimizerSpec):
        raise TypeError(f"opt must be a dfa_core.OptimizerSpec, got {type(opt).__name__}")
    if opt.name == "sgd":
        tx = optax.sgd(opt.learning_rate)
    elif opt.name == "momentum":
        tx = optax.sgd(opt.learning_rate, momentum=opt.momentum, nesterov=opt.nesterov)
    else:
        tx = optax.adam(opt.learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    if opt.weight_decay:
        tx = with_weight_decay(tx, opt.weight_decay)
    if dtype != "float64":
        return tx

    def init(params):
        with precision_scope(dtype):
            return tx.init(params)

    def update(updates, state, params=None):
        with precision_scope(dtype):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(init, update)


def with_weight_decay(tx: optax.GradientTransformation, weight_decay: Any) -> optax.GradientTransformation:
    """``tx`` seeing g + weight_decay * p for every parameter p; its state is ``tx``'s own (so a
    checkpoint's optimizer state is the same with or without decay, on both backends)."""

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the params: call update(grads, state, params)")
        decayed = jax.tree_util.tree_map(lambda g, p: g + weight_decay * p, grads, params)
        return tx.update(decayed, state, params)

    return optax.GradientTransformation(tx.init, update)


def apply_updates(params: Params, updates: Params) -> Params:
    """params + updates, leaf by leaf (a new tuple; nothing is modified)."""
    return jax.tree_util.tree_map(lambda p, u: p + u.astype(p.dtype), params, updates)
