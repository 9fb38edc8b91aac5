"""One backend-neutral training loop (DFA or BP) that records a per-epoch ``History``.

Imports neither torch nor JAX: the backend module does the arithmetic. Batches are
drawn with NumPy (``np.random.default_rng(seed).permutation`` once per epoch), so the
torch and JAX backends see the same batches in the same order and, in float64, give
the same history. By default an epoch is one call of the backend's compiled
``train_epoch`` over data put on the device once (``engine='epoch'``); ``engine='step'``
keeps the per-step loop (one ``train_step`` call per batch from Python), which gives
the same history.

    from dfa_core import MLPSpec, OptimizerSpec
    from dfa_train.trainer import fit
    spec = MLPSpec((784, 200, 10), activation="tanh", output="sigmoid")
    history = fit("jax", spec, x_train, y_train, x_test=x_test, y_test=y_test,
                  optimizer=OptimizerSpec("sgd", 1e-4), epochs=10, batch_size=200)
    print(history.to_json())
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from types import ModuleType
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union, cast

import numpy as np
import numpy.typing as npt

from dfa_core import hardware, validation
from dfa_core import parallel as dfa_parallel
from dfa_core.backend import ParamsLike
from dfa_core.hardware import Projection
from dfa_core.init import init_feedback, init_params
from dfa_core.model import ModelSpec, NetSpec
from dfa_core.registry import resolve_backend
from dfa_core.rules import KP_DECAY, check_kp_decay
from dfa_core.spec import METHODS, OptimizerSpec
from dfa_train import memory, schedule
from dfa_train.arch import describe_layers
from dfa_train.state import (
    AlignmentRecord,
    EpochEnd,
    History,
    LossExplodedError,
    NonFiniteLossError,
    ResumeState,
    opt_state_from_numpy,
    opt_state_to_numpy,
)

ENGINES = ("epoch", "step")


def feedback_rule(method: Any) -> Any:
    """The ``method`` whose feedback layout a run draws: DFA's B_l for 'dfa' and 'bp' (a BP run keeps
    DFA's matrices, against which its alignment angles are measured), the rule's own otherwise."""
    return "dfa" if method in ("dfa", "bp") else method


"""fit's engines: 'epoch' runs each epoch as one compiled call, 'step' one call per batch."""


def _check_data(spec: NetSpec, x, y, mode: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Checks a whole dataset once (shapes, finiteness, one-hot rows for class_mean); returns NumPy arrays.

    For a ModelSpec, flat rows (N, C * H * W) are reshaped to (N, *input_shape) (row-major, the
    (C, H, W) order the datasets store).
    """
    x, y = np.asarray(x), np.asarray(y)
    if isinstance(spec, ModelSpec) and x.ndim == 2 and len(spec.input_shape) > 1 and x.shape[1] == spec.n_in:
        x = x.reshape(x.shape[0], *spec.input_shape)
    try:
        validation.check_batch(spec, x, y)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{split} data: {err}") from None
    x, y = x.astype(spec.dtype, copy=False), y.astype(spec.dtype, copy=False)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{split} data: x has non-finite values (nan or inf)")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{split} data: y has non-finite values (nan or inf)")
    if validation.needs_one_hot(mode) and not (np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1)):
        raise ValueError(
            f"{split} data: mode {mode!r} groups samples by class, so y must be one-hot "
            "(each row has a single 1 and zeros elsewhere)"
        )
    return x, y


def labels_of(y: np.ndarray) -> np.ndarray:
    """Class labels of targets or predictions (N, n_L): argmax, or y > 0.5 with one output unit."""
    y = np.asarray(y)
    if y.shape[1] == 1:
        return (y[:, 0] > 0.5).astype(np.int64)
    return np.argmax(y, axis=1)


def _predict_labels(be, spec, params, x_nat, n: int, chunk: int) -> np.ndarray:
    out = [labels_of(be.to_numpy(be.forward(spec, params, x_nat[i : i + chunk]))) for i in range(0, n, chunk)]
    return np.concatenate(out)


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows the true class, columns the predicted one."""
    return np.bincount(true * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """fit's checked options: what stays fixed for the whole run."""

    be: ModuleType  # the backend module (dfa_torch or dfa_jax)
    spec: NetSpec
    method: str  # a name in dfa_core.METHODS, or one per block (validation.method_key)
    mode: str  # DFA grouping
    optimizer: OptimizerSpec
    epochs: int  # total epochs, >= 1 (a resumed run counts the ones already done)
    batch_size: int  # samples per step, >= 1
    seed: int  # seeds the NumPy generator that orders the batches
    tol: Optional[float]  # early-stop threshold on the train error change; None never stops
    patience: int  # consecutive epochs within tol needed to stop, >= 1
    align_every: int  # measure angles every this many global steps; 0 never
    eval_batch_size: int  # rows per forward pass when measuring errors
    donate: bool  # let steps reuse the previous params' buffers
    engine: str  # one of ENGINES
    projection: Optional[Projection]  # the active hardware projection of a 'dfa' run; None: exact DFA
    stop_on_nonfinite: bool
    diverge_factor: Optional[float]  # stop when the loss exceeds this multiple of the initial loss; None never
    on_epoch: Optional[Callable[[EpochEnd], None]]
    on_batch: Optional[Callable[[int, int, int], None]]
    parallel: Any = None  # the backend's DataParallel (dfa_<backend>.parallel), or None on one device
    lr_milestones: Tuple[int, ...] = ()  # epochs at which the learning rate is multiplied by lr_gamma
    lr_gamma: float = 0.1
    kp_decay: float = KP_DECAY  # Kolen-Pollack's lambda per step (kp blocks only)

    def optimizer_at(self, epoch: int) -> OptimizerSpec:
        """The optimizer of epoch ``epoch`` (0-based): the learning rate after the milestones passed."""
        return schedule.optimizer_at(self.optimizer, epoch, self.lr_milestones, self.lr_gamma)

    layers: Any = None  # the backend's LayerParallel (dfa_<backend>.layer_parallel), or None: not layer parallel

    def place(self, tree: Any) -> Any:
        """Native arrays where the run keeps them: replicated over the devices in a data-parallel run."""
        return tree if self.parallel is None else self.parallel.replicate(tree)

    def parallel_kwargs(self) -> Dict[str, Any]:
        """The backend calls' parallel keyword: none at all on one device (the calls of before)."""
        return {} if self.parallel is None else {"parallel": self.parallel}


class _Data(NamedTuple):
    """The datasets, checked and put on the backend's device once."""

    x: Any  # (N, n_0) native array
    y: Any  # (N, n_L) native array
    labels: np.ndarray  # (N,) int64 true training labels
    x_test: Any  # (M, n_0) native array, or None
    test_labels: Optional[np.ndarray]  # (M,) int64, or None
    feedback: Any  # (B_1, ..., B_{L-1}) native arrays, B_l (n_l, n_L)


@dataclasses.dataclass
class _Loop:
    """What changes from epoch to epoch (and what a ResumeState restores)."""

    params: Any  # ((W_l, b_l), ...) native arrays
    opt_state: Any  # the backend optimizer's state
    rng: np.random.Generator  # draws each epoch's batch order
    first_epoch: int = 0
    global_step: int = 0
    within_tol: int = 0
    losses: List[float] = dataclasses.field(default_factory=list)
    errors: List[float] = dataclasses.field(default_factory=list)
    accuracies: List[float] = dataclasses.field(default_factory=list)
    times: List[float] = dataclasses.field(default_factory=list)
    records: List[AlignmentRecord] = dataclasses.field(default_factory=list)
    staged: Any = None  # a layer-parallel run's stages (LayerParallel.place); params and opt_state are
    # their gather after each epoch. None: not placed yet (or not layer parallel)
    pred: Optional[np.ndarray] = None  # (N,) labels predicted after the last epoch
    test_pred: Optional[np.ndarray] = None  # (M,)
    stopped_early: bool = False
    reference_loss: Optional[float] = None  # per-sample loss of the run's first batch, before any update


def _settings(
    backend: Union[str, ModuleType],
    spec: NetSpec,
    method: str,
    mode: str,
    optimizer: Optional[OptimizerSpec],
    epochs: int,
    batch_size: int,
    seed: int,
    tol: Optional[float],
    patience: int,
    align_every: int,
    eval_batch_size: int,
    donate: bool,
    engine: str,
    stop_on_nonfinite: bool,
    diverge_factor: Optional[float],
    on_epoch: Optional[Callable[[EpochEnd], None]],
    on_batch: Optional[Callable[[int, int, int], None]],
    projection: Optional[Projection] = None,
    devices: Optional[int] = None,
    stages: Optional[int] = None,
    microbatches: int = 1,
    lr_milestones: Sequence[int] = (),
    lr_gamma: float = 0.1,
    kp_decay: float = KP_DECAY,
) -> _Settings:
    """Checks fit's options (not the data) and returns them as one frozen record."""
    be = resolve_backend(backend)
    validation.check_spec(spec)
    rules = validation.method_rules(spec, method)  # one rule name, or one per block
    validation.check_rules_mode(rules, mode)
    method = validation.method_key(method)
    optimizer = OptimizerSpec() if optimizer is None else optimizer
    if not isinstance(optimizer, OptimizerSpec):
        raise TypeError(f"optimizer must be a dfa_core.OptimizerSpec, got {type(optimizer).__name__}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0):
        raise ValueError(f"tol must be None or a number >= 0, got {tol!r}")
    if not isinstance(donate, bool):
        raise TypeError(f"donate must be a bool, got {donate!r}")
    if diverge_factor is not None and (
        isinstance(diverge_factor, bool)
        or not isinstance(diverge_factor, numbers.Real)
        or not 1 < diverge_factor < math.inf
    ):
        raise ValueError(f"diverge_factor must be None or a finite number > 1, got {diverge_factor!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    projection = hardware.active(projection)
    if projection is not None and method != "dfa":
        raise ValueError(
            f"fit: projection (hardware effects on DFA's projection e B_l^T) applies to method 'dfa' only, "
            f"got {method!r}"
        )
    for name, fn in (("on_epoch", on_epoch), ("on_batch", on_batch)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
    layers = _layer_parallel(
        be, spec, optimizer, method, mode, stages, microbatches, devices, engine, align_every, projection, batch_size
    )
    parallel = _data_parallel(be, devices, engine, batch_size) if layers is None else None
    milestones, gamma = schedule.check_milestones(lr_milestones, lr_gamma)
    if milestones and layers is not None:
        raise ValueError("fit: lr_milestones (a stepped learning rate) is not taken with stages (layer parallel) yet")
    return _Settings(
        be,
        spec,
        method,
        mode,
        optimizer,
        epochs=validation.check_int("epochs", epochs, 1),
        batch_size=validation.check_int("batch_size", batch_size, 1),
        seed=validation.check_int("seed", seed, 0),
        tol=tol,
        patience=validation.check_int("patience", patience, 1),
        align_every=validation.check_int("align_every", align_every, 0),
        eval_batch_size=validation.check_int("eval_batch_size", eval_batch_size, 1),
        donate=donate,
        engine=engine,
        projection=projection,
        stop_on_nonfinite=bool(stop_on_nonfinite),
        diverge_factor=None if diverge_factor is None else float(diverge_factor),
        on_epoch=on_epoch,
        on_batch=on_batch,
        parallel=parallel,
        lr_milestones=milestones,
        lr_gamma=gamma,
        kp_decay=check_kp_decay(kp_decay),
        layers=layers,
    )


def _data_parallel(be: ModuleType, devices: Optional[int], engine: str, batch_size: int) -> Any:
    """The backend's DataParallel for ``devices`` (JAX: a mesh of that many devices; torch: the torchrun
    launch this process belongs to), or None on one device; checked before any data is touched."""
    if devices is not None:
        devices = validation.check_int("devices", devices, 1)
    parallel = be.data_parallel(devices)
    if parallel is None:
        return None
    if engine != "epoch":
        raise ValueError(f"fit: data-parallel training runs the compiled epoch; use engine='epoch', got {engine!r}")
    dfa_parallel.check_data_parallel(parallel.size, batch_size)
    return parallel


def _layer_parallel(
    be: ModuleType,
    spec: NetSpec,
    optimizer: OptimizerSpec,
    method: Any,
    mode: str,
    stages: Optional[int],
    microbatches: int,
    devices: Optional[int],
    engine: str,
    align_every: int,
    projection: Optional[Projection],
    batch_size: int,
) -> Any:
    """The backend's LayerParallel for ``stages`` >= 2 (JAX: the first ``stages`` devices of this
    process; torch: the torchrun launch this process belongs to, one stage per process), or None
    for ``stages`` None or 1; checked before any data is touched."""
    microbatches = validation.check_int("microbatches", microbatches, 1)
    if stages is not None:
        stages = validation.check_int("stages", stages, 1)
    if stages is None or stages == 1:
        if microbatches != 1:
            raise ValueError(
                f"fit: microbatches={microbatches} pipelines the stages of a layer-parallel run; "
                f"set stages >= 2 (or microbatches=1), got stages={stages}"
            )
        return None
    what = f"fit: layer-parallel training (stages={stages})"
    dfa_parallel.check_layer_method(method)
    if devices is not None:
        raise ValueError(
            f"{what} and data-parallel training (devices={devices}) together are not supported; "
            "choose one: stages splits the blocks over devices, devices splits every batch"
        )
    if engine != "epoch":
        raise ValueError(f"{what} runs its own per-batch steps; use engine='epoch' (the default), got {engine!r}")
    if validation.check_int("align_every", align_every, 0):
        raise ValueError(f"{what} measures no alignment angles; use align_every=0, got {align_every}")
    if projection is not None:
        raise ValueError(f"{what} trains exact DFA; projection (hardware effects) must be None, got {projection!r}")
    if validation.check_int("batch_size", batch_size, 1) % microbatches:
        raise ValueError(
            f"{what}: batch_size={batch_size} is not divisible by microbatches={microbatches}: every micro-batch "
            "of a batch has the same number of samples (a ragged last batch runs with fewer micro-batches)"
        )
    if be.NAME != "torch" and dfa_parallel.launched_world_size() > 1:
        raise ValueError(
            f"{what}: this process was launched by torchrun, but JAX runs one process over all its devices; "
            "run it without torchrun"
        )
    joined = be.data_parallel(None)  # torch: joins this torchrun launch's process group; JAX: None
    world = 1 if joined is None else joined.size
    if be.NAME == "torch" and world != stages:
        start = f"torchrun --standalone --nproc-per-node {stages} ..."
        if world == 1:
            raise ValueError(
                f"{what}: torch runs one stage per process, but this process runs alone; launch with `{start}`"
            )
        raise ValueError(f"{what}: torch runs one stage per process, but this launch has {world}; launch `{start}`")
    return be.layer_parallel(spec, optimizer, stages, microbatches, mode, method)


def _start(run: _Settings, params_np, feedback, resume: Optional[ResumeState]) -> _Loop:
    """The loop state before the first epoch to run: fresh, or restored from ``resume``."""
    be = run.be
    params = run.place(be.asarray(params_np))
    opt_state = be.make_optimizer(run.optimizer, run.spec.dtype).init(params)
    # KP carries its trained B, and brsf and projection noise their draw counter, in the optimizer
    # state (a RuleState): a resumed run draws what the uninterrupted one would have.
    opt_state = run.place(be.init_rule_state(run.spec, run.method, opt_state, feedback, run.seed, **_hardware(run)))
    loop = _Loop(params, opt_state, np.random.default_rng(run.seed))
    if resume is not None:
        if resume.opt_state is not None:
            loop.opt_state = run.place(opt_state_from_numpy(be, opt_state, resume.opt_state))
        loop.rng.bit_generator.state = resume.rng_state
        loop.losses, loop.errors = list(resume.loss), list(resume.train_error)
        loop.accuracies, loop.times = list(resume.test_accuracy), list(resume.time_s)
        loop.within_tol, loop.global_step, loop.first_epoch = resume.within_tol, resume.global_step, resume.epoch
        loop.reference_loss = resume.reference_loss
    return loop


def _hardware(run: _Settings) -> Dict[str, Any]:
    """The backend calls' projection keyword: none at all without one (the calls of before)."""
    return {} if run.projection is None else {"projection": run.projection}


def projection_config(projection: Optional[Projection]) -> Optional[Dict[str, Any]]:
    """A Projection as JSON-ready settings (History.config's "projection"); None for None.

    The device, a callable, is recorded by its name only (``"device": "module.qualname"``),
    and only when there is one.
    """
    if projection is None:
        return None
    out: Dict[str, Any] = {
        "quantize": projection.quantize,
        "threshold": projection.threshold,
        "noise": projection.noise,
        "sigma": projection.sigma,
        "mu": projection.mu,
    }
    device = projection.device
    if device is not None:
        name = getattr(device, "__qualname__", None) or type(device).__qualname__
        module = getattr(device, "__module__", None) or type(device).__module__
        out["device"] = f"{module}.{name}" if module else name
    return out


def _feedback_now(be: ModuleType, loop: _Loop, feedback_np) -> Tuple[np.ndarray, ...]:
    """The feedback as it stands: KP's trained B (kept in its RuleState) where the rule trains it,
    else the fixed matrices drawn at the start."""
    trained = [np.asarray(be.to_numpy(b)) for b in getattr(loop.opt_state, "kp_feedback", ())]
    if trained:
        return tuple(b if b.size else np.asarray(f) for b, f in zip(trained, feedback_np))
    return tuple(np.asarray(b) for b in feedback_np)


def _record_angles(loop: _Loop, epoch: int, step: int, weights, deltas) -> None:
    loop.records.append(AlignmentRecord(step, epoch, tuple(map(float, weights)), tuple(map(float, deltas))))


def _epoch_by_steps(run: _Settings, data: _Data, loop: _Loop, epoch: int, order: np.ndarray) -> np.ndarray:
    """engine='step': one ``train_step`` call per batch from Python; returns the (num_batches,) losses."""
    be, spec, n = run.be, run.spec, order.shape[0]
    hw = {"kp_decay": run.kp_decay, **_hardware(run)}
    step = be.train_step(spec, run.optimizer_at(epoch), run.method, run.mode, run.donate, **hw)
    align_step = None
    if run.align_every:
        align_step = be.train_step(
            spec, run.optimizer_at(epoch), run.method, run.mode, run.donate, with_alignment=True, **hw
        )
    order, num_batches, batch_losses = be.asarray(order), -(-n // run.batch_size), []
    for i, start in enumerate(range(0, n, run.batch_size)):
        idx = order[start : start + run.batch_size]
        xb, yb = data.x[idx], data.y[idx]
        if align_step is not None and loop.global_step % run.align_every == 0:
            # One compiled step that also measures the angles to BP before updating.
            loop.params, loop.opt_state, batch_loss, angles = align_step(
                loop.params, data.feedback, loop.opt_state, xb, yb
            )
            _record_angles(loop, epoch, loop.global_step, *be.to_numpy(tuple(angles)))
        else:
            loop.params, loop.opt_state, batch_loss = step(loop.params, data.feedback, loop.opt_state, xb, yb)
        batch_losses.append(batch_loss)
        loop.global_step += 1
        if run.on_batch is not None:
            run.on_batch(epoch, i, num_batches)
    # One host transfer per epoch; it also waits for the epoch's work to finish.
    return np.asarray(be.to_numpy(tuple(batch_losses)), dtype=np.float64)


def _epoch_compiled(run: _Settings, data: _Data, loop: _Loop, epoch: int, order: np.ndarray) -> np.ndarray:
    """engine='epoch': one ``train_epoch`` call; returns the (num_batches,) losses.

    ``on_batch`` cannot run inside the compiled epoch, so it is called for every batch
    index after the epoch has finished (cheap Python calls, no synchronisation).
    """
    be = run.be
    epoch_fn = be.train_epoch(
        run.spec,
        run.optimizer_at(epoch),
        run.method,
        run.mode,
        run.batch_size,
        run.donate,
        run.align_every,
        **_hardware(run),
        **run.parallel_kwargs(),
        kp_decay=run.kp_decay,
    )
    loop.params, loop.opt_state, losses, angles = epoch_fn(
        loop.params, data.feedback, loop.opt_state, data.x, data.y, be.asarray(order), loop.global_step
    )
    steps = loop.global_step + np.arange(losses.shape[0])
    due = np.flatnonzero(steps % run.align_every == 0) if run.align_every else np.zeros(0, dtype=np.int64)
    # One host transfer per epoch (angles only when some were measured); it also waits for the epoch.
    if due.size:
        losses, angles = be.to_numpy((losses, angles))
        for d in due:
            _record_angles(loop, epoch, int(steps[d]), angles[d, 0], angles[d, 1])
    else:
        losses = be.to_numpy(losses)
    loop.global_step += losses.shape[0]
    if run.on_batch is not None:
        for i in range(losses.shape[0]):
            run.on_batch(epoch, i, losses.shape[0])
    return np.asarray(losses, dtype=np.float64)


def _epoch_layer_parallel(run: _Settings, data: _Data, loop: _Loop, epoch: int, order: np.ndarray) -> np.ndarray:
    """A layer-parallel epoch: one ``LayerParallel.step`` per batch, in the order of the other engines;
    returns the (num_batches,) losses.

    The stages are placed at the first epoch and kept across epochs; after each epoch they are
    gathered into ``loop.params`` and ``loop.opt_state`` (the one-device layout), which the
    evaluation, ``on_epoch`` and checkpoints read.
    """
    be, lp, n = run.be, run.layers, order.shape[0]
    if loop.staged is None:
        loop.staged = lp.place(loop.params, data.feedback, loop.opt_state)
    order_nat, num_batches, batch_losses = be.asarray(order), -(-n // run.batch_size), []
    for i, start in enumerate(range(0, n, run.batch_size)):
        idx = order_nat[start : start + run.batch_size]
        engine = _microbatched(run, min(run.batch_size, n - start))
        loop.staged, batch_loss = engine.step(loop.staged, data.x[idx], data.y[idx])
        batch_losses.append(batch_loss)
        loop.global_step += 1
        if run.on_batch is not None:
            run.on_batch(epoch, i, num_batches)
    loop.params, loop.opt_state = lp.gather(loop.staged)
    # One host transfer per epoch; it also waits for the epoch's work to finish.
    return np.asarray(be.to_numpy(tuple(batch_losses)), dtype=np.float64)


def _microbatched(run: _Settings, rows: int) -> Any:
    """The LayerParallel that steps a batch of ``rows`` samples: the run's, or, for a ragged last
    batch that its micro-batches do not divide, the same stages with the most micro-batches (up to
    the run's) that divide it. The step is the one-device step either way; only the pipelining differs."""
    lp = run.layers
    if rows % lp.microbatches == 0:
        return lp
    fewer = max(m for m in range(1, lp.microbatches) if rows % m == 0)
    return run.be.layer_parallel(run.spec, run.optimizer, lp.size, fewer, run.mode, run.method)


def _predict(run: _Settings, params, x) -> np.ndarray:
    """(rows,) int64 predicted labels of native inputs x (rows, n_0)."""
    if run.engine == "step":
        return _predict_labels(run.be, run.spec, params, x, x.shape[0], run.eval_batch_size)
    labels = run.be.predict_labels(run.spec, run.eval_batch_size)(params, x)
    return np.asarray(run.be.to_numpy(labels), dtype=np.int64)


def _evaluate(run: _Settings, data: _Data, loop: _Loop) -> None:
    """Measures the current params on the training (and test) set into ``loop.pred``/``test_pred``."""
    loop.pred = _predict(run, loop.params, data.x)
    if data.x_test is not None:
        loop.test_pred = _predict(run, loop.params, data.x_test)


def _run_epoch(run: _Settings, data: _Data, loop: _Loop, epoch: int) -> None:
    """Trains one epoch, then records its loss, time, train error and test accuracy."""
    n = data.labels.shape[0]
    order = loop.rng.permutation(n).astype(np.int32)
    start_time = time.perf_counter()
    run_batches = (
        _epoch_layer_parallel
        if run.layers is not None
        else _epoch_compiled
        if run.engine == "epoch"
        else _epoch_by_steps
    )
    batch_losses = run_batches(run, data, loop, epoch, order)
    loop.times.append(time.perf_counter() - start_time)
    if run.spec.reduction == "mean":
        sizes = np.diff(np.append(np.arange(0, n, run.batch_size), n))
        batch_losses = batch_losses * sizes
    if loop.reference_loss is None and epoch == 0:
        loop.reference_loss = float(batch_losses[0]) / min(run.batch_size, n)
    loop.losses.append(float(np.sum(batch_losses) / n))
    _check_divergence(run, loop, epoch)
    _evaluate(run, data, loop)
    loop.errors.append(float(np.mean(loop.pred != data.labels)))
    if data.test_labels is not None:
        loop.accuracies.append(float(np.mean(loop.test_pred == data.test_labels)))


def _check_divergence(run: _Settings, loop: _Loop, epoch: int) -> None:
    """Raises a DivergenceError for a NaN/inf loss or params (stop_on_nonfinite), or a loss above
    diverge_factor times the initial per-sample loss: before the epoch reaches on_epoch."""
    loss = loop.losses[-1]
    if run.stop_on_nonfinite and not math.isfinite(loss):
        raise NonFiniteLossError(epoch + 1, loss)
    if run.stop_on_nonfinite:
        for l, pair in enumerate(run.be.to_numpy(loop.params), start=1):
            if not all(np.all(np.isfinite(a)) for a in pair):
                raise NonFiniteLossError(epoch + 1, loss, f"layer {l}'s params overflowed to NaN/inf (loss {loss})")
    ref = loop.reference_loss
    if run.diverge_factor is not None and ref is not None and ref > 0 and loss > run.diverge_factor * ref:
        raise LossExplodedError(epoch + 1, loss, ref, run.diverge_factor)


def _should_stop(run: _Settings, loop: _Loop, epoch: int) -> bool:
    """Counts epochs whose train error moved by at most tol; True once ``patience`` in a row."""
    if run.tol is None or epoch < 1:
        return False
    loop.within_tol = loop.within_tol + 1 if abs(loop.errors[-1] - loop.errors[-2]) <= run.tol else 0
    if loop.within_tol < run.patience:
        return False
    loop.stopped_early = epoch + 1 < run.epochs
    return True


def _epoch_end(run: _Settings, data: _Data, loop: _Loop, epoch: int, feedback_np) -> EpochEnd:
    """What on_epoch gets: the epoch's numbers and NumPy copies of params and optimizer state."""
    be = run.be
    opt_np = opt_state_to_numpy(be, loop.opt_state)
    resume_here = ResumeState(
        epoch + 1,
        loop.global_step,
        loop.rng.bit_generator.state,
        opt_np,
        tuple(loop.losses),
        tuple(loop.errors),
        tuple(loop.accuracies),
        tuple(loop.times),
        loop.within_tol,
        loop.reference_loss,
    )
    n, seconds = data.labels.shape[0], loop.times[-1]
    return EpochEnd(
        epoch=epoch + 1,
        epochs=run.epochs,
        global_step=loop.global_step,
        loss=loop.losses[-1],
        train_error=loop.errors[-1],
        test_accuracy=loop.accuracies[-1] if data.test_labels is not None else None,
        time_s=seconds,
        samples_per_s=n / seconds if seconds > 0 else float("inf"),
        alignment=tuple(r for r in loop.records if r.epoch == epoch),
        params=tuple(tuple(np.asarray(t) for t in block) for block in be.to_numpy(loop.params)),
        feedback=_feedback_now(be, loop, feedback_np),
        opt_state=opt_np,
        resume=resume_here,
    )


def final_confusion(
    spec: NetSpec,
    labels: np.ndarray,
    pred: Optional[np.ndarray],
    test_labels: Optional[np.ndarray],
    test_pred: Optional[np.ndarray],
) -> Tuple[np.ndarray, str]:
    """History's confusion matrix and its split: on the test set when there is one, else the training set.

    The predictions exist by then: the evaluation runs after every epoch (and at once for a run
    resumed after its last epoch).
    """
    num_classes = max(spec.n_out, 2)
    if test_labels is not None:
        return confusion_matrix(test_labels, cast(np.ndarray, test_pred), num_classes), "test"
    return confusion_matrix(labels, cast(np.ndarray, pred), num_classes), "train"


def history_config(
    be: ModuleType, spec: NetSpec, settings: Dict[str, Any], n_train: int, test_labels: Optional[np.ndarray]
) -> Dict[str, Any]:
    """History.config: the backend and spec, the run's ``settings`` (fit's keyword names), the data sizes."""
    model: Dict[str, Any] = (
        {"input_shape": list(spec.input_shape), "arch": describe_layers(spec.layers)}
        if isinstance(spec, ModelSpec)
        else {"layer_sizes": list(spec.layer_sizes)}
    )
    spec_fields = {
        **model,
        "activation": spec.activation,
        "output": spec.output,
        "reduction": spec.reduction,
        "dtype": spec.dtype,
    }
    n_test = int(test_labels.shape[0]) if test_labels is not None else 0
    return {"backend": be.__name__, **spec_fields, **settings, "n_train": int(n_train), "n_test": n_test}


def _history(run: _Settings, data: _Data, loop: _Loop, params_out, feedback_np, drawn: Dict[str, Any]) -> History:
    """The History of a finished run; ``drawn`` holds the seeds of what fit drew itself (or None)."""
    confusion, split = final_confusion(run.spec, data.labels, loop.pred, data.test_labels, loop.test_pred)
    settings = {
        "method": run.method,
        "mode": run.mode,
        "optimizer": run.optimizer.to_dict(),
        "epochs": run.epochs,
        "batch_size": run.batch_size,
        "seed": run.seed,
        **drawn,
        "tol": run.tol,
        "patience": run.patience,
        "align_every": run.align_every,
    }
    if run.projection is not None:  # recorded only when set: exact-DFA configs stay as they were
        settings["projection"] = projection_config(run.projection)
    if run.parallel is not None:  # likewise: one-device configs stay as they were
        settings["devices"] = run.parallel.size
    if run.lr_milestones:  # likewise: runs at a fixed learning rate
        settings["lr_milestones"], settings["lr_gamma"] = list(run.lr_milestones), run.lr_gamma
    if "kp" in validation.method_rules(run.spec, run.method):  # likewise: runs without a kp block
        settings["kp_decay"] = run.kp_decay
    if run.layers is not None:
        settings["stages"], settings["microbatches"] = run.layers.size, run.layers.microbatches
    config = history_config(run.be, run.spec, settings, data.labels.shape[0], data.test_labels)
    return History(
        loss=tuple(loop.losses),
        train_error=tuple(loop.errors),
        test_accuracy=tuple(loop.accuracies),
        time_s=tuple(loop.times),
        confusion=confusion,
        confusion_split=split,
        alignment=tuple(loop.records),
        stopped_early=loop.stopped_early,
        config=config,
        params=tuple(tuple(np.asarray(t) for t in block) for block in params_out),
        feedback=_feedback_now(run.be, loop, feedback_np),
    )


def _train(run: _Settings, data: _Data, loop: _Loop, feedback_np):
    """The epoch loop; returns the final params as NumPy. Call inside the backend's precision scope."""
    for epoch in range(loop.first_epoch, run.epochs):
        _run_epoch(run, data, loop, epoch)
        stop = _should_stop(run, loop, epoch)
        if run.on_epoch is not None:
            run.on_epoch(_epoch_end(run, data, loop, epoch, feedback_np))
        if stop:
            break
    if loop.pred is None:  # resumed after the last epoch: nothing ran, measure the given params
        _evaluate(run, data, loop)
    return run.be.to_numpy(loop.params)


def fit(
    backend: Union[str, ModuleType],
    spec: NetSpec,
    x_train: npt.ArrayLike,
    y_train: npt.ArrayLike,
    *,
    x_test: Optional[npt.ArrayLike] = None,
    y_test: Optional[npt.ArrayLike] = None,
    method: str = "dfa",
    mode: str = "sample",
    optimizer: Optional[OptimizerSpec] = None,
    epochs: int = 10,
    batch_size: int = 200,
    seed: int = 0,
    params: Optional[ParamsLike] = None,
    param_seed: int = 0,
    feedback: Optional[Sequence[Any]] = None,
    feedback_seed: int = 1,
    feedback_dist: Optional[str] = None,
    feedback_scale: Optional[float] = None,
    feedback_transform: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    feedback_options: Optional[Mapping[str, Any]] = None,
    projection: Optional[Projection] = None,
    tol: Optional[float] = None,
    patience: int = 1,
    align_every: int = 0,
    eval_batch_size: int = 10000,
    donate: bool = False,
    resume: Optional[ResumeState] = None,
    on_epoch: Optional[Callable[[EpochEnd], None]] = None,
    on_batch: Optional[Callable[[int, int, int], None]] = None,
    stop_on_nonfinite: bool = False,
    diverge_factor: Optional[float] = None,
    engine: str = "epoch",
    devices: Optional[int] = None,
    stages: Optional[int] = None,
    microbatches: int = 1,
    lr_milestones: Sequence[int] = (),
    lr_gamma: float = 0.1,
    kp_decay: float = KP_DECAY,
) -> History:
    """Trains ``spec`` by DFA or BP on one backend and records a ``History``.

    The data are validated once, up front, and converted to the backend once. Epoch e
    visits the samples in the order ``rng.permutation(N)`` of
    ``rng = np.random.default_rng(seed)`` (one draw per epoch), in batches of
    ``batch_size`` (the last one may be smaller). With ``engine='epoch'`` (default) the
    epoch is one call of ``backend.train_epoch`` (on JAX one compiled program) and the
    errors are measured by ``backend.predict_labels``; with ``engine='step'`` every step
    is one call of ``backend.train_step`` from Python. Both give the same history.

    Args:
      backend: 'torch', 'jax' or a backend module (``dfa_torch``, ``dfa_jax``).
      spec: the network (its dtype is the dtype of the whole run).
      x_train: inputs, (N, n_0).
      y_train: targets, (N, n_L); one-hot for classification (``mode='class_mean'`` needs it).
      x_test: optional test inputs, (M, n_0); given with ``y_test``.
      y_test: optional test targets, (M, n_L).
      method: a learning rule in dfa_core.METHODS ('dfa', 'bp', 'fa', 'kp', ...), or a tuple of one per block.
      mode: DFA grouping, one of dfa_core.MODES; must be 'sample' for 'bp'.
      optimizer: default ``OptimizerSpec('sgd', 1e-3)``. With reduction 'sum' and SGD,
        W -= lr * (sum of the per-group gradients), the report's update.
      epochs: maximum number of epochs, >= 1.
      batch_size: samples per step, >= 1.
      seed: seeds the NumPy generator that orders the batches.
      params: initial ((W_l, b_l), ...) arrays, W_l (n_l, n_{l-1}), b_l (n_l,); default
        ``init_params(spec, param_seed)``.
      param_seed: seed of the default initial parameters.
      feedback: feedback matrices (B_1, ..., B_{L-1}), B_l (n_l, n_L), instead of a draw.
      feedback_seed, feedback_dist, feedback_scale, feedback_transform, feedback_options: the draw
        ``init_feedback(spec, feedback_seed, feedback_dist, feedback_scale, feedback_transform,
        **feedback_options)``; None dist and scale take the preset's defaults
        (``dfa_core.feedback``; options such as ``{"k": 3}`` for ``feedback_dist='sparse'``)
        (the report's N(0, 1.9^2) by default); the transform also applies to ``feedback``.
      projection: hardware effects on DFA's projections (dfa_core.hardware.Projection: a
        quantised error, projection noise, a plug-in device), method 'dfa' only; None: exact
        DFA. Noise is drawn from (seed, global step) inside the step, so a resumed run draws
        what the uninterrupted one would have. Recorded in History.config["projection"]
        (``projection_config``: the device by its name).
      tol: stop when the training error changes by at most ``tol`` between consecutive
        epochs, ``patience`` times in a row (compared from the second epoch on); None
        never stops early.
      patience: consecutive epochs within ``tol`` needed to stop, >= 1.
      align_every: every ``align_every`` steps (step 0 included), measure per block the angles
        to BP's gradient and teaching signal on the step's batch, before its update: of the
        exact DFA direction for 'dfa' and 'bp' (``<backend>.alignment.alignment_angles``), of the
        update the step applies for every other rule and for a projection
        (``<backend>.alignment.update_angles``); 0 never measures.
      eval_batch_size: rows per forward pass when measuring errors, >= 1.
      donate: let each step reuse the buffers of the previous parameters (see
        ``train_step``); the trainer owns its copies, so this is safe.
      resume: continue a run: skip ``resume.epoch`` epochs, restore the batch order's
        generator and the optimizer state; ``params`` must be the params at that point.
        ``epochs`` stays the total. Resuming after k epochs ends with the same params as
        an uninterrupted run.
      on_epoch: called after each epoch with an ``EpochEnd`` (NumPy copies of params and
        optimizer state: a host transfer per epoch).
      on_batch: called as ``on_batch(epoch, batch_index, num_batches)`` (0-based) once
        per batch; it gets no arrays, so it forces no synchronisation. With
        ``engine='epoch'`` the calls for all of an epoch's batches come together after
        the epoch has run (a progress bar advances by steps, but once per epoch); with
        ``engine='step'`` each call follows its step.
      stop_on_nonfinite: raise ``NonFiniteLossError`` (before ``on_epoch``) when an
        epoch's loss, or the params after it, are NaN or infinite.
      diverge_factor: raise ``LossExplodedError`` (before ``on_epoch``) when an epoch's
        loss exceeds this multiple (> 1) of the initial per-sample loss, the loss of the
        run's first batch before any update (kept in ``ResumeState``); None never does.
        A finite loss far above where training started means the run has diverged even
        though nothing is NaN yet (the ``dfa`` command uses 1000).
      engine: 'epoch' (one compiled call per epoch) or 'step' (one call per step).
      devices: data-parallel training (engine 'epoch'): every global batch of ``batch_size`` rows
        (a multiple of ``devices``) is split over the devices and the update is the one-device
        update of the global batch (averaged modes and 'mean' stay global), so the History equals
        the one-device run's up to rounding. JAX: a mesh of the first ``devices`` of
        ``jax.devices()`` in this one process. torch: one process per device, launched by
        ``torchrun``; None takes the launch's world size (a given value must equal it). None
        outside a launch: one device.
      stages: layer-parallel DFA (``<backend>.layer_parallel``) over this many stages, >= 2: the
        blocks are cut into contiguous stages, stage s on device s; every batch (the same batches
        in the same order) takes one step whose update is the one-device update, so the History
        equals the one-device run's up to rounding. JAX: the first ``stages`` devices of
        ``jax.devices()`` in this one process. torch: one process per stage, launched by
        ``torchrun`` with ``stages`` processes. Method 'dfa' only (any mode), without
        ``devices``, ``projection`` or ``align_every``, engine 'epoch'. None or 1: not layer parallel.
      microbatches: micro-batches per batch in a layer-parallel run (they flow through the stages
        as a pipeline), >= 1; a ragged last batch they do not divide runs with the most
        micro-batches that divide it. Results do not depend on it (up to rounding).
      lr_milestones: epochs (>= 1, increasing) at which the learning rate is multiplied by
        ``lr_gamma``, as torch's MultiStepLR: milestone m changes it from epoch m on (0-based);
        () keeps it fixed. Resumed runs pick the rate of their epoch (``dfa_train.schedule``).
      lr_gamma: the factor at each milestone, > 0.
      kp_decay: Kolen-Pollack's weight decay lambda in [0, 1) per step on W_{l+1} and B_l of every
        'kp' block (``train_step``'s); recorded in History.config when a block is 'kp'.

    Returns:
      History: per epoch loss (mean per-sample loss over the epoch, each batch's loss
      taken before its update), train_error (fraction of the training set misclassified
      after the epoch's updates: argmax, or y > 0.5 with one output unit), test_accuracy,
      time_s; the final confusion matrix; alignment records; the final params and the
      feedback used, as NumPy arrays.

    Raises:
      ValueError, TypeError: a bad backend, spec, option or dataset, before training.
      MemoryError: the run would not fit in the device's free memory (estimated first).
      ImportError: the backend's framework is not installed.
      NonFiniteLossError, LossExplodedError: see ``stop_on_nonfinite`` and ``diverge_factor``.
    """
    run = _settings(
        backend,
        spec,
        method,
        mode,
        optimizer,
        epochs,
        batch_size,
        seed,
        tol,
        patience,
        align_every,
        eval_batch_size,
        donate,
        engine,
        stop_on_nonfinite,
        diverge_factor,
        on_epoch,
        on_batch,
        projection,
        devices,
        stages,
        microbatches,
        lr_milestones,
        lr_gamma,
        kp_decay,
    )
    if (x_test is None) != (y_test is None):
        raise ValueError("x_test and y_test must be given together (or neither)")
    if resume is not None and not isinstance(resume, ResumeState):
        raise TypeError(f"resume must be a dfa_train.trainer.ResumeState, got {type(resume).__name__}")
    x_np, y_np = _check_data(spec, x_train, y_train, mode, "training")
    test = _check_data(spec, x_test, y_test, "sample", "test") if x_test is not None else None
    memory.check_run_memory(
        run.be,
        spec,
        x_np.shape[0],
        0 if test is None else test[0].shape[0],
        run.batch_size,
        run.eval_batch_size,
        run.optimizer.name,
        method,
        bool(run.align_every),
        projection=run.projection,
    )
    params_np = init_params(spec, param_seed) if params is None else params
    validation.check_params(spec, params_np)
    for name, leaf in validation.named_leaves(params_np):
        host = leaf.detach().cpu() if hasattr(leaf, "detach") else leaf  # NumPy, torch or JAX
        validation.raise_for_nonfinite(name, bool(np.all(np.isfinite(np.asarray(host)))))
    feedback_np = init_feedback(
        spec,
        feedback_seed,
        feedback_dist,
        feedback_scale,
        feedback_transform,
        matrices=feedback,
        method=feedback_rule(method),
        **_feedback_options(feedback_options),
    )
    drawn = {
        "param_seed": param_seed if params is None else None,
        "feedback_seed": feedback_seed if feedback is None else None,
        "feedback_dist": feedback_dist if feedback is None else "given",
        "feedback_scale": feedback_scale if feedback is None else None,
        "feedback_options": _feedback_options(feedback_options) if feedback is None else None,
    }
    be = run.be
    with be.precision_scope(spec.dtype):
        x_nat, y_nat = run.place(be.asarray((x_np, y_np)))
        data = _Data(
            x_nat,
            y_nat,
            labels_of(y_np),
            run.place(be.asarray(test[0])) if test is not None else None,
            labels_of(test[1]) if test is not None else None,
            run.place(be.asarray(feedback_np)),
        )
        loop = _start(run, params_np, data.feedback, resume)
        params_out = _train(run, data, loop, feedback_np)
    return _history(run, data, loop, params_out, feedback_np, drawn)


def _feedback_options(options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """fit's ``feedback_options`` as a plain dict (None: no options)."""
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"feedback_options must be a dict of init_feedback's options or None, got {options!r}")
    return dict(options or {})


__all__ = [
    "AlignmentRecord",
    "ENGINES",
    "EpochEnd",
    "History",
    "METHODS",
    "NonFiniteLossError",
    "ResumeState",
    "confusion_matrix",
    "fit",
    "labels_of",
    "projection_config",
]
