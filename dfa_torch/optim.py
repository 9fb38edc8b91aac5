"""Functional optimizers (torch) whose math matches optax.sgd / sgd(momentum) / adam."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Tuple

import torch

from dfa_core.spec import OptimizerSpec


class EmptyState(NamedTuple):
    """Plain SGD keeps no state."""


class TraceState(NamedTuple):
    trace: Any  # like params: the momentum buffer t


class AdamState(NamedTuple):
    count: torch.Tensor  # shape=(), int32: steps taken
    mu: Any  # like params: first moment
    nu: Any  # like params: second moment


class GradientTransformation(NamedTuple):
    """(init, update) as in optax: init(params) -> state; update(grads, state, params) -> (updates, state)."""

    init: Callable
    update: Callable


def _map(fn, *trees):
    if isinstance(trees[0], (tuple, list)):
        return tuple(_map(fn, *ts) for ts in zip(*trees))
    return fn(*trees)


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

    if opt.name == "sgd":

        def init(params):
            del params
            return EmptyState()

        def update(grads, state, params=None):
            del params
            return _map(lambda g: -lr * g, grads), state

    elif opt.name == "momentum":
        m = opt.momentum

        def init(params):
            return TraceState(_map(torch.zeros_like, params))

        def update(grads, state, params=None):
            del params
            trace = _map(lambda g, t: g + m * t, grads, state.trace)
            direction = _map(lambda g, t: g + m * t, grads, trace) if opt.nesterov else trace
            return _map(lambda d: -lr * d, direction), TraceState(trace)

    else:
        b1, b2, eps = opt.b1, opt.b2, opt.eps

        def init(params):
            first = _leaf(params)
            zero = torch.zeros((), dtype=torch.int32, device=first.device)
            return AdamState(zero, _map(torch.zeros_like, params), _map(torch.zeros_like, params))

        def update(grads, state, params=None):
            del params
            mu = _map(lambda g, t: (1 - b1) * g + b1 * t, grads, state.mu)
            nu = _map(lambda g, t: (1 - b2) * (g * g) + b2 * t, grads, state.nu)
            count = state.count + 1
            bc1 = 1 - b1 ** count.to(_leaf(grads).dtype)
            bc2 = 1 - b2 ** count.to(_leaf(grads).dtype)
            step = _map(lambda m_, v: -lr * ((m_ / bc1) / (torch.sqrt(v / bc2) + eps)), mu, nu)
            return step, AdamState(count, mu, nu)

    return GradientTransformation(init, update)


def _leaf(tree) -> torch.Tensor:
    while isinstance(tree, (tuple, list)):
        tree = tree[0]
    return tree


def apply_updates(params, updates) -> Tuple:
    """params + updates, leaf by leaf (a new tuple; nothing is modified)."""
    return _map(lambda p, u: p + u.to(p.dtype), params, updates)
