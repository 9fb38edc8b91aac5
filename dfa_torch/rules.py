"""Every learning rule in one top-down loop (torch): BP, FA, sign-symmetry, KP, DFA, DRTP, shallow, hybrids.

The equations are in ``dfa_core.backend.Backend.grads``. An MLPSpec runs as the ModelSpec of its
Dense layers (``dfa_torch.blocks`` computes exactly the MLP's numbers for it), so one loop serves
both. Hidden block l's teaching signal comes from its rule: a direct projection (dfa, drtp), the
VJP of block l+1 at h_l with W_{l+1} or a stand-in for it (bp, fa, kp, usf, brsf, frsf), or
nothing (shallow). No autograd graph outlives a call (``torch.func.vjp`` per block). Mirrors
``dfa_jax.rules``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple, cast

import torch
import torch.func

from dfa_core import hardware, validation
from dfa_core.backend import ArrayLike, RuleState
from dfa_core.hardware import Projection
from dfa_core.model import Block, NetSpec
from dfa_core.rules import as_model, brsf_bound, usf_scale
from dfa_core.spec import MLPSpec
from dfa_torch import blocks, nn
from dfa_torch.arrays import as_input, precision_scope
from dfa_torch.dfa import prepare

if TYPE_CHECKING:  # dfa_torch.parallel imports torch.distributed; only its type is read here
    from dfa_torch.parallel import Reducer

Tensor = torch.Tensor
Params = Tuple[Tuple[Tensor, ...], ...]
Grads = Tuple[Tuple[Tensor, ...], ...]
RuleFeedback = Tuple[Tensor, ...]  # one entry per hidden block (see dfa_core.backend.Backend.grads), or ()


def brsf_magnitudes(key: torch.Generator, w_shape: Tuple[int, ...], dtype: Any) -> Tensor:
    """This batch's |R| for one block, U(0, brsf_bound) shaped like W_{l+1}, from a torch.Generator."""
    return torch.rand(w_shape, generator=key, dtype=dtype, device=key.device) * brsf_bound(w_shape)


def _mirror(rule: str, l: int, w: Tensor, entry: Optional[Tensor], key: Optional[torch.Generator]) -> Tensor:
    """The matrix that stands in for W_{l+1} when hidden block l's rule carries delta_{l+1} back."""
    del l  # the generator's stream orders the draws (top block first), as JAX's fold_in(key, l) does by index
    if rule == "bp":
        return w
    if rule in ("fa", "kp"):
        return entry  # type: ignore[return-value]
    if rule == "usf":
        return usf_scale(tuple(w.shape)) * torch.sign(w)
    if rule == "frsf" or (rule == "brsf" and entry is not None and entry.numel()):
        return torch.abs(entry) * torch.sign(w)  # type: ignore[arg-type]
    if key is None:
        raise ValueError("rule 'brsf' draws its magnitudes from a key: pass key= (an int seed or a torch.Generator)")
    return brsf_magnitudes(key, tuple(w.shape), w.dtype) * torch.sign(w)


def _carry_back(
    block: Block, leaves: Tuple[Tensor, ...], h: Tensor, delta: Tensor, f: Callable[[Tensor], Tensor]
) -> Tensor:
    """dL/dh_l: the VJP of h -> g_{l+1}(leaves, prefix_{l+1}(h)) at h (batch, *in_shape), applied to delta."""
    pullback = torch.func.vjp(
        lambda h_: blocks._apply_block(block, leaves, blocks._apply_prefix(block.prefix, h_), f), h
    )[1]
    return pullback(delta)[0]


def grads_and_loss(
    spec: NetSpec,
    params: Params,
    feedback: RuleFeedback,
    x: Tensor,
    y: Tensor,
    rules: Tuple[str, ...],
    mode: str,
    key: Optional[torch.Generator] = None,
) -> Tuple[Grads, Tensor]:
    """Every block's gradients under its rule, and the batch's loss (no graph kept).

    Args:
      spec: the network.
      params: per block (W, b) or a composite's leaves, spec.dtype.
      feedback: one entry per hidden block (``Backend.grads``), or () when no rule needs one.
      x: inputs, (batch, n_0) or (batch, *input_shape).
      y: targets, (batch, n_L).
      rules: one rule per block, ``dfa_core.validation.method_rules`` (checked there).
      mode: grouping of the direct rules; 'sample' whenever a chain rule is present.
      key: a torch.Generator on the params' device for brsf's draws (top block first); None
        when no brsf draws.

    Returns:
      (per block its gradients, shaped like params; loss ()).
    """
    return _grads_and_loss(spec, params, feedback, x, y, rules, mode, key)


@torch.no_grad()
def _grads_and_loss(
    spec: NetSpec,
    params: Params,
    feedback: RuleFeedback,
    x: Tensor,
    y: Tensor,
    rules: Tuple[str, ...],
    mode: str,
    key: Optional[torch.Generator] = None,
    reducer: Optional[Reducer] = None,
) -> Tuple[Grads, Tensor]:
    """``grads_and_loss``; with a ``reducer`` (data parallel), those of the global batch whose rows
    x, y (rows >= 0) are this process's shard (``signals``). Every process returns the same
    gradients and loss."""
    grads, batch_loss, _ = signals(spec, params, feedback, x, y, rules, mode, key, reducer=reducer)
    return grads, batch_loss


@torch.no_grad()
def signals(
    spec: NetSpec,
    params: Params,
    feedback: RuleFeedback,
    x: Tensor,
    y: Tensor,
    rules: Tuple[str, ...],
    mode: str,
    key: Optional[torch.Generator] = None,
    keep_deltas: bool = False,
    reducer: Optional[Reducer] = None,
) -> Tuple[Grads, Tensor, Tuple[Tensor, ...]]:
    """Every block's gradients under its rule, the loss and, with ``keep_deltas``, each block's
    teaching signal (``alignment.update_angles`` compares them with BP's); the other arguments are
    ``grads_and_loss``'s.

    With a ``reducer`` (data parallel) x, y are this process's rows of the global batch. Grouped
    modes: the group sums of every grouped tensor (u'_l, a'_l, y_hat', y'), the class counts and
    the loss sum are all-reduced in ONE buffer after the forward pass (``blocks._shard_grouping``),
    so the update that follows is already the global batch's. 'sample' mode: the gradient sums
    (e' / n_global for reduction 'mean') and the loss sum are all-reduced in one buffer at the
    end (``_sum_over_shards``).

    Returns:
      (per block its gradients; loss (); with keep_deltas (delta_1, ..., delta_{L-1}, e'), delta_l
      (K, *a_shape_l), zeros for a shallow block, else ()). Under a reducer in 'sample' mode the
      deltas are this shard's rows.
    """
    model = as_model(spec)
    f = nn.activation(model.activation).fn
    acts = blocks._block_activations(model)
    chain = blocks._blocks(model)
    sharded = reducer is not None and mode != "sample"
    avg: Optional[Callable[[Tensor], Tensor]]
    if sharded:  # keep this shard's group sums now, make them global means after the forward pass
        avg, means = blocks._shard_grouping(mode, y, cast("Reducer", reducer))
    else:
        avg, count = blocks._grouping(mode, y)
        count = count if reducer is None else reducer.rows
    keep = (lambda t: t) if avg is None else avg
    h = x
    kept_u, kept_a, kept_h, inputs = [], [], [], []  # u'_l, a'_l, f(a'_l) per block; h_{l-1} per block
    a = x
    for l, (block, leaves) in enumerate(zip(chain, params)):
        inputs.append(h)
        u = blocks._apply_prefix(block.prefix, h)
        kept_u.append(keep(u))
        a = blocks._apply_block(block, leaves, u, f)
        if l < len(chain) - 1:
            h = acts[l].fn(a)
            kept_a.append(keep(a))
            if avg is None:
                kept_h.append(h)
    # Data parallel: this shard's loss sum (no mean: a shard may be empty).
    batch_loss = nn.reduce_loss(model, a, y) if reducer is None else torch.sum(nn.per_sample_loss(model.output, a, y))
    y_hat = nn.output_function(model.output)(a)
    if sharded:
        grouped, count, batch_loss = means([*kept_u, *kept_a, keep(y_hat), keep(y)], batch_loss)
        n = len(chain)
        kept_u, kept_a, (y_hat_g, y_g) = grouped[:n], grouped[n:-2], grouped[-2:]
        e, target = y_hat_g - y_g, y_g
    else:
        e = y_hat - y if avg is None else avg(y_hat) - avg(y)
        target = y if avg is None else avg(y)
    if avg is not None:
        kept_h = [act.fn(a_kept) for act, a_kept in zip(acts, kept_a)]
    if model.reduction == "mean":
        e, target = e / count, target / count
    grads: list = [None] * len(chain)
    delta = e  # delta_{l+1}, walking down
    deltas = [e]
    grads[-1] = blocks._block_vjp(chain[-1], params[-1], kept_u[-1], e, f)
    for l in reversed(range(len(chain) - 1)):
        rule = rules[l]
        entry = feedback[l] if feedback else None
        if rule == "shallow":
            grads[l] = tuple(torch.zeros_like(t) for t in params[l])
            deltas.append(torch.zeros_like(kept_a[l]))
            continue
        if rule in validation.DIRECT_RULES:
            source = e if rule == "dfa" else target
            p = (source @ entry.T).reshape(source.shape[0], *chain[l].a_shape)  # type: ignore[union-attr]
        else:
            above = chain[l + 1]
            leaves = params[l + 1]
            if rule != "bp":
                leaves = (_mirror(rule, l, leaves[0], entry, key), *leaves[1:])
            p = _carry_back(above, leaves, inputs[l + 1], delta, f)
        delta = acts[l].backward(p, kept_a[l], kept_h[l])
        deltas.append(delta)
        grads[l] = blocks._block_vjp(chain[l], params[l], kept_u[l], delta, f)
    kept = tuple(reversed(deltas)) if keep_deltas else ()
    if reducer is None:
        return tuple(grads), batch_loss, kept
    if sharded:  # the grouped update is already the global batch's; so is the loss sum
        return tuple(grads), (batch_loss / reducer.rows if model.reduction == "mean" else batch_loss), kept
    return (*_sum_over_shards(model, tuple(grads), batch_loss, reducer), kept)


def _sum_over_shards(model: Any, grads: Grads, loss_sum: Tensor, reducer: Reducer) -> Tuple[Grads, Tensor]:
    """The global batch's gradients and loss from one shard's in 'sample' mode: the gradient sums
    and the loss sum are all-reduced in one buffer; the loss is divided by the global rows for
    reduction 'mean'."""
    leaves = [g for block in grads for g in block]
    flat = reducer.psum(torch.cat([*(g.reshape(-1) for g in leaves), loss_sum.reshape(1)]))
    parts = torch.split(flat[:-1], [g.numel() for g in leaves])
    it = iter(p.view_as(g) for p, g in zip(parts, leaves))
    total = flat[-1]
    return tuple(tuple(next(it) for _ in block) for block in grads), (
        total / reducer.rows if model.reduction == "mean" else total
    )


def grads_unchecked(
    spec: NetSpec,
    params: Params,
    feedback: RuleFeedback,
    x: Tensor,
    y: Tensor,
    rules: Tuple[str, ...],
    mode: str,
    key: Optional[torch.Generator] = None,
) -> Grads:
    """``grads`` on tensors of spec.dtype with rules already expanded, without validation."""
    return grads_and_loss(spec, params, feedback, x, y, rules, mode, key)[0]


def as_key(key: Any, device: Any = None) -> Optional[torch.Generator]:
    """None, an int seed (a Generator on ``device`` seeded with it) or a torch.Generator -> a Generator (or None)."""
    if key is None or isinstance(key, torch.Generator):
        return key
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"key must be an int seed or a torch.Generator, got {type(key).__name__}")
    return torch.Generator(device=device or "cpu").manual_seed(validation.check_int("key", key, 0))


def grads(
    spec: NetSpec,
    params: Any,
    feedback: Any,
    x: ArrayLike,
    y: ArrayLike,
    method: Any = "dfa",
    mode: str = "sample",
    key: Any = None,
    check_values: bool = True,
) -> Grads:
    """The gradients of one batch under ``method`` (one rule, or one per block); see ``Backend.grads``.

    Args:
      spec: the network.
      params: per block (W, b) or a composite's leaves, NumPy arrays or tensors of spec.dtype.
      feedback: one entry per hidden block for the rules that need one, else ().
      x: inputs, (batch, n_0) or (batch, *input_shape).
      y: targets, (batch, n_L).
      method: a name in dfa_core.METHODS or a sequence of L names.
      mode: grouping for dfa/drtp; 'sample' for every other rule.
      key: brsf's randomness: an int seed or a torch.Generator on the params' device.
      check_values: reject non-finite values (and non-one-hot y for 'class_mean').

    Returns:
      Per block its gradients, tensors shaped like params.

    Raises:
      ValueError, TypeError: a bad spec, method, combination, mode, feedback, key or batch.
    """
    with precision_scope(getattr(spec, "dtype", "float32")):
        validation.check_spec(spec)
        rules = validation.method_rules(spec, validation.method_key(method))
        validation.check_rules_mode(rules, mode)
        validation.check_rule_feedback(spec, rules, feedback)
        params_t, _, x, y = prepare(cast(MLPSpec, spec), params, None, x, y, mode, check_values)  # either spec type
        device = params_t[0][0].device
        feedback_t = tuple(as_input(b, spec.dtype, device) for b in feedback)
        if check_values:
            for l, b in enumerate(feedback_t, start=1):
                validation.raise_for_nonfinite(f"feedback entry {l}", bool(torch.isfinite(b).all()))
        gen = as_key(key, device)
        if _draws(rules, feedback_t) and gen is None:
            raise ValueError(
                "rule 'brsf' draws fresh magnitudes every batch: pass key= (an int seed or a torch.Generator), "
                "or this batch's magnitudes as its feedback entries"
            )
        return grads_unchecked(spec, params_t, feedback_t, x, y, rules, mode, gen)


def _draws(rules: Tuple[str, ...], feedback: Tuple[Any, ...]) -> bool:
    """Whether some brsf block draws its magnitudes (its feedback entry is absent or zero-size)."""
    return any(r == "brsf" and (not feedback or not feedback[l].numel()) for l, r in enumerate(rules[:-1]))


def init_rule_state(
    spec: NetSpec, method: Any, opt_state: Any, feedback: Any, seed: int = 0, projection: Optional[Projection] = None
) -> Any:
    """``RuleState(opt_state, KP's B, seed, 0)`` when ``method`` has 'kp' or 'brsf', or the
    ``projection`` draws noise; else ``opt_state``.

    Args:
      spec: the network.
      method: the rule name, or one per block.
      opt_state: ``make_optimizer(opt, spec.dtype).init(params)``.
      feedback: the feedback ``grads`` takes; the entries of kp blocks become the trained B
        (tensors stay on their device; NumPy arrays go to the CPU).
      seed: brsf's seed (step t draws from a Generator seeded with seed * 2^32 + t), >= 0.
      projection: the ``train_step``'s dfa_core.hardware.Projection (method 'dfa' only), or None;
        with noise, step t draws it from (seed, t) as brsf does.

    Returns:
      The opt_state the ``train_step`` of ``method`` takes.
    """
    key = validation.method_key(method)
    rules = validation.method_rules(spec, key)
    hw = hardware.active(projection)
    if hw is not None and key != "dfa":
        raise ValueError(
            f"projection (hardware effects on DFA's projection e B_l^T) applies to method 'dfa' only, got {key!r}"
        )
    noisy = hw is not None and hw.noise is not None
    if not noisy and not any(r in validation.STATEFUL_RULES for r in rules[:-1]):
        return opt_state
    seed = validation.check_int("seed", seed, 0)
    kp: Tuple[Tensor, ...] = ()
    if "kp" in rules[:-1]:
        validation.check_rule_feedback(spec, rules, feedback)
        device = next((b.device for b in feedback if isinstance(b, torch.Tensor)), None)
        kp = tuple(
            as_input(feedback[l], spec.dtype, device).clone()
            if r == "kp"
            else torch.zeros((0,), dtype=getattr(torch, spec.dtype), device=device)
            for l, r in enumerate(rules[:-1])
        )
    return RuleState(opt_state, kp, torch.tensor(seed, dtype=torch.int32), torch.tensor(0, dtype=torch.int32))


def step_generator(state: RuleState, device: Any) -> torch.Generator:
    """brsf's Generator of one training step: seeded with seed * 2^32 + step (a host sync per step)."""
    return torch.Generator(device=device).manual_seed(int(state.rule_seed) * 2**32 + int(state.rule_step))


__all__ = [
    "as_model",
    "brsf_bound",
    "brsf_magnitudes",
    "grads",
    "grads_and_loss",
    "grads_unchecked",
    "init_rule_state",
    "signals",
    "step_generator",
    "usf_scale",
]
