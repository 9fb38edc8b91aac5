"""One jitted training step (DFA or BP) per (spec, optimizer, method, mode) (JAX)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Tuple

import jax

from dfa_core import validation
from dfa_core.spec import METHODS, MLPSpec, OptimizerSpec  # noqa: F401  (METHODS re-exported)
from dfa_jax import alignment
from dfa_jax.arrays import precision_scope
from dfa_jax.dfa import TRACE_COUNTS, bp_grads_and_loss, dfa_grads_and_loss
from dfa_jax.optim import apply_updates, make_optimizer


def train_step(
    spec: MLPSpec,
    opt: OptimizerSpec,
    method: str = "dfa",
    mode: str = "sample",
    donate: bool = False,
    with_alignment: bool = False,
) -> Callable[..., Tuple[Any, ...]]:
    """Builds step(params, feedback, opt_state, x, y) -> (params, opt_state, loss[, angles]).

    The step is jitted once per argument combination (cached); it takes JAX arrays of
    spec.dtype, unchecked (check a dataset once, not every batch). ``loss`` is the
    batch's loss before the update. For method 'bp', ``feedback`` is ignored and mode
    must be 'sample'.

    Args:
      spec: the network.
      opt: the optimizer; its state comes from ``make_optimizer(opt, spec.dtype).init(params)``.
      method: 'dfa' or 'bp'.
      mode: DFA grouping, one of dfa_core.MODES.
      donate: let XLA reuse the params and opt_state buffers passed in (they become
        invalid after the call); for training loops that own their arrays.
      with_alignment: the step also returns ``alignment.Angles`` (DFA update vs BP
        gradient per layer) measured on the batch before the update, in the same
        compiled program.
    """
    validation.check_train_step(spec, opt, method, mode)
    return _build_step(spec, opt, method, mode, bool(donate), bool(with_alignment))


@functools.lru_cache(maxsize=None)
def _build_step(spec, opt, method, mode, donate, with_alignment):
    tx = make_optimizer(opt, spec.dtype)

    def step(params, feedback, opt_state, x, y):
        TRACE_COUNTS[f"train_step_{method}"] += 1
        if method == "dfa":
            grads, batch_loss = dfa_grads_and_loss(spec, params, feedback, x, y, mode)
        else:
            grads, batch_loss = bp_grads_and_loss(spec, params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        if with_alignment:
            angles = alignment._alignment_angles(spec, params, feedback, x, y, mode)
            return apply_updates(params, updates), opt_state, batch_loss, angles
        return apply_updates(params, updates), opt_state, batch_loss

    jitted = jax.jit(step, donate_argnums=(0, 2) if donate else ())

    @functools.wraps(step)
    def run(params, feedback, opt_state, x, y):
        with precision_scope(spec.dtype):
            return jitted(params, feedback, opt_state, x, y)

    run.jitted = jitted  # type: ignore[attr-defined]  # a function attribute: the bare jitted program
    return run
