"""One training step (any learning rule) per (spec, optimizer, method, mode) (torch)."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Tuple

import torch

from dfa_core import hardware, validation
from dfa_core.backend import RuleState
from dfa_core.hardware import Projection
from dfa_core.rules import KP_DECAY, as_model, check_kp_decay, frozen_blocks
from dfa_core.spec import METHODS, MLPSpec, OptimizerSpec  # noqa: F401  (METHODS re-exported)
from dfa_core.tree import tree_map
from dfa_torch import alignment, blocks, rules
from dfa_torch.arrays import as_input
from dfa_torch.dfa import bp_grads_and_loss, dfa_grads_and_loss
from dfa_torch.mlp import loss
from dfa_torch.optim import _flatten, _unflatten, apply_updates, apply_updates_, make_optimizer
from dfa_torch.parallel import DataParallel, _check_parallel, _refuse


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

    The torch twin of dfa_jax.train_step (cached per argument combination); it takes
    tensors of spec.dtype, unchecked (check a dataset once, not every batch). ``loss``
    is the batch's loss before the update. For method 'bp', ``feedback`` is ignored and
    mode must be 'sample'. DFA builds no autograd graph.

    Args:
      spec: the network.
      opt: the optimizer; its state comes from ``make_optimizer(opt, spec.dtype).init(params)``,
        wrapped by ``init_rule_state`` (a ``RuleState``) when a rule is 'kp' or 'brsf'.
      method: a name in dfa_core.METHODS or a tuple of one per block (``Backend.grads``);
        ``feedback`` is what ``grads`` takes for it (kp entries are read from the state).
      mode: DFA grouping, one of dfa_core.MODES ('sample' unless every rule is dfa/drtp).
      donate: let the step write the new params into the tensors passed in (in place),
        as XLA's buffer donation does on JAX; for training loops that own their arrays.
      with_alignment: the step also returns ``alignment.Angles`` per block, measured on the
        batch before the update, in the same step: for 'dfa' and 'bp' the exact DFA direction
        (e B_l^T, the run's feedback) against BP's gradient, as ``alignment.alignment_angles``;
        for every other rule, and for 'dfa' with a ``projection``, the update the step applies
        (the rule's, the quantised / noisy one with this step's draws) against BP's, as
        ``alignment.update_angles``.
      kp_decay: KP's lambda >= 0: W_{l+1} <- W_{l+1} + u - lambda W_{l+1} and
        B_l <- B_l + u - lambda B_l, u the optimizer's update of W_{l+1} (Akrout et al. 2019).
      projection: hardware effects on DFA's projections (dfa_core.hardware.Projection:
        quantised error, noise, a plug-in device called on the host); method 'dfa' only;
        None (or an identity Projection): the exact step. With noise, the opt_state is a
        ``RuleState`` (``init_rule_state(..., projection=projection)``) and step t draws from
        ``rules.step_generator`` (seeded with rule_seed * 2^32 + t), as brsf does, so a
        resumed run draws the same noise.
      parallel: ``dfa_torch.parallel.data_parallel()``'s setup, or None (one process). The step
        then takes THIS process's rows of the global batch as x and y (``shard_bounds``; none
        is fine) and returns the one-device update of the global batch and its loss, the same
        on every process; params, feedback and opt_state must be the same on every process.
        The step also takes ``rows=`` (the global batch's rows, when known; else one more
        all-reduce finds them). ``with_alignment`` measures the global batch's angles (equal to
        one process's). Not with a ``projection``.

    Raises:
      ValueError, TypeError: a bad spec, optimizer, method, mode, kp_decay, projection (one
        given with a method other than 'dfa') or parallel (also: parallel with a projection).
    """
    validation.check_train_step(spec, opt, method, mode)
    method = validation.method_key(method)
    kp_decay = check_kp_decay(kp_decay)
    hw = hardware.check_step_projection(method, projection)
    dp = _check_parallel(parallel)
    if dp is not None:
        if hw is not None:
            raise _refuse("projection (hardware effects)")
        return _build_step(spec, opt, method, mode, bool(donate), bool(with_alignment), kp_decay, None, dp)
    if hw is None:  # today's call, so today's cached step
        return _build_step(spec, opt, method, mode, bool(donate), bool(with_alignment), kp_decay)
    return _build_step(spec, opt, method, mode, bool(donate), bool(with_alignment), kp_decay, hw)


def _rule_feedback(rules_: Tuple[str, ...], feedback: Any, opt_state: Any, like: torch.Tensor) -> Tuple[Any, ...]:
    """``grads``'s feedback with each kp entry taken from the state: one entry per hidden block."""
    kp = opt_state.kp_feedback
    return tuple(
        kp[l] if rule == "kp" else (feedback[l] if feedback else like.new_zeros((0,)))
        for l, rule in enumerate(rules_[:-1])
    )


def freeze(updates: Any, frozen: Tuple[int, ...]) -> Any:
    """``updates`` with the blocks in ``frozen`` zeroed (a 'shallow' block stays as initialised)."""
    if not frozen:
        return updates
    return tuple(tuple(torch.zeros_like(u) for u in block) if l in frozen else block for l, block in enumerate(updates))


def _kp_update(params, updates, new_params, kp_feedback, kp_blocks, decay):
    """W_{l+1} and B_l of each kp block l: the same update u, plus weight decay: x + u - decay x."""
    new_params, kp_feedback = list(new_params), list(kp_feedback)
    for l in kp_blocks:
        w, u = params[l + 1][0], updates[l + 1][0]
        new_params[l + 1] = (w + u - decay * w, *new_params[l + 1][1:])
        kp_feedback[l] = kp_feedback[l] + u - decay * kp_feedback[l]
    return tuple(new_params), tuple(kp_feedback)


class Draws(NamedTuple):
    """What one step of a rule draws at random (static layout): ``drawn``'s entries, in this order."""

    brsf_blocks: Tuple[int, ...]  # hidden blocks l whose |R| (like W_{l+1}) is drawn, top block first
    noisy: bool  # projection noise z_l (K, size_l), l = 1..L-1 (method 'dfa': never with brsf)

    @property
    def needed(self) -> bool:
        """Whether a step draws anything."""
        return bool(self.brsf_blocks) or self.noisy


class StepRule(NamedTuple):
    """A rule as ``train_step`` applies it: functions of one network's tensors (vmappable with
    ``vmappable=True`` and the draws passed in); the twin of ``dfa_jax.train.StepRule``."""

    grads_and_loss: Callable[..., Any]  # (params, feedback, opt_state, x, y, drawn=None) -> (grads, loss)
    angles: Callable[..., Any]  # (params, feedback, opt_state, x, y, drawn=None) -> alignment.Angles
    stateful: bool  # the opt_state is a RuleState (kp, brsf, projection noise)
    kp_blocks: Tuple[int, ...]  # hidden blocks l whose B_l KP trains
    frozen: Tuple[int, ...]  # hidden blocks a 'shallow' rule freezes (``freeze``)
    draws: Draws  # what a step draws: from the state's generator (drawn=None), or given as ``drawn``


@functools.lru_cache(maxsize=None)
def step_rule(spec: Any, method: Any, mode: str, projection: Optional[Projection] = None, vmappable: bool = False):
    """``train_step``'s dispatch (unchecked): DFA (with the projection), BP, or ``rules.grads_and_loss``
    (KP's B from the state); and the angles of ``with_alignment``: the exact DFA direction for 'dfa'
    and 'bp', else the update applied.

    What a step draws (brsf's |R|, projection noise) comes from ``rules.step_generator`` of the
    state's seed and step when ``drawn`` is None (a new generator per call, so every call draws the
    same numbers), or is passed in as ``drawn`` (``draws``' layout, drawn by the caller with the
    same calls in the same order): ``torch.func.vmap`` takes no random op with a Generator, so
    ``dfa_torch.many`` draws per member outside the vmap. ``vmappable`` takes BP's gradient with
    ``torch.func.grad`` (``bp_grads_and_loss`` calls ``torch.autograd.grad``, which vmap cannot
    batch; both give the same values)."""
    rules_ = validation.method_rules(spec, method)
    noisy = projection is not None and projection.noise is not None
    stateful = any(r in validation.STATEFUL_RULES for r in rules_[:-1]) or noisy
    draws = Draws(tuple(l for l in reversed(range(len(rules_) - 1)) if rules_[l] == "brsf"), noisy)
    if vmappable:
        bp = torch.func.grad_and_value(lambda p, x, y: loss(spec, p, x, y))
    else:
        bp = functools.partial(bp_grads_and_loss, spec)

    def inputs(feedback, opt_state, x, drawn):
        """This step's feedback for ``grads`` (kp entries from the state; brsf's |R| when drawn is
        given) and generator (brsf, noise; None when drawn is given)."""
        if method == "dfa":
            return feedback, (rules.step_generator(opt_state, x.device) if noisy and drawn is None else None)
        if not stateful:
            return feedback, None
        feedback = _rule_feedback(rules_, feedback, opt_state, x)
        if drawn is None:
            return feedback, (rules.step_generator(opt_state, x.device) if draws.brsf_blocks else None)
        feedback = list(feedback)
        for l, magnitudes in zip(draws.brsf_blocks, drawn):
            feedback[l] = magnitudes
        return tuple(feedback), None

    def grads_and_loss(params, feedback, opt_state, x, y, drawn=None):
        if method == "bp":
            return bp(params, x, y)
        feedback, key = inputs(feedback, opt_state, x, drawn)
        if method == "dfa":
            if projection is None:
                return dfa_grads_and_loss(spec, params, feedback, x, y, mode)
            noise = drawn if noisy and drawn is not None else None
            return dfa_grads_and_loss(spec, params, feedback, x, y, mode, projection, noise, key)
        return rules.grads_and_loss(spec, params, feedback, x, y, rules_, mode, key)

    def angles(params, feedback, opt_state, x, y, drawn=None):
        if method == "bp" or (method == "dfa" and projection is None):
            return alignment.alignment_angles_unchecked(spec, params, feedback, x, y, mode)
        feedback, key = inputs(feedback, opt_state, x, drawn)
        if noisy and drawn is not None:  # update_angles draws its noise from a generator; here it is given
            model = as_model(spec)
            signals = blocks.dfa_signals(model, params, feedback, x, y, mode, True, projection, drawn)
            return alignment._against_bp(model, params, x, y, mode, signals[0], signals[2])
        return alignment.update_angles(spec, params, feedback, x, y, rules_, mode, key, projection)

    kp_blocks = tuple(l for l, r in enumerate(rules_[:-1]) if r == "kp")
    return StepRule(grads_and_loss, angles, stateful, kp_blocks, frozen_blocks(rules_), draws)


@functools.lru_cache(maxsize=None)
def _build_step(spec, opt, method, mode, donate, with_alignment, kp_decay=KP_DECAY, projection=None, parallel=None):
    tx = make_optimizer(opt, spec.dtype)
    rule = step_rule(spec, method, mode, projection)
    stateful, kp_blocks, frozen = rule.stateful, rule.kp_blocks, rule.frozen

    _apply = apply_updates_ if donate else apply_updates

    def update(params, grads, opt_state):
        if opt.name == "sgd" and not opt.weight_decay:  # W - lr * g as one fused multiply-add per tensor
            flat_p, flat_g = _flatten(params), _flatten(grads)
            if donate:
                torch._foreach_add_(flat_p, flat_g, alpha=-opt.learning_rate)
                return params, opt_state
            return _unflatten(torch._foreach_add(flat_p, flat_g, alpha=-opt.learning_rate), params), opt_state
        updates, opt_state = tx.update(grads, opt_state, params)
        return _apply(params, freeze(updates, frozen)), opt_state

    def rule_update(params, grads, opt_state):
        """The optimizer's update, then KP's shared update and decay; the state's step advances."""
        updates, inner = tx.update(grads, opt_state.inner, params)
        updates = freeze(updates, frozen)
        new_params, kp = _kp_update(
            params, updates, apply_updates(params, updates), opt_state.kp_feedback, kp_blocks, kp_decay
        )
        if donate:  # write into the caller's tensors, as the other paths do
            for old, new in zip(_flatten(params), _flatten(new_params)):
                old.copy_(new)
            new_params = params
        return new_params, RuleState(inner, kp, opt_state.rule_seed, opt_state.rule_step + 1)

    if parallel is not None:
        rules_ = validation.method_rules(spec, method)
        return _sharded_step(
            spec, method, rules_, mode, stateful, parallel, rule_update if stateful else update, with_alignment
        )

    def step(params, feedback, opt_state, x, y):
        hardware.check_noise_state(projection, opt_state)
        params, feedback, x, y = _as_tensors(spec, params, feedback, x, y)
        # Measured before the update, which may write into params (donate=True).
        measured = rule.angles(params, feedback, opt_state, x, y) if with_alignment else None
        grads, batch_loss = rule.grads_and_loss(params, feedback, opt_state, x, y)
        with torch.no_grad():
            params, opt_state = (rule_update if stateful else update)(params, grads, opt_state)
        if with_alignment:
            return params, opt_state, batch_loss, measured
        return params, opt_state, batch_loss

    return step


def _sharded_step(spec, method, rules_, mode, stateful, parallel, update, with_alignment):
    """The data-parallel step: every rule through ``rules._grads_and_loss`` with the grouping hook
    (an MLPSpec runs as its Dense ModelSpec there, with the same numbers), then ``update``; with
    ``with_alignment`` the global batch's angles first (``alignment._sharded_angles``)."""

    def step(params, feedback, opt_state, x, y, rows=None):
        params, feedback, x, y = _as_tensors(spec, params, feedback, x, y)
        rows = parallel.global_rows(x.shape[0], x.device) if rows is None else rows
        reducer = parallel.reducer(int(rows))
        key = None
        if stateful:  # KP's B and brsf's seed and step are the same on every process, so are the draws
            feedback = _rule_feedback(rules_, feedback, opt_state, x)
            if "brsf" in rules_[:-1]:
                key = rules.step_generator(opt_state, x.device)
        angles = None
        if with_alignment:  # measured before the update, which may write into params (donate=True)
            # 'dfa' and 'bp': the exact DFA direction; other rules: their own update (see train_step)
            rules_or_dfa = None if method in ("dfa", "bp") else rules_
            fresh = rules.step_generator(opt_state, x.device) if key is not None else None
            angles = alignment._sharded_angles(spec, params, feedback, x, y, mode, reducer, rules_or_dfa, fresh)
        grads, batch_loss = rules._grads_and_loss(spec, params, feedback or (), x, y, rules_, mode, key, reducer)
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
