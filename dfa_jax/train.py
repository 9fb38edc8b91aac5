"""One jitted training step (any learning rule) per (spec, optimizer, method, mode) (JAX)."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from dfa_core import hardware, validation
from dfa_core.backend import RuleState
from dfa_core.hardware import Projection
from dfa_core.rules import KP_DECAY, check_kp_decay, frozen_blocks
from dfa_core.spec import METHODS, MLPSpec, OptimizerSpec  # noqa: F401  (METHODS re-exported)
from dfa_jax import alignment, rules
from dfa_jax.arrays import precision_scope
from dfa_jax.dfa import TRACE_COUNTS, bp_grads_and_loss, dfa_grads_and_loss
from dfa_jax.optim import apply_updates, make_optimizer
from dfa_jax.parallel import DataParallel, _check_parallel


def train_step(
    spec: MLPSpec,
    opt: OptimizerSpec,
    method: Any = "dfa",
    mode: str = "sample",
    donate: bool = False,
    with_alignment: bool = False,
    kp_decay: float = KP_DECAY,
    projection: Optional[Projection] = None,
    parallel: Optional[DataParallel] = None,
) -> Callable[..., Tuple[Any, ...]]:
    """Builds step(params, feedback, opt_state, x, y) -> (params, opt_state, loss[, angles]).

    The step is jitted once per argument combination (cached); it takes JAX arrays of
    spec.dtype, unchecked (check a dataset once, not every batch). ``loss`` is the
    batch's loss before the update. For method 'bp', ``feedback`` is ignored and mode
    must be 'sample'.

    Args:
      spec: the network.
      opt: the optimizer; its state comes from ``make_optimizer(opt, spec.dtype).init(params)``,
        wrapped by ``init_rule_state`` (a ``RuleState``) when a rule is 'kp' or 'brsf'.
      method: a name in dfa_core.METHODS or a tuple of one per block (``Backend.grads``);
        ``feedback`` is what ``grads`` takes for it (kp entries are read from the state).
      mode: DFA grouping, one of dfa_core.MODES ('sample' unless every rule is dfa/drtp).
      donate: let XLA reuse the params and opt_state buffers passed in (they become
        invalid after the call); for training loops that own their arrays.
      with_alignment: the step also returns ``alignment.Angles`` per block, measured on the
        batch before the update, in the same compiled program: for 'dfa' and 'bp' the exact DFA
        direction (e B_l^T, the run's feedback) against BP's gradient, as
        ``alignment.alignment_angles``; for every other rule, and for 'dfa' with a
        ``projection``, the update the step applies (the rule's, the quantised / noisy one with
        this step's draws) against BP's, as ``alignment.update_angles``.
      kp_decay: KP's lambda >= 0: W_{l+1} <- W_{l+1} + u - lambda W_{l+1} and
        B_l <- B_l + u - lambda B_l, u the optimizer's update of W_{l+1} (Akrout et al. 2019).
      projection: hardware effects on DFA's projections (dfa_core.hardware.Projection:
        quantised error, noise, a plug-in device through ``jax.pure_callback``); method
        'dfa' only; None (or an identity Projection): the exact step. With noise, the
        opt_state is a ``RuleState`` (``init_rule_state(..., projection=projection)``) and
        step t draws from ``jax.random.fold_in(PRNGKey(rule_seed), t)``, as brsf does, so a
        resumed run draws the same noise.
      parallel: ``dfa_jax.parallel.data_parallel(devices)``'s setup, or None (one device). The
        step then takes the global batch: x and y are placed sharded by rows over the mesh
        (replicated when the devices do not divide the batch: exact, without the speed-up),
        params, feedback and opt_state replicated, and returns them replicated; XLA inserts
        the all-reduces, so the update is the one-device update of the global batch.

    Raises:
      ValueError, TypeError: a bad spec, optimizer, method, mode, kp_decay, projection (one
        given with a method other than 'dfa') or parallel.
    """
    validation.check_train_step(spec, opt, method, mode)
    method = validation.method_key(method)
    kp_decay = check_kp_decay(kp_decay)
    hw = hardware.check_step_projection(method, projection)
    dp = _check_parallel(parallel)
    if dp is not None:
        return _build_step(spec, opt, method, mode, bool(donate), bool(with_alignment), kp_decay, hw, dp)
    if hw is None:  # today's call, so today's cached step
        return _build_step(spec, opt, method, mode, bool(donate), bool(with_alignment), kp_decay)
    return _build_step(spec, opt, method, mode, bool(donate), bool(with_alignment), kp_decay, hw)


def _step_key(opt_state: RuleState) -> jax.Array:
    """Step t's key, fold_in(PRNGKey(rule_seed), t): brsf's magnitudes and the projection noise."""
    return jax.random.fold_in(jax.random.PRNGKey(opt_state.rule_seed), opt_state.rule_step)


def _rule_feedback(rules_: Tuple[str, ...], feedback: Any, opt_state: Any, dtype: str) -> Tuple[Any, ...]:
    """``grads``'s feedback with each kp entry taken from the state: one entry per hidden block."""
    kp = opt_state.kp_feedback
    return tuple(
        kp[l] if rule == "kp" else (feedback[l] if feedback else jnp.zeros((0,), dtype))
        for l, rule in enumerate(rules_[:-1])
    )


def _kp_update(params, updates, new_params, kp_feedback, kp_blocks, decay):
    """W_{l+1} and B_l of each kp block l: the same update u, plus weight decay: x + u - decay x."""
    new_params, kp_feedback = list(new_params), list(kp_feedback)
    for l in kp_blocks:
        w, u = params[l + 1][0], updates[l + 1][0]
        new_params[l + 1] = (w + u - decay * w, *new_params[l + 1][1:])
        kp_feedback[l] = kp_feedback[l] + u - decay * kp_feedback[l]
    return tuple(new_params), tuple(kp_feedback)


class StepRule(NamedTuple):
    """A rule as ``train_step`` applies it: pure functions of one network's arrays (vmappable)."""

    grads_and_loss: Callable[..., Any]  # (params, feedback, opt_state, x, y) -> (grads, loss)
    angles: Callable[..., Any]  # (params, feedback, opt_state, x, y) -> alignment.Angles, before the update
    stateful: bool  # the opt_state is a RuleState (kp, brsf, projection noise)
    kp_blocks: Tuple[int, ...]  # hidden blocks l whose B_l KP trains
    frozen: Tuple[int, ...]  # hidden blocks a 'shallow' rule freezes (``freeze``)


@functools.lru_cache(maxsize=None)
def step_rule(spec: Any, method: Any, mode: str, projection: Optional[Projection] = None) -> StepRule:
    """``train_step``'s dispatch (unchecked): DFA (with the projection; noise from the state's key), BP,
    or ``rules.grads_and_loss`` (KP's B from the state, brsf's key from its seed and step); and the
    angles of ``with_alignment``: the exact DFA direction for 'dfa' and 'bp', else the update applied.
    ``dfa_jax.many`` vmaps the same functions over members."""
    rules_ = validation.method_rules(spec, method)
    noisy = projection is not None and projection.noise is not None
    stateful = any(r in validation.STATEFUL_RULES for r in rules_[:-1]) or noisy

    def inputs(feedback, opt_state):
        """This step's feedback for ``grads`` (kp entries from the state) and key (brsf, noise)."""
        if method == "dfa":
            return feedback, (_step_key(opt_state) if noisy else None)
        if not stateful:
            return feedback, None
        key = _step_key(opt_state) if "brsf" in rules_[:-1] else None
        return _rule_feedback(rules_, feedback, opt_state, spec.dtype), key

    def grads_and_loss(params, feedback, opt_state, x, y):
        if method == "bp":
            return bp_grads_and_loss(spec, params, x, y)
        feedback, key = inputs(feedback, opt_state)
        if method == "dfa":
            if projection is None:
                return dfa_grads_and_loss(spec, params, feedback, x, y, mode)
            return dfa_grads_and_loss(spec, params, feedback, x, y, mode, projection, None, key)
        return rules.grads_and_loss(spec, params, feedback, x, y, rules_, mode, key)

    def angles(params, feedback, opt_state, x, y):
        if method == "bp" or (method == "dfa" and projection is None):
            return alignment._alignment_angles(spec, params, feedback, x, y, mode)
        feedback, key = inputs(feedback, opt_state)
        return alignment.update_angles(spec, params, feedback, x, y, rules_, mode, key, projection)

    kp_blocks = tuple(l for l, r in enumerate(rules_[:-1]) if r == "kp")
    return StepRule(grads_and_loss, angles, stateful, kp_blocks, frozen_blocks(rules_))


def freeze(updates: Any, frozen: Tuple[int, ...]) -> Any:
    """``updates`` with the blocks in ``frozen`` zeroed (a 'shallow' block stays as initialised)."""
    if not frozen:
        return updates
    return tuple(tuple(jnp.zeros_like(u) for u in block) if l in frozen else block for l, block in enumerate(updates))


@functools.lru_cache(maxsize=None)
def _build_step(spec, opt, method, mode, donate, with_alignment, kp_decay=KP_DECAY, projection=None, parallel=None):
    tx = make_optimizer(opt, spec.dtype)
    rule = step_rule(spec, method, mode, projection)
    stateful = rule.stateful

    def step(params, feedback, opt_state, x, y):
        TRACE_COUNTS[f"train_step_{method}"] += 1
        if parallel is not None:  # the rows of the batch over the mesh; XLA partitions the rest
            x, y = parallel.constrain_batch(x), parallel.constrain_batch(y)
        grads, batch_loss = rule.grads_and_loss(params, feedback, opt_state, x, y)
        updates, inner = tx.update(grads, opt_state.inner if stateful else opt_state, params)
        updates = freeze(updates, rule.frozen)
        new_params = apply_updates(params, updates)
        if stateful:
            new_params, kp = _kp_update(params, updates, new_params, opt_state.kp_feedback, rule.kp_blocks, kp_decay)
            new_state = RuleState(inner, kp, opt_state.rule_seed, opt_state.rule_step + 1)
        else:
            new_state = inner
        if with_alignment:
            return new_params, new_state, batch_loss, rule.angles(params, feedback, opt_state, x, y)
        return new_params, new_state, batch_loss

    donate_argnums = (0, 2) if donate else ()
    if parallel is None:
        jitted = jax.jit(step, donate_argnums=donate_argnums)
    else:  # every output (params, state, loss, angles) replicated, as the inputs are
        jitted = jax.jit(step, donate_argnums=donate_argnums, out_shardings=parallel.replicated)

    @functools.wraps(step)
    def run(params, feedback, opt_state, x, y):
        hardware.check_noise_state(projection, opt_state)
        with precision_scope(spec.dtype):  # float64 arrays keep their dtype when placed
            if parallel is not None:
                params, feedback, opt_state = parallel.replicate((params, feedback, opt_state))
                x, y = parallel.shard_batch(x), parallel.shard_batch(y)
                return parallel.settle(jitted(params, feedback, opt_state, x, y))
            return jitted(params, feedback, opt_state, x, y)

    run.jitted = jitted  # type: ignore[attr-defined]  # a function attribute: the bare jitted program
    run.angles = rule.angles  # type: ignore[attr-defined]  # the pure angles function, for the compiled epoch
    return run
