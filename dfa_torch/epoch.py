"""A whole training epoch, and the labels of a dataset, over device-resident data (torch).

The torch twin of ``dfa_jax.epoch``, name for name. torch has no whole-epoch compiler
here, so the epoch is a Python loop of ``train_step``'s own step over batches gathered
on the device with ``index_select``; it reads nothing back to the host (the losses are
stacked on the device), so it never waits for the device inside the epoch.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Tuple

import torch

from dfa_core import hardware, validation
from dfa_core.hardware import Projection
from dfa_core.model import NetSpec
from dfa_core.parallel import shard_bounds
from dfa_core.rules import KP_DECAY, check_kp_decay
from dfa_core.spec import OptimizerSpec
from dfa_torch.mlp import Params, forward
from dfa_torch.parallel import DataParallel, _check_parallel, _refuse
from dfa_torch.train import _build_step

Tensor = torch.Tensor


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
) -> Callable[..., Tuple[Any, Any, Tensor, Optional[Tensor]]]:
    """Builds epoch(params, feedback, opt_state, x, y, order, step0) -> (params, opt_state, losses, angles).

    The torch twin of ``dfa_jax.train_epoch`` (cached per argument combination): batch
    i is ``order[i * batch_size:(i + 1) * batch_size]``, gathered from ``x`` and ``y``
    on their device; the ragged last batch (N % batch_size samples) is one step of its
    own size. Every step is ``train_step``'s (the with_alignment one on measured steps).

    The returned function takes:
      params: ((W_l, b_l), ...), W_l (n_l, n_{l-1}), b_l (n_l,), tensors of spec.dtype.
      feedback: (B_1, ..., B_{L-1}), B_l (n_l, n_L); ignored for 'bp'.
      opt_state: from ``make_optimizer(opt, spec.dtype).init(params)``.
      x: the whole training set, (N, n_0) (a ModelSpec: (N, *input_shape)), spec.dtype, unchecked (check it once).
      y: its targets, (N, n_L); one-hot for 'class_mean'.
      order: (N,) integer permutation of range(N) (NumPy or a tensor).
      step0: global index of the epoch's first step (Python int or 0-d integer tensor,
        read once).

    and returns params and opt_state after the epoch, ``losses`` (num_batches,) (each
    batch's loss before its update, on the device) and ``angles`` (num_batches, 2, L):
    rows i with (step0 + i) % align_every == 0 hold the angles to BP (weights,
    deltas) in degrees measured before that step's update; other rows are NaN.
    ``angles`` is None when align_every == 0.

    Args:
      spec: the network.
      opt: the optimizer.
      method: a rule in dfa_core.METHODS or a tuple of one per block (train_step's).
      mode: DFA grouping, one of dfa_core.MODES ('sample' for 'bp').
      batch_size: samples per step, >= 1.
      donate: let the steps write the new params into the tensors passed in (in place).
      align_every: measure the angles every ``align_every`` global steps; 0 never.
      projection: hardware effects on DFA's projections (``train_step``'s projection; method
        'dfa' only). With noise the opt_state is a ``RuleState`` and step t's draws come from
        (rule_seed, t), so an epoch equals its steps run one by one.
      parallel: ``dfa_torch.parallel.data_parallel()``'s setup, or None (one process). Every
        process passes the whole training set, the same order and the same params, feedback
        and opt_state; each gathers only its rows ``shard_bounds(len(batch), size, rank)`` of
        every global batch, and gets back the one-device result of the global batches (params,
        opt_state, losses) on every process. batch_size must be a multiple of parallel.size
        (the ragged last batch splits unevenly; a process may get no rows of it). The angles
        (align_every > 0) are the global batches', on every process. Not with a projection.
      kp_decay: KP's lambda in [0, 1) (``train_step``'s), for kp blocks.

    Raises:
      ValueError, TypeError: a bad spec, optimizer, method, mode, batch_size,
        align_every, projection or parallel, before anything runs.
    """
    validation.check_train_step(spec, opt, method, mode)
    method = validation.method_key(method)
    batch_size = validation.check_int("batch_size", batch_size, 1)
    align_every = validation.check_int("align_every", align_every, 0)
    hw = hardware.check_step_projection(method, projection)
    dp = _check_parallel(parallel, batch_size)
    if dp is not None and hw is not None:
        raise _refuse("projection (hardware effects)")
    return _build_epoch(
        spec, opt, method, mode, batch_size, bool(donate), align_every, hw, dp, check_kp_decay(kp_decay)
    )


@functools.lru_cache(maxsize=None)
def _build_epoch(spec, opt, method, mode, batch_size, donate, align_every, projection, parallel, kp_decay):
    if parallel is not None:
        return _sharded_epoch(spec, opt, method, mode, batch_size, donate, align_every, parallel, kp_decay)
    step = _build_step(spec, opt, method, mode, donate, False, kp_decay, projection)
    align_step = _build_step(spec, opt, method, mode, donate, True, kp_decay, projection) if align_every else None

    def epoch(params, feedback, opt_state, x, y, order, step0=0):
        order = torch.as_tensor(order, device=x.device)
        step0 = int(step0)
        num_batches = -(-x.shape[0] // batch_size)
        losses, angles = [], None
        if align_every:
            angles = torch.full((num_batches, 2, spec.num_layers), math.nan, dtype=x.dtype, device=x.device)
        for i in range(num_batches):
            idx_B = order[i * batch_size : (i + 1) * batch_size]
            xb, yb = x.index_select(0, idx_B), y.index_select(0, idx_B)
            # align_step and angles exist exactly when align_every > 0.
            if align_step is not None and angles is not None and (step0 + i) % align_every == 0:
                params, opt_state, batch_loss, measured = align_step(params, feedback, opt_state, xb, yb)
                angles[i, 0], angles[i, 1] = measured.weights, measured.deltas
            else:
                params, opt_state, batch_loss = step(params, feedback, opt_state, xb, yb)
            losses.append(batch_loss)
        return params, opt_state, torch.stack(losses), angles

    return epoch


def _sharded_epoch(spec, opt, method, mode, batch_size, donate, align_every, parallel, kp_decay):
    """``_build_epoch``'s loop under data parallel: each global batch's rows ``shard_bounds`` here;
    the angles of the global batches measured, as on one process."""
    step = _build_step(spec, opt, method, mode, donate, False, kp_decay, None, parallel)
    align_step = _build_step(spec, opt, method, mode, donate, True, kp_decay, None, parallel) if align_every else None

    def epoch(params, feedback, opt_state, x, y, order, step0=0):
        order = torch.as_tensor(order, device=x.device)
        step0 = int(step0)
        num_batches = -(-x.shape[0] // batch_size)
        losses, angles = [], None
        if align_every:
            angles = torch.full((num_batches, 2, spec.num_layers), math.nan, dtype=x.dtype, device=x.device)
        for i in range(num_batches):
            idx_B = order[i * batch_size : (i + 1) * batch_size]
            start, stop = shard_bounds(idx_B.shape[0], parallel.size, parallel.rank)
            idx_b = idx_B[start:stop]
            xb, yb = x.index_select(0, idx_b), y.index_select(0, idx_b)
            rows = idx_B.shape[0]
            if align_step is not None and angles is not None and (step0 + i) % align_every == 0:
                params, opt_state, batch_loss, measured = align_step(params, feedback, opt_state, xb, yb, rows=rows)
                angles[i, 0], angles[i, 1] = measured.weights, measured.deltas
            else:
                params, opt_state, batch_loss = step(params, feedback, opt_state, xb, yb, rows=rows)
            losses.append(batch_loss)
        return params, opt_state, torch.stack(losses), angles

    return epoch


def _labels(spec: NetSpec, params: Params, x: Tensor) -> Tensor:
    y_hat = forward(spec, params, x)
    if spec.n_out == 1:
        return (y_hat[:, 0] > 0.5).to(torch.int32)
    return torch.argmax(y_hat, dim=1).to(torch.int32)


def predict_labels(spec: NetSpec, batch_size: int = 10000) -> Callable[[Params, Tensor], Tensor]:
    """Builds predict(params, x) -> (N,) int32 class labels on x's device.

    The torch twin of ``dfa_jax.predict_labels``: argmax of the network's output, or
    y_hat > 0.5 with one output unit (``dfa_train.trainer.labels_of``), computed
    ``batch_size`` rows at a time under ``torch.no_grad``, concatenated on the device.

    The returned function takes params ((W_l, b_l), ...) and x (N, n_0) (a ModelSpec: (N, *input_shape)), tensors of
    spec.dtype.

    Raises:
      ValueError, TypeError: a bad spec or batch_size.
    """
    validation.check_spec(spec)
    return _build_predict(spec, validation.check_int("batch_size", batch_size, 1))


@functools.lru_cache(maxsize=None)
def _build_predict(spec, batch_size):
    def predict(params, x):
        with torch.no_grad():
            return torch.cat([_labels(spec, params, x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])

    return predict


__all__ = ["predict_labels", "train_epoch"]
