"""Functional optimizers (torch) whose math matches optax.sgd / sgd(momentum) / adam."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from dfa_core.spec import OptimizerSpec
from dfa_core.tree import flatten_pairs as _flatten
from dfa_core.tree import tree_map as _map
from dfa_core.tree import unflatten_pairs as _unflatten
from dfa_torch.mlp import Params


class EmptyState(NamedTuple):
    """Plain SGD keeps no state."""


class TraceState(NamedTuple):
    trace: Any  # like params: the momentum buffer t


class AdamState(NamedTuple):
    # The field shadows tuple.count (mypy objects); the name is optax's, which checkpoints keep.
    count: torch.Tensor  # type: ignore[assignment]  # shape=(), int32: steps taken
    mu: Any  # like params: first moment
    nu: Any  # like params: second moment


class GradientTransformation(NamedTuple):
    """(init, update) as in optax: init(params) -> state; update(grads, state, params) -> (updates, state)."""

    init: Callable
    update: Callable


def make_optimizer(opt: OptimizerSpec, dtype: str = "float32") -> GradientTransformation:
    """sgd / sgd with momentum / adam for ``opt``, the torch twin of dfa_jax.make_optimizer.

    Args:
      opt: the optimizer and its hyper-parameters.
      dtype: unused on torch (states take the params' dtype); kept to mirror dfa_jax.

    Returns:
      GradientTransformation(init, update); update returns updates to add to params
      (``apply_updates``), already scaled by -learning_rate. Nothing is modified in place.
    """
    del dtype
    if not isinstance(opt, OptimizerSpec):
        raise TypeError(f"opt must be a dfa_core.OptimizerSpec, got {type(opt).__name__}")
    lr = opt.learning_rate
    # Updates run on flat lists with torch._foreach_* (one fused kernel per op, as in
    # torch.optim), in optax's order of operations so both backends round alike.

    if opt.name == "sgd":

        def init(params):
            del params
            return EmptyState()

        def update(grads, state, params=None):
            del params
            return _unflatten(torch._foreach_mul(_flatten(grads), -lr), grads), state

    elif opt.name == "momentum":
        m = opt.momentum

        def init(params):
            return TraceState(_map(torch.zeros_like, params))

        def update(grads, state, params=None):
            del params
            g = _flatten(grads)
            trace = torch._foreach_add(g, torch._foreach_mul(_flatten(state.trace), m))
            direction = torch._foreach_add(g, torch._foreach_mul(trace, m)) if opt.nesterov else trace
            return _unflatten(torch._foreach_mul(direction, -lr), grads), TraceState(_unflatten(trace, grads))

    else:
        b1, b2, eps = opt.b1, opt.b2, opt.eps

        def init(params):
            first = _leaf(params)
            zero = torch.zeros((), dtype=torch.int32, device=first.device)
            return AdamState(zero, _map(torch.zeros_like, params), _map(torch.zeros_like, params))

        def update(grads, state, params=None):
            del params
            g = _flatten(grads)
            mu = torch._foreach_add(torch._foreach_mul(g, 1 - b1), torch._foreach_mul(_flatten(state.mu), b1))
            nu = torch._foreach_add(
                torch._foreach_mul(torch._foreach_mul(g, g), 1 - b2), torch._foreach_mul(_flatten(state.nu), b2)
            )
            count = state.count + 1
            bc1 = 1 - b1 ** count.to(g[0].dtype)
            bc2 = 1 - b2 ** count.to(g[0].dtype)
            denom = torch._foreach_add(torch._foreach_sqrt(torch._foreach_div(nu, bc2)), eps)
            step = torch._foreach_mul(torch._foreach_div(torch._foreach_div(mu, bc1), denom), -lr)
            return _unflatten(step, grads), AdamState(count, _unflatten(mu, grads), _unflatten(nu, grads))

    tx = GradientTransformation(init, update)
    return with_weight_decay(tx, opt.weight_decay) if opt.weight_decay else tx


def with_weight_decay(tx: GradientTransformation, weight_decay: Any) -> GradientTransformation:
    """``tx`` seeing g + weight_decay * p for every parameter p (optax.add_decayed_weights' order); its
    state is ``tx``'s own. ``weight_decay`` a float, or a (M,) tensor broadcast over stacked members."""

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the params: call update(grads, state, params)")
        decay = _map(lambda p: p * _per_member(weight_decay, p), params)
        return tx.update(_unflatten(torch._foreach_add(_flatten(grads), _flatten(decay)), grads), state, params)

    return GradientTransformation(tx.init, update)


def _per_member(value: Any, like: torch.Tensor) -> Any:
    """A float as it is; a (M,) tensor shaped to broadcast over a stacked leaf (M, ...)."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value.reshape(-1, *([1] * (like.dim() - 1)))
    return value


def _leaf(tree: Any) -> torch.Tensor:
    while isinstance(tree, (tuple, list)):
        tree = tree[0]
    return tree


def apply_updates(params: Params, updates: Params) -> Params:
    """params + updates, leaf by leaf (a new tuple; nothing is modified)."""
    return _unflatten(torch._foreach_add(_flatten(params), _flatten(updates)), params)


def apply_updates_(params: Params, updates: Params) -> Params:
    """params += updates in place (for loops that own params, ``donate=True``); returns params."""
    torch._foreach_add_(_flatten(params), _flatten(updates))
    return params
