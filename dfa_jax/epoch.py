"""A whole training epoch, and the labels of a dataset, each as one jitted program (JAX).

Mirrors ``dfa_torch.epoch`` name for name. The per-step path (``train_step`` called from
a Python loop) pays a dispatch, a host-side gather and a transfer per batch; here the
epoch is a ``lax.scan`` over the full batches plus one step on the ragged remainder,
with the batches gathered from the device-resident training set inside the program.
The update is ``train_step``'s own jitted function, so the math is written once.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from dfa_core import hardware, validation
from dfa_core.hardware import Projection
from dfa_core.model import NetSpec
from dfa_core.rules import KP_DECAY, check_kp_decay
from dfa_core.spec import OptimizerSpec
from dfa_jax.arrays import precision_scope
from dfa_jax.dfa import TRACE_COUNTS, Feedback
from dfa_jax.mlp import Params, forward
from dfa_jax.parallel import DataParallel, _check_parallel
from dfa_jax.train import _build_step

Array = jax.Array


def train_epoch(
    spec: NetSpec,
    opt: OptimizerSpec,
    method: str = "dfa",
    mode: str = "sample",
    batch_size: int = 200,
    donate: bool = False,
    align_every: int = 0,
    projection: Optional[Projection] = None,
    parallel: Optional[DataParallel] = None,
    kp_decay: float = KP_DECAY,
) -> Callable[..., Tuple[Any, Any, Array, Optional[Array]]]:
    """Builds epoch(params, feedback, opt_state, x, y, order, step0) -> (params, opt_state, losses, angles).

    One jitted program per argument combination (cached) and per data shape: batch i
    is ``order[i * batch_size:(i + 1) * batch_size]``, gathered from ``x`` and ``y``
    on the device; the full batches run under ``lax.scan`` and a ragged last batch
    (N % batch_size samples) as one more step of its own size, so mean reductions and
    class grouping see exactly the samples of that batch. Every step is ``train_step``'s.

    The returned function takes:
      params: ((W_l, b_l), ...), W_l (n_l, n_{l-1}), b_l (n_l,), JAX arrays of spec.dtype.
      feedback: (B_1, ..., B_{L-1}), B_l (n_l, n_L); ignored for 'bp'.
      opt_state: from ``make_optimizer(opt, spec.dtype).init(params)``.
      x: the whole training set, (N, n_0) (a ModelSpec: (N, *input_shape)), spec.dtype, unchecked (check it once).
      y: its targets, (N, n_L); one-hot for 'class_mean'.
      order: (N,) integer permutation of range(N) (NumPy or JAX; sent as int32).
      step0: global index of the epoch's first step (Python int or 0-d integer array).

    and returns params and opt_state after the epoch, ``losses`` (num_batches,) (each
    batch's loss before its update, as ``train_step`` returns it, on the device) and
    ``angles`` (num_batches, 2, L): rows i with (step0 + i) % align_every == 0 hold the
    angles to BP (weights, deltas) in degrees measured before that step's update, as
    ``train_step(..., with_alignment=True)`` gives them; other rows are NaN (a
    ``lax.cond`` skips their cost). ``angles`` is None when align_every == 0.

    Args:
      spec: the network.
      opt: the optimizer.
      method: a rule in dfa_core.METHODS or a tuple of one per block (train_step's).
      mode: DFA grouping, one of dfa_core.MODES ('sample' for 'bp').
      batch_size: samples per step, >= 1.
      donate: let XLA reuse the params and opt_state buffers passed in (they become
        invalid after the call).
      align_every: measure the angles every ``align_every`` global steps; 0 never.
      projection: hardware effects on DFA's projections (``train_step``'s projection; method
        'dfa' only). With noise the opt_state is a ``RuleState`` and step t's draws come from
        (rule_seed, t), so an epoch equals its steps run one by one.
      parallel: ``dfa_jax.parallel.data_parallel(devices)``'s setup, or None (one device). Still
        one program: params, feedback, opt_state, x, y and order are replicated over the mesh
        (``parallel.replicate``, a no-op for arrays already there), every gathered batch is
        sharded by rows over it and XLA inserts the all-reduces, so each update is the one-device
        update of the global batch and the outputs come back replicated. batch_size must be a
        multiple of the devices; a ragged last batch they do not divide runs replicated (every
        device computes it whole: exact, without the speed-up for that one step).
      kp_decay: KP's lambda in [0, 1) (``train_step``'s), for kp blocks.

    Raises:
      ValueError, TypeError: a bad spec, optimizer, method, mode, batch_size,
        align_every, projection or parallel (a batch_size the devices do not divide), before
        anything is traced.
    """
    validation.check_train_step(spec, opt, method, mode)
    method = validation.method_key(method)
    batch_size = validation.check_int("batch_size", batch_size, 1)
    align_every = validation.check_int("align_every", align_every, 0)
    hw = hardware.check_step_projection(method, projection)
    dp = _check_parallel(parallel, batch_size)
    return _build_epoch(
        spec, opt, method, mode, batch_size, bool(donate), align_every, hw, dp, check_kp_decay(kp_decay)
    )


def _angles_if_due(
    spec: NetSpec,
    angles_fn: Callable[..., Any],
    due: Array,
    params: Params,
    feedback: Feedback,
    opt_state: Any,
    xb: Array,
    yb: Array,
) -> Array:
    """(2, L) angles (weights, deltas) when ``due``, else NaN; the cond skips the measure.
    ``angles_fn`` is the step's (``train_step``'s with_alignment angles)."""

    def measure():
        angles = angles_fn(params, feedback, opt_state, xb, yb)
        return jnp.stack([angles.weights, angles.deltas])

    return lax.cond(due, measure, lambda: jnp.full((2, spec.num_layers), jnp.nan, dtype=xb.dtype))


@functools.lru_cache(maxsize=None)
def _build_epoch(spec, opt, method, mode, batch_size, donate, align_every, projection, parallel, kp_decay):
    built = _build_step(spec, opt, method, mode, False, False, kp_decay, projection)
    step = built.jitted

    def one_batch(state, feedback, x, y, idx_B, phase):
        params, opt_state = state
        # order is a permutation, so clipping never moves an index; it spares fill's mask.
        xb, yb = jnp.take(x, idx_B, axis=0, mode="clip"), jnp.take(y, idx_B, axis=0, mode="clip")
        if parallel is not None:  # the rows of the batch over the mesh; XLA partitions the rest
            xb, yb = parallel.constrain_batch(xb), parallel.constrain_batch(yb)
        angles = None
        if align_every:  # measured on the params before this step's update
            angles = _angles_if_due(spec, built.angles, phase % align_every == 0, params, feedback, opt_state, xb, yb)
        params, opt_state, batch_loss = step(params, feedback, opt_state, xb, yb)
        return (params, opt_state), (batch_loss, angles)

    def epoch(params, feedback, opt_state, x, y, order, phase):
        TRACE_COUNTS[f"train_epoch_{method}"] += 1
        num_full = x.shape[0] // batch_size
        cut = num_full * batch_size
        state, parts = (params, opt_state), []
        if num_full:
            xs = (order[:cut].reshape(num_full, batch_size), phase + jnp.arange(num_full, dtype=jnp.int32))
            body = lambda s, xs_i: one_batch(s, feedback, x, y, *xs_i)
            state, outs = lax.scan(body, state, xs)
            parts.append(outs)
        if cut < x.shape[0]:  # the ragged last batch, at its own size
            state, outs = one_batch(state, feedback, x, y, order[cut:], phase + num_full)
            parts.append(jax.tree_util.tree_map(lambda t: t[None], outs))
        losses, angles = jax.tree_util.tree_map(lambda *ts: jnp.concatenate(ts), *parts)
        return state[0], state[1], losses, angles

    donate_argnums = (0, 2) if donate else ()
    if parallel is None:
        jitted = jax.jit(epoch, donate_argnums=donate_argnums)
    else:  # every output (params, state, losses, angles) replicated, as the inputs are
        jitted = jax.jit(epoch, donate_argnums=donate_argnums, out_shardings=parallel.replicated)

    @functools.wraps(epoch)
    def run(params, feedback, opt_state, x, y, order, step0=0):
        hardware.check_noise_state(projection, opt_state)
        with precision_scope(spec.dtype):
            # Only step0 modulo align_every matters: keeps the int32 counter from overflowing.
            phase = jnp.asarray(step0 % align_every if align_every else 0, dtype=jnp.int32)
            order = jnp.asarray(order, dtype=jnp.int32)
            if parallel is not None:
                params, feedback, opt_state, x, y, order, phase = parallel.replicate(
                    (params, feedback, opt_state, x, y, order, phase)
                )
                return parallel.settle(jitted(params, feedback, opt_state, x, y, order, phase))
            return jitted(params, feedback, opt_state, x, y, order, phase)

    run.jitted = jitted  # type: ignore[attr-defined]  # a function attribute: the bare jitted program
    return run


def _labels(spec: NetSpec, params: Params, x: Array) -> Array:
    y_hat = forward(spec, params, x)
    if spec.n_out == 1:
        return (y_hat[:, 0] > 0.5).astype(jnp.int32)
    return jnp.argmax(y_hat, axis=1).astype(jnp.int32)


def predict_labels(spec: NetSpec, batch_size: int = 10000) -> Callable[[Params, Array], Array]:
    """Builds predict(params, x) -> (N,) int32 class labels on the device, one jitted program.

    The label of a row is argmax of the network's output, or y_hat > 0.5 with one
    output unit (``dfa_train.trainer.labels_of``). Rows are pushed through the network
    ``batch_size`` at a time (a ``lax.scan`` over the full chunks, then the remainder),
    which bounds the activations' memory. Jitted once per spec, batch_size and N.

    The returned function takes params ((W_l, b_l), ...) and x (N, n_0) (a ModelSpec: (N, *input_shape)), JAX arrays of
    spec.dtype.

    Raises:
      ValueError, TypeError: a bad spec or batch_size.
    """
    validation.check_spec(spec)
    return _build_predict(spec, validation.check_int("batch_size", batch_size, 1))


@functools.lru_cache(maxsize=None)
def _build_predict(spec, batch_size):
    def predict(params, x):
        TRACE_COUNTS["predict_labels"] += 1
        num_full = x.shape[0] // batch_size
        cut = num_full * batch_size
        parts = []
        if num_full == 1:
            parts.append(_labels(spec, params, x[:cut]))
        elif num_full > 1:
            chunks = x[:cut].reshape(num_full, batch_size, *x.shape[1:])
            parts.append(lax.map(lambda xc: _labels(spec, params, xc), chunks).reshape(cut))
        if cut < x.shape[0]:
            parts.append(_labels(spec, params, x[cut:]))
        return jnp.concatenate(parts)

    jitted = jax.jit(predict)

    @functools.wraps(predict)
    def run(params, x):
        with precision_scope(spec.dtype):
            return jitted(params, x)

    run.jitted = jitted  # type: ignore[attr-defined]  # a function attribute: the bare jitted program
    return run


__all__ = ["predict_labels", "train_epoch"]
