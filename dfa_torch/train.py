"""One training step (DFA or BP) per (spec, optimizer, method, mode) (torch)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Tuple

import torch

from dfa_core import validation
from dfa_core.spec import METHODS, MLPSpec, OptimizerSpec  # noqa: F401  (METHODS re-exported)
from dfa_core.tree import tree_map
from dfa_torch import alignment
from dfa_torch.arrays import as_input
from dfa_torch.dfa import bp_grads_and_loss, dfa_grads_and_loss
from dfa_torch.optim import _flatten, _unflatten, apply_updates, apply_updates_, make_optimizer


def train_step(
    spec: MLPSpec,
    opt: OptimizerSpec,
    method: str = "dfa",
    mode: str = "sample",
    donate: bool = False,
    with_alignment: bool = False,
) -> Callable[..., Tuple[Any, ...]]:
    """Builds step(params, feedback, opt_state, x, y) -> (params, opt_state, loss[, angles]).

    The torch twin of dfa_jax.train_step (cached per argument combination); it takes
    tensors of spec.dtype, unchecked (check a dataset once, not every batch). ``loss``
    is the batch's loss before the update. For method 'bp', ``feedback`` is ignored and
    mode must be 'sample'. DFA builds no autograd graph.

    Args:
      spec: the network.
      opt: the optimizer; its state comes from ``make_optimizer(opt, spec.dtype).init(params)``.
      method: 'dfa' or 'bp'.
      mode: DFA grouping, one of dfa_core.MODES.
      donate: let the step write the new params into the tensors passed in (in place),
        as XLA's buffer donation does on JAX; for training loops that own their arrays.
      with_alignment: the step also returns ``alignment.Angles`` (DFA update vs BP
        gradient per layer) measured on the batch before the update, in the same step.
    """
    validation.check_train_step(spec, opt, method, mode)
    return _build_step(spec, opt, method, mode, bool(donate), bool(with_alignment))


@functools.lru_cache(maxsize=None)
def _build_step(spec, opt, method, mode, donate, with_alignment):
    tx = make_optimizer(opt, spec.dtype)

    _apply = apply_updates_ if donate else apply_updates

    def update(params, grads, opt_state):
        if opt.name == "sgd":  # W - lr * g as one fused multiply-add per tensor, no update tensors
            flat_p, flat_g = _flatten(params), _flatten(grads)
            if donate:
                torch._foreach_add_(flat_p, flat_g, alpha=-opt.learning_rate)
                return params, opt_state
            return _unflatten(torch._foreach_add(flat_p, flat_g, alpha=-opt.learning_rate), params), opt_state
        updates, opt_state = tx.update(grads, opt_state, params)
        return _apply(params, updates), opt_state

    def step(params, feedback, opt_state, x, y):
        params, feedback, x, y = _as_tensors(spec, params, feedback, x, y)
        # Measured before the update, which may write into params (donate=True).
        angles = alignment.alignment_angles_unchecked(spec, params, feedback, x, y, mode) if with_alignment else None
        if method == "dfa":
            grads, batch_loss = dfa_grads_and_loss(spec, params, feedback, x, y, mode)
        else:
            grads, batch_loss = bp_grads_and_loss(spec, params, x, y)
        with torch.no_grad():
            params, opt_state = update(params, grads, opt_state)
        if with_alignment:
            return params, opt_state, batch_loss, angles
        return params, opt_state, batch_loss

    return step


def _as_tensors(spec: MLPSpec, params, feedback, x, y):
    """NumPy inputs become tensors on the params' device, as JAX's jit converts them; a call whose
    inputs are all tensors (the training loops') pays four isinstance checks."""
    leads = (params[0][0], x, y) + ((feedback[0],) if feedback else ())
    if all(isinstance(a, torch.Tensor) for a in leads):
        return params, feedback, x, y
    w = params[0][0]
    device = w.device if isinstance(w, torch.Tensor) else None

    def cast(a):
        return a if isinstance(a, torch.Tensor) else as_input(a, spec.dtype, device)

    feedback = tuple(cast(b) for b in feedback) if feedback is not None else None
    return tree_map(cast, params), feedback, cast(x), cast(y)
