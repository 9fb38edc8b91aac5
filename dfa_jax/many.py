"""Many networks trained at once (JAX): a ``jax.vmap`` over members of one jitted epoch.

Mirrors ``dfa_torch.many`` name for name; ``dfa_train.fit_many`` drives it. Every array
of a member (params, feedback, optimizer state, batch order, optimizer hyper-parameters)
is stacked along a leading member axis M, and one member's epoch (a ``lax.scan`` over
its full batches, then one step on the ragged remainder, gathered on the device from the
shared training set) is vmapped over that axis and jitted: M members are one program.
The learning rate, momentum, b1, b2 and eps are traced arrays, so members that differ
only in those numbers share the program; the optimizer's name (and nesterov) fixes its
structure and keys the compilation.

The math is the backend's own, ``train_step``'s own functions (``train.step_rule``): ``dfa_grads_and_loss``
(with a ``Projection``: quantised error, noise from each member's ``RuleState`` key) for DFA,
``bp_grads_and_loss`` for BP, ``rules.grads_and_loss`` for every other rule or a tuple of one per
block (KP's B from the state, brsf's magnitudes from the member's key: keys are data, so
``jax.vmap`` batches them); optax's ``sgd`` / ``adam`` (as ``make_optimizer`` builds them, here
from traced hyper-parameters) and ``train._kp_update`` for the update;
``alignment_angles_unchecked`` (dfa, bp) or ``update_angles`` (the update a rule or a projection
applies) for the angles.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from dfa_core import hardware, validation
from dfa_core.backend import RuleState
from dfa_core.hardware import Projection
from dfa_core.members import Hyper, check_epoch_many, check_structure, hyper_columns
from dfa_core.model import NetSpec
from dfa_core.rules import KP_DECAY
from dfa_core.spec import OptimizerSpec
from dfa_jax.arrays import precision_scope
from dfa_jax.dfa import TRACE_COUNTS
from dfa_jax.mlp import Params, forward
from dfa_jax.optim import apply_updates, with_weight_decay
from dfa_jax.train import _kp_update, freeze, step_rule

Array = jax.Array


def stack_hyper(opts: Sequence[OptimizerSpec], dtype: str = "float32") -> Hyper:
    """The hyper-parameters of ``opts`` (one OptimizerSpec per member) as ``Hyper`` arrays (M,)."""
    with precision_scope(dtype):
        return Hyper(*(jnp.asarray(column, dtype=dtype) for column in hyper_columns(opts)))


def _transform(optimizer: str, nesterov: bool, hyper: Hyper) -> optax.GradientTransformation:
    """``make_optimizer``'s optax transform for one member, from its (traced) hyper-parameters ().

    Weight decay is always applied (a member without it adds 0 * p, exactly nothing): the members'
    decays are traced values, so no member's setting can pick the program."""
    if optimizer == "sgd":
        tx = optax.sgd(hyper.learning_rate)
    elif optimizer == "momentum":
        tx = optax.sgd(hyper.learning_rate, momentum=hyper.momentum, nesterov=nesterov)
    else:
        tx = optax.adam(hyper.learning_rate, b1=hyper.b1, b2=hyper.b2, eps=hyper.eps)
    return with_weight_decay(tx, hyper.weight_decay)


def init_opt_state_many(optimizer: str, nesterov: bool, params: Params, hyper: Hyper) -> Any:
    """Optimizer states of M members: ``make_optimizer(...).init`` vmapped over the member axis.

    Args:
      optimizer: 'sgd', 'momentum' or 'adam'.
      nesterov: Nesterov momentum ('momentum' only).
      params: ((W_l, b_l), ...) stacked, W_l (M, n_l, n_{l-1}), b_l (M, n_l).
      hyper: ``stack_hyper`` of the members.

    Returns:
      The optax state with a leading member axis on every leaf (Adam's count is (M,)).
    """
    optimizer, nesterov = check_structure(optimizer, nesterov)
    with precision_scope(validation.dtype_name(params[0][0])):
        return jax.vmap(lambda p, h: _transform(optimizer, nesterov, h).init(p))(params, hyper)


def train_epoch_many(
    spec: NetSpec,
    optimizer: str = "sgd",
    nesterov: bool = False,
    method: Any = "dfa",
    mode: str = "sample",
    batch_size: int = 200,
    align_every: int = 0,
    projection: Optional[Projection] = None,
    kp_decay: float = KP_DECAY,
) -> Callable[..., Tuple[Any, Any, Array, Optional[Array]]]:
    """Builds epoch(params, feedback, opt_state, hyper, active, x, y, orders, step0) for M members.

    One jitted program per argument combination (cached) and per shape (M, N): member m
    runs ``train_step``'s update over the batches ``orders[m, i*batch_size:(i+1)*batch_size]``
    of the shared, device-resident ``x``/``y`` (a ``lax.scan`` over the full batches, then
    one step of N % batch_size samples), under ``jax.vmap`` over the member axis. A member
    whose ``active`` is False computes but keeps its params and optimizer state (frozen).

    The returned function takes params ((W_l, b_l), ...) with W_l (M, n_l, n_{l-1}),
    b_l (M, n_l); feedback: what ``grads`` takes for ``method``, each entry with a leading
    member axis (dfa/drtp B_l (M, size of a_l, n_L); fa/frsf (M, *W_{l+1}.shape); (M, 0)
    where a block needs nothing; () when no rule needs any; 'bp' ignores DFA's B_l);
    opt_state from ``init_opt_state_many``, wrapped in a ``RuleState`` of (M,)-stacked fields
    (KP's B (M, *W_{l+1}.shape) or (M, 0), rule_seed (M,) int32, rule_step (M,) int32) when a
    rule is 'kp' or 'brsf' or the projection has noise, as ``init_rule_state`` builds it per
    member; hyper ``Hyper`` (M,); active (M,) bool; x (N, n_0) and y (N, n_L) of spec.dtype
    (checked once by the caller); orders (M, N) int32, one permutation of range(N) per member;
    step0 the global index of the epoch's first step. It returns (params, opt_state,
    losses (M, S) each batch's loss before its update, angles (M, S, 2, L) or None):
    S = ceil(N / batch_size); rows s with (step0 + s) % align_every == 0 hold the angles to BP
    (weights, deltas) in degrees measured before that step's update, other rows NaN;
    None when align_every == 0. The params and opt_state passed in are donated (invalid
    after the call).

    Args:
      spec: the network.
      optimizer: 'sgd', 'momentum' or 'adam' (the numbers come from ``hyper``).
      nesterov: Nesterov momentum ('momentum' only).
      method: a rule in dfa_core.METHODS or a tuple of one per block (``train_step``'s).
      mode: DFA grouping, one of dfa_core.MODES ('sample' unless every rule is dfa/drtp).
      batch_size: samples per step, >= 1.
      align_every: measure the angles every ``align_every`` global steps (``train_step``'s
        with_alignment angles: the exact DFA direction for 'dfa' and 'bp', the update applied for
        every other rule and a projection); 0 never.
      projection: ``train_step``'s hardware effects on DFA's projections (method 'dfa'); noise
        is drawn from each member's (rule_seed, rule_step) key, as a single run draws it. Not
        with a plug-in ``device``: it is a host call, outside the one program.

      kp_decay: KP's lambda in [0, 1) (``train_step``'s), for kp blocks.

    Raises:
      ValueError, TypeError: bad arguments, before anything is traced.
    """
    checked = check_epoch_many(spec, optimizer, nesterov, method, mode, batch_size, align_every, projection, kp_decay)
    return _build_epoch(*checked)


def _member_step(spec, optimizer, nesterov, method, mode, align_every, projection, kp_decay):
    """One member's step(state, feedback, hyper, x, y, idx_B, phase) -> (state, (loss, angles))."""
    rule = step_rule(spec, method, mode, projection)

    def step(state, feedback, hyper, x, y, idx_B, phase):
        params, opt_state = state
        # orders are permutations, so clipping never moves an index; it spares the gather's mask.
        xb, yb = jnp.take(x, idx_B, axis=0, mode="clip"), jnp.take(y, idx_B, axis=0, mode="clip")
        angles = None
        if align_every:  # measured on the params before this step's update; phase is not vmapped
            angles = lax.cond(
                phase % align_every == 0,
                lambda: jnp.stack(rule.angles(params, feedback, opt_state, xb, yb)),
                lambda: jnp.full((2, spec.num_layers), jnp.nan, dtype=xb.dtype),
            )
        grads, batch_loss = rule.grads_and_loss(params, feedback, opt_state, xb, yb)
        tx = _transform(optimizer, nesterov, hyper)
        updates, inner = tx.update(grads, opt_state.inner if rule.stateful else opt_state, params)
        updates = freeze(updates, rule.frozen)
        new_params, new_state = apply_updates(params, updates), inner
        if rule.stateful:  # KP's shared update of W_{l+1} and B_l; the key's step advances
            new_params, kp = _kp_update(params, updates, new_params, opt_state.kp_feedback, rule.kp_blocks, kp_decay)
            new_state = RuleState(inner, kp, opt_state.rule_seed, opt_state.rule_step + 1)
        return (new_params, new_state), (batch_loss, angles)

    return step


@functools.lru_cache(maxsize=None)
def _build_epoch(spec, optimizer, nesterov, method, mode, batch_size, align_every, projection, kp_decay):
    step = _member_step(spec, optimizer, nesterov, method, mode, align_every, projection, kp_decay)

    def member_epoch(params, feedback, opt_state, hyper, active, x, y, order_N, phase):
        num_full = x.shape[0] // batch_size
        cut = num_full * batch_size
        state, parts = (params, opt_state), []
        if num_full:
            xs = (order_N[:cut].reshape(num_full, batch_size), phase + jnp.arange(num_full, dtype=jnp.int32))
            state, outs = lax.scan(lambda s, xs_i: step(s, feedback, hyper, x, y, *xs_i), state, xs)
            parts.append(outs)
        if cut < x.shape[0]:  # the ragged last batch, at its own size
            state, outs = step(state, feedback, hyper, x, y, order_N[cut:], phase + num_full)
            parts.append(jax.tree_util.tree_map(lambda t: t[None], outs))
        losses, angles = jax.tree_util.tree_map(lambda *ts: jnp.concatenate(ts), *parts)
        # A stopped member keeps the params and state it stopped with.
        params, opt_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(active, new, old), state, (params, opt_state)
        )
        return params, opt_state, (losses, angles)

    def epoch(params, feedback, opt_state, hyper, active, x, y, orders, phase):
        TRACE_COUNTS[f"train_epoch_many_{method}"] += 1
        params, opt_state, (losses, angles) = jax.vmap(member_epoch, in_axes=(0, 0, 0, 0, 0, None, None, 0, None))(
            params, feedback, opt_state, hyper, active, x, y, orders, phase
        )
        return params, opt_state, losses, angles

    jitted = jax.jit(epoch, donate_argnums=(0, 2))

    @functools.wraps(epoch)
    def run(params, feedback, opt_state, hyper, active, x, y, orders, step0=0):
        hardware.check_noise_state(projection, opt_state)
        with precision_scope(spec.dtype):
            # Only step0 modulo align_every matters: keeps the int32 counter from overflowing.
            phase = jnp.asarray(step0 % align_every if align_every else 0, dtype=jnp.int32)
            active = jnp.asarray(active, dtype=bool)
            return jitted(params, feedback, opt_state, hyper, active, x, y, jnp.asarray(orders, jnp.int32), phase)

    run.jitted = jitted  # type: ignore[attr-defined]  # a function attribute: the bare jitted program
    return run


def _labels(spec: NetSpec, params: Params, x: Array) -> Array:
    y_hat = forward(spec, params, x)
    if spec.n_out == 1:
        return (y_hat[:, 0] > 0.5).astype(jnp.int32)
    return jnp.argmax(y_hat, axis=1).astype(jnp.int32)


def predict_labels_many(spec: NetSpec, batch_size: int = 10000) -> Callable[[Params, Array], Array]:
    """Builds predict(params, x) -> (M, N) int32 labels of M members, one jitted program.

    A label is argmax of the output, or y_hat > 0.5 with one output unit
    (``dfa_train.labels_of``). Rows go through the M networks ``batch_size`` at a time
    (a ``lax.map`` over the full chunks, then the remainder), which bounds the
    activations to (M, batch_size, n_l). params are stacked ((W_l (M, n_l, n_{l-1}),
    b_l (M, n_l)), ...), x (N, n_0) is shared; both JAX arrays of spec.dtype.

    Raises:
      ValueError, TypeError: a bad spec or batch_size.
    """
    validation.check_spec(spec)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return _build_predict(spec, batch_size)


@functools.lru_cache(maxsize=None)
def _build_predict(spec, batch_size):
    labels_M = jax.vmap(lambda p, xc: _labels(spec, p, xc), in_axes=(0, None))

    def predict(params, x):
        TRACE_COUNTS["predict_labels_many"] += 1
        num_full = x.shape[0] // batch_size
        cut = num_full * batch_size
        parts = []
        if num_full:
            chunks = x[:cut].reshape(num_full, batch_size, *x.shape[1:])
            out = lax.map(lambda xc: labels_M(params, xc), chunks)  # (num_full, M, batch_size)
            parts.append(jnp.moveaxis(out, 0, 1).reshape(-1, cut))
        if cut < x.shape[0]:
            parts.append(labels_M(params, x[cut:]))
        return jnp.concatenate(parts, axis=1)

    jitted = jax.jit(predict)

    @functools.wraps(predict)
    def run(params, x):
        with precision_scope(spec.dtype):
            return jitted(params, x)

    run.jitted = jitted  # type: ignore[attr-defined]  # a function attribute: the bare jitted program
    return run


def memory_free() -> Optional[Tuple[int, str]]:
    """(free bytes, device name) of JAX's default device where it reports them, else None.

    Accelerators report ``memory_stats()`` (bytes_limit - bytes_in_use); JAX's CPU device
    does not, and the caller reads the host's free memory instead.
    """
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.platform}:{device.id}"


__all__ = [
    "Hyper",
    "init_opt_state_many",
    "memory_free",
    "predict_labels_many",
    "stack_hyper",
    "train_epoch_many",
]
