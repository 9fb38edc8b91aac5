"""Every learning rule in one top-down loop (JAX): BP, FA, sign-symmetry, KP, DFA, DRTP, shallow, hybrids.

The equations are in ``dfa_core.backend.Backend.grads``. An MLPSpec runs as the ModelSpec of its
Dense layers (``dfa_jax.blocks`` computes exactly the MLP's numbers for it), so one loop serves
both. Hidden block l's teaching signal comes from its rule: a direct projection (dfa, drtp), the
VJP of block l+1 at h_l with W_{l+1} or a stand-in for it (bp, fa, kp, usf, brsf, frsf), or
nothing (shallow). ``rule_table`` holds one entry per rule. Mirrors ``dfa_torch.rules``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, cast

import jax
import jax.numpy as jnp

from dfa_core import hardware, validation
from dfa_core.backend import ArrayLike, RuleState
from dfa_core.hardware import Projection
from dfa_core.model import Block, NetSpec
from dfa_core.rules import as_model, brsf_bound, usf_scale
from dfa_core.spec import MLPSpec
from dfa_jax import blocks, nn
from dfa_jax.arrays import as_input, precision_scope
from dfa_jax.dfa import TRACE_COUNTS, prepare

Array = jax.Array
Params = Tuple[Tuple[Array, ...], ...]
Grads = Tuple[Tuple[Array, ...], ...]
RuleFeedback = Tuple[Array, ...]  # one entry per hidden block (see dfa_core.backend.Backend.grads), or ()


def brsf_magnitudes(key: Array, w_shape: Tuple[int, ...], dtype: Any) -> Array:
    """This batch's |R| for one block, U(0, brsf_bound) shaped like W_{l+1}, from a JAX key."""
    return jax.random.uniform(key, w_shape, dtype=dtype, minval=0.0, maxval=brsf_bound(w_shape))


def _mirror(rule: str, l: int, w: Array, entry: Optional[Array], key: Optional[Array]) -> Array:
    """The matrix that stands in for W_{l+1} when hidden block l's rule carries delta_{l+1} back."""
    if rule == "bp":
        return w
    if rule in ("fa", "kp"):
        return entry  # type: ignore[return-value]
    if rule == "usf":
        return usf_scale(tuple(w.shape)) * jnp.sign(w)
    if rule == "frsf" or (rule == "brsf" and entry is not None and entry.size):
        return jnp.abs(entry) * jnp.sign(w)  # type: ignore[arg-type]
    if key is None:
        raise ValueError("rule 'brsf' draws its magnitudes from a key: pass key= (an int seed or a jax.random key)")
    return brsf_magnitudes(jax.random.fold_in(key, l), tuple(w.shape), w.dtype) * jnp.sign(w)


def _carry_back(block: Block, leaves: Tuple[Array, ...], h: Array, delta: Array, f: Callable[[Array], Array]) -> Array:
    """dL/dh_l: the VJP of h -> g_{l+1}(leaves, prefix_{l+1}(h)) at h (batch, *in_shape), applied to delta."""
    _, pullback = jax.vjp(lambda h_: blocks._apply_block(block, leaves, blocks._apply_prefix(block.prefix, h_), f), h)
    return pullback(delta)[0]


def grads_and_loss(
    spec: NetSpec,
    params: Params,
    feedback: RuleFeedback,
    x: Array,
    y: Array,
    rules: Tuple[str, ...],
    mode: str,
    key: Optional[Array] = None,
) -> Tuple[Grads, Array]:
    """Every block's gradients under its rule, and the batch's loss (pure; compose under jax.jit).

    ``signals`` without the teaching signals; the arguments are its.
    """
    grads, batch_loss, _ = signals(spec, params, feedback, x, y, rules, mode, key)
    return grads, batch_loss


def signals(
    spec: NetSpec,
    params: Params,
    feedback: RuleFeedback,
    x: Array,
    y: Array,
    rules: Tuple[str, ...],
    mode: str,
    key: Optional[Array] = None,
    keep_deltas: bool = False,
) -> Tuple[Grads, Array, Tuple[Array, ...]]:
    """Every block's gradients under its rule, the batch's loss and, with ``keep_deltas``, each
    block's teaching signal (pure; compose under jax.jit).

    Args:
      spec: the network.
      params: per block (W, b) or a composite's leaves, spec.dtype.
      feedback: one entry per hidden block (``Backend.grads``), or () when no rule needs one.
      x: inputs, (batch, n_0) or (batch, *input_shape).
      y: targets, (batch, n_L).
      rules: one rule per block, ``dfa_core.validation.method_rules`` (checked there).
      mode: grouping of the direct rules; 'sample' whenever a chain rule is present.
      key: a JAX key for brsf's draws (block l folds in l); None when no brsf draws.
      keep_deltas: also return the teaching signals (``alignment.update_angles`` compares them
        with BP's).

    Returns:
      (per block its gradients, shaped like params; loss (); with keep_deltas (delta_1, ...,
      delta_{L-1}, e'), delta_l (K, *a_shape_l), zeros for a shallow block, else ()).
    """
    model = as_model(spec)
    f = nn.activation(model.activation).fn
    acts = blocks._block_activations(model)
    chain = model.blocks
    avg, count = blocks._grouping(mode, y)
    keep = (lambda t: t) if avg is None else avg
    h = x
    kept_u, kept_a, kept_h, inputs = [], [], [], []  # u'_l, a'_l, f(a'_l) per block; h_{l-1} per block
    for l, (block, leaves) in enumerate(zip(chain, params)):
        inputs.append(h)
        u = blocks._apply_prefix(block.prefix, h)
        kept_u.append(keep(u))
        a = blocks._apply_block(block, leaves, u, f)
        if l < len(chain) - 1:
            h = acts[l].fn(a)
            a_kept = keep(a)
            kept_a.append(a_kept)
            kept_h.append(h if avg is None else acts[l].fn(a_kept))
    batch_loss = nn.reduce_loss(model, a, y)
    y_hat = nn.output_function(model.output)(a)
    e = y_hat - y if avg is None else avg(y_hat) - avg(y)
    target = y if avg is None else avg(y)
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
            grads[l] = tuple(jnp.zeros_like(t) for t in params[l])
            deltas.append(jnp.zeros_like(kept_a[l]))
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
    return tuple(grads), batch_loss, tuple(reversed(deltas)) if keep_deltas else ()


def _grads(spec, params, feedback, x, y, rules, mode, key):
    TRACE_COUNTS["grads"] += 1
    return grads_and_loss(spec, params, feedback, x, y, rules, mode, key)[0]


grads_unchecked = jax.jit(_grads, static_argnames=("spec", "rules", "mode"))
"""``grads`` on JAX arrays of spec.dtype with rules already expanded, without validation; jitted."""


def as_key(key: Any) -> Optional[Array]:
    """None, an int seed (jax.random.PRNGKey) or a JAX key array -> a key array (or None)."""
    if key is None:
        return None
    if isinstance(key, bool):
        raise TypeError(f"key must be an int seed or a jax.random key, got {key!r}")
    if isinstance(key, int):
        return jax.random.PRNGKey(validation.check_int("key", key, 0))
    if isinstance(key, jax.Array):
        return key
    raise TypeError(f"key must be an int seed or a jax.random key, got {type(key).__name__}")


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
      params: per block (W, b) or a composite's leaves, NumPy or JAX arrays of spec.dtype.
      feedback: one entry per hidden block for the rules that need one, else ().
      x: inputs, (batch, n_0) or (batch, *input_shape).
      y: targets, (batch, n_L).
      method: a name in dfa_core.METHODS or a sequence of L names.
      mode: grouping for dfa/drtp; 'sample' for every other rule.
      key: brsf's randomness: an int seed or a jax.random key.
      check_values: reject non-finite values (and non-one-hot y for 'class_mean').

    Returns:
      Per block its gradients, JAX arrays shaped like params.

    Raises:
      ValueError, TypeError: a bad spec, method, combination, mode, feedback, key or batch.
    """
    with precision_scope(getattr(spec, "dtype", "float32")):
        validation.check_spec(spec)
        rules = validation.method_rules(spec, validation.method_key(method))
        validation.check_rules_mode(rules, mode)
        validation.check_rule_feedback(spec, rules, feedback)
        params_j, _, x, y = prepare(cast(MLPSpec, spec), params, None, x, y, mode, check_values)  # either spec type
        feedback_j = tuple(as_input(b, spec.dtype) for b in feedback)
        if check_values:
            for l, b in enumerate(feedback_j, start=1):
                validation.raise_for_nonfinite(f"feedback entry {l}", bool(jnp.all(jnp.isfinite(b))))
        jkey = as_key(key)
        if _draws(spec, rules, feedback_j) and jkey is None:
            raise ValueError(
                "rule 'brsf' draws fresh magnitudes every batch: pass key= (an int seed or a jax.random key), "
                "or this batch's magnitudes as its feedback entries"
            )
        return grads_unchecked(spec, params_j, feedback_j, x, y, rules, mode, jkey)


def _draws(spec: NetSpec, rules: Tuple[str, ...], feedback: Tuple[Any, ...]) -> bool:
    """Whether some brsf block draws its magnitudes (its feedback entry is absent or zero-size)."""
    return any(r == "brsf" and (not feedback or not feedback[l].size) for l, r in enumerate(rules[:-1]))


def init_rule_state(
    spec: NetSpec, method: Any, opt_state: Any, feedback: Any, seed: int = 0, projection: Optional[Projection] = None
) -> Any:
    """``RuleState(opt_state, KP's B, seed, 0)`` when ``method`` has 'kp' or 'brsf', or the
    ``projection`` draws noise; else ``opt_state``.

    Args:
      spec: the network.
      method: the rule name, or one per block.
      opt_state: ``make_optimizer(opt, spec.dtype).init(params)``.
      feedback: the feedback ``grads`` takes; the entries of kp blocks become the trained B.
      seed: brsf's seed (step t draws from jax.random.fold_in(PRNGKey(seed), t)), >= 0.
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
    if "kp" in rules[:-1]:
        validation.check_rule_feedback(spec, rules, feedback)
    with precision_scope(spec.dtype):
        kp = tuple(
            as_input(feedback[l], spec.dtype) if r == "kp" else jnp.zeros((0,), spec.dtype)
            for l, r in enumerate(rules[:-1])
        )
        if "kp" not in rules[:-1]:
            kp = ()
        return RuleState(opt_state, kp, jnp.asarray(seed, jnp.int32), jnp.asarray(0, jnp.int32))


__all__ = [
    "as_model",
    "brsf_bound",
    "brsf_magnitudes",
    "grads",
    "grads_and_loss",
    "grads_unchecked",
    "init_rule_state",
    "signals",
    "usf_scale",
]
