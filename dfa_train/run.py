"""``run(config, out_dir)``: one training run into a folder, checkpointed, resumable, interruptible.

    from dfa_train.config import RunConfig
    from dfa_train.run import run
    result = run(RunConfig(backend="jax", epochs=10), "runs/dfa")
    print(result.metrics["test_accuracy"])
    run(RunConfig(backend="jax", epochs=20), "runs/dfa", resume=True)   # 10 more, exactly

The folder's files are described in ``dfa_train.run_files``. The checkpoint is written at
the config's cadence (``checkpoint_every``, see ``dfa_train.cadence``), and always at the
end, before a divergence stop (the last finite state) and on Ctrl-C or SIGTERM, so
``resume=True`` continues from the last finished epoch and ends with the params of an
uninterrupted run. Imports neither torch nor JAX until a run starts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple, cast

import numpy as np

from dfa_core import init as dfa_init
from dfa_core.backend import ParamsLike
from dfa_core.model import ModelSpec
from dfa_core.parallel import launched_rank, launched_world_size
from dfa_train import memory, run_files
from dfa_train.cadence import CheckpointEvery, checkpoint_due
from dfa_train.checkpoint import CHECKPOINT_NAME, Checkpoint, atomic_write_text, load_checkpoint, save_checkpoint
from dfa_train.config import ConfigError, RunConfig
from dfa_train.run_dir import check_new_folder, claim
from dfa_train.state import DivergenceError, EpochEnd, History, ResumeState
from dfa_train.tables import comparison_table

Data = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train (N, n_0), y_train (N, n_L), x_test, y_test

RESUME_MAY_CHANGE = (
    "epochs",
    "backend",
    "device",
    "devices",
    "stages",
    "microbatches",
    "checkpoint_every",
    "data_dir",
    "no_download",
    "no_plots",
    "download_timeout",
    "diverge_factor",
)
"""Fields a resumed run may set differently from its config.json; any other change is refused."""


class RunResult(NamedTuple):
    """What ``run`` returns."""

    run_dir: str  # the folder written
    metrics: Dict[str, Any]  # what metrics.json holds (run_files.metrics_of)
    history: Optional[History]  # fit's record of the whole run, resumed epochs included; None for a
    # compare member that had finished before ``--resume`` (only its metrics are read back)


# ---------------------------------------------------------------------------------------------
# Data and devices


def load_data(config: RunConfig) -> Data:
    """(x_train, y_train, x_test, y_test) for a config, limited and scaled as it asks (XOR tests on itself)."""
    from dfa_train import data

    if config.dataset == "xor":
        x, y = data.xor_dataset(config.dtype)
        return x, y, x, y
    if config.dataset == "idx":
        if config.data_dir is None:
            raise data.DatasetNotFoundError("--dataset idx needs --data-dir, the folder of the four IDX files")
        d = data.load_idx_dataset(config.data_dir, config.dtype)
    elif config.dataset == "mnist-slice":
        d = data.load_mnist_slice(config.dtype)
    elif config.dataset != "mnist":
        d = data.load_dataset(
            config.dataset,
            config.data_dir,
            dtype=config.dtype,
            download=not config.no_download,
            timeout=config.download_timeout,
        )
    else:
        folder = data.find_mnist(config.data_dir, download=not config.no_download, timeout=config.download_timeout)
        d = data.load_mnist(folder, config.dtype)
    x_train, y_train, x_test, y_test = d
    if config.limit_train:
        x_train, y_train = x_train[: config.limit_train], y_train[: config.limit_train]
    if config.limit_test:
        x_test, y_test = x_test[: config.limit_test], y_test[: config.limit_test]
    if config.standardize:
        x_train, x_test = data.standardize(x_train, x_test)
    return x_train, y_train, x_test, y_test


def resolve_dataset(config: RunConfig) -> RunConfig:
    """``config``, or with dataset 'mnist-slice' when full MNIST is nowhere to be had (offline, no copy).

    The fallback is said on stderr ("dfa: warning: ...", the ``MnistSliceWarning``'s text) and
    recorded in the config, so the run folder says what it trained on and a resume reads the
    same data. An explicit ``data_dir`` is never replaced.
    """
    import warnings

    from dfa_train import data

    if config.dataset != "mnist" or config.data_dir is not None:
        return config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", data.MnistSliceWarning)
        _, is_slice = data.find_mnist_or_slice(None, download=not config.no_download, timeout=config.download_timeout)
    for w in caught:
        print(f"dfa: warning: {w.message}", file=sys.stderr)
    return config.replace(dataset=data.MNIST_SLICE_NAME) if is_slice else config


def check_widths(config: RunConfig, data: Data) -> None:
    """Raises ConfigError when the first/last widths do not fit the data's columns ('layers') or the
    targets cannot be grouped by class ('mode'): bad inputs, found before any folder is made."""
    x_train, y_train = data[0], data[1]
    if config.arch is not None:
        spec = cast(ModelSpec, config.spec())
        if spec.n_in != x_train.shape[1] or spec.n_out != y_train.shape[1]:
            raise ConfigError(
                "arch",
                f"{config.arch!r} on {spec.input_shape} inputs ({spec.n_in} numbers per sample) with {spec.n_out} "
                f"outputs does not fit dataset {config.dataset!r}: its inputs have {x_train.shape[1]} numbers "
                f"and its targets {y_train.shape[1]} columns",
            )
    layers = (x_train.shape[1], y_train.shape[1]) if config.arch is not None else cast(Tuple[int, ...], config.layers)
    if layers[0] != x_train.shape[1] or layers[-1] != y_train.shape[1]:
        raise ConfigError(
            "layers",
            (
                f"{','.join(map(str, layers))} does not fit dataset {config.dataset!r}: inputs have "
                f"{x_train.shape[1]} features and targets {y_train.shape[1]} columns, so the first width must be "
                f"{x_train.shape[1]} and the last {y_train.shape[1]}"
            ),
        )
    one_hot = y_train.shape[1] > 1 and np.all((y_train == 0) | (y_train == 1)) and np.all(y_train.sum(axis=1) == 1)
    if config.method == "dfa" and config.mode == "class_mean" and not one_hot:
        raise ConfigError(
            "mode",
            f"'class_mean' groups samples by class and needs one-hot targets; dataset "
            f"{config.dataset!r} has {y_train.shape[1]} target column(s) that are not one-hot",
        )


def _available_devices(backend: str) -> Tuple[str, ...]:
    if backend == "torch":
        import torch

        found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            found.append("mps")
        return tuple(found)
    import jax

    platforms = []
    for name in ("cpu", "gpu", "tpu"):
        try:
            if jax.devices(name):
                platforms.append(name)
        except RuntimeError:  # that platform is not in this JAX install
            pass
    return tuple(platforms)


def check_device(backend: str, device: Optional[str]) -> None:
    """Raises ConfigError('device') naming what exists when ``device`` is not on this machine."""
    if device is None:
        return
    found = _available_devices(backend)
    base = device.split(":")[0]
    wanted_index = int(device.split(":")[1]) if ":" in device and device.split(":")[1].isdigit() else 0
    ok = (
        (base == "cpu" and "cpu" in found)
        or (backend == "torch" and base == "cuda" and f"cuda:{wanted_index}" in found)
        or (base in found and base != "cuda")
    )
    if not ok:
        kind = "torch device" if backend == "torch" else "JAX platform"
        raise ConfigError(
            "device",
            f"{kind} {device!r} is not available here; this machine has {list(found)}"
            + (" (a CPU build of torch has no cuda)" if base == "cuda" else ""),
        )


@contextlib.contextmanager
def device_scope(backend: str, device: Optional[str]) -> Iterator[None]:
    """Makes ``device`` the default device of the backend while training (None: leave it)."""
    if device is None:
        yield
        return
    if backend == "torch":
        import torch

        previous = torch.get_default_device()
        torch.set_default_device(device)
        try:
            yield
        finally:
            torch.set_default_device(previous)
    else:
        import jax

        with jax.default_device(jax.devices(device)[0]):
            yield


class Progress:
    """A tqdm bar over the run's steps, updated per batch, with loss, error and speed per epoch."""

    def __init__(self, enabled: bool, label: str, total_steps: int, done_steps: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=done_steps, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True
            )

    def batch(self, epoch: int, index: int, num_batches: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def epoch(self, e: EpochEnd) -> None:
        if self.bar is not None:
            post = dict(
                epoch=f"{e.epoch}/{e.epochs}",
                loss=f"{e.loss:.4f}",
                err=f"{100 * e.train_error:.2f}%",
                samples_s=f"{e.samples_per_s:.0f}",
            )
            if e.test_accuracy is not None:
                post["test_acc"] = f"{100 * e.test_accuracy:.2f}%"
            self.bar.set_postfix(post)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# Signals and checkpoints


class Interrupts:
    """While active, SIGTERM (and Ctrl-C) raise KeyboardInterrupt, but never in the middle of a write.

    A signal that arrives inside ``deferred()`` is raised when the block ends, so history.jsonl
    and the checkpoint are never left half-written by a signal. Handlers are installed only
    on the main thread (Python allows no other) and only over the default ones (a handler
    someone else installed is left alone); the previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._pending = False
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        del frame
        if self._depth:
            self._pending = True
            return
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
                if signal.getsignal(sig) is default:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Holds signals back while the block runs; one that arrived is raised at its end."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self._pending:
            self._pending = False
            raise KeyboardInterrupt("signal received while writing")


def _is_finite_state(e: EpochEnd) -> bool:
    return math.isfinite(e.loss) and all(np.all(np.isfinite(a)) for pair in e.params for a in pair)


class Checkpointer:
    """Writes a run's checkpoint at its cadence; keeps the last finite unsaved epoch for ``flush``.

    Non-finite states (a NaN loss, or params that overflowed) are never offered to disk:
    after a divergence the checkpoint holds the last epoch whose loss and params were finite.
    """

    def __init__(
        self,
        path: str,
        every: CheckpointEvery,
        meta: Dict[str, Any],
        *,
        clock: Callable[[], float] = time.monotonic,
        save: Optional[Callable[[str, Checkpoint], None]] = None,
    ):
        self.path, self.every, self.meta, self.clock = path, every, meta, clock
        self._save = save_checkpoint if save is None else save  # looked up now: tests may replace it
        self.saved_epoch = -1  # the epoch of the checkpoint on disk; -1 before the first write
        self.pending: Optional[EpochEnd] = None  # the newest finite epoch not yet written
        self.last_write_end = clock()
        self.last_write_s = 0.0

    def write(self, params: dfa_init.Params, feedback: dfa_init.Feedback, resume: ResumeState) -> None:
        """Writes one state now (atomically, through ``save_checkpoint``) and times the write."""
        start = self.clock()
        self._save(self.path, Checkpoint(params, feedback, resume, self.meta))
        self.last_write_end = self.clock()
        self.last_write_s = self.last_write_end - start
        self.saved_epoch = resume.epoch

    def offer(self, e: EpochEnd) -> bool:
        """Called after each epoch; writes if the cadence says so. Returns whether it wrote."""
        if not _is_finite_state(e):
            return False
        self.pending = e
        if checkpoint_due(self.every, e.epoch, self.clock() - self.last_write_end, self.last_write_s):
            return self.flush()
        return False

    def flush(self) -> bool:
        """Writes the pending epoch if it is newer than the checkpoint on disk. Returns whether it wrote."""
        e, self.pending = self.pending, None
        if e is None or e.epoch <= self.saved_epoch:
            return False
        self.write(e.params, e.feedback, e.resume)
        return True


# ---------------------------------------------------------------------------------------------
# One run


def _check_resumable(stored: RunConfig, config: RunConfig) -> None:
    changed = [
        name
        for name in stored.to_dict()
        if name not in RESUME_MAY_CHANGE
        and getattr(stored, name, None) != getattr(config, name, None)
        and name != "version"
    ]
    if changed:
        raise ValueError(
            f"cannot resume with a different {', '.join(changed)} (config.json has "
            f"{', '.join(f'{n}={getattr(stored, n)!r}' for n in changed)}); only "
            f"{list(RESUME_MAY_CHANGE)} may change"
        )


def _initial_state(config: RunConfig, params):
    """The params and feedback a new run starts from: ``params`` or its seeded draw, and the seeded feedback."""
    spec = config.spec()
    params = dfa_init.init_params(spec, config.param_seed) if params is None else params
    from dfa_train.trainer import feedback_rule

    feedback = dfa_init.init_feedback(
        spec,
        config.feedback_seed,
        config.feedback_dist,
        config.feedback_scale,
        method=feedback_rule(config.rule()),
        **config.feedback_options(),
    )
    return params, feedback


def _start(config: RunConfig, run_dir: str, params, checkpointer: Checkpointer):
    """A new run: config.json, an empty history and the epoch-0 checkpoint. Returns (params, feedback)."""
    ckpt_path = os.path.join(run_dir, CHECKPOINT_NAME)
    if os.path.exists(ckpt_path):
        raise ValueError(f"{run_dir!r} already holds a run (checkpoint.npz); resume it or choose another folder")
    params, feedback = _initial_state(config, params)
    os.makedirs(run_dir, exist_ok=True)
    run_files.write_config(run_dir, config)
    run_files.write_history(run_dir, [])
    # Epoch 0: a signal in the first epoch still leaves a checkpoint, and 'auto' gets its first timing.
    rng = np.random.default_rng(config.seed)
    checkpointer.write(params, feedback, ResumeState(0, 0, rng.bit_generator.state, None))
    return params, feedback


def _restart(config: RunConfig, run_dir: str, checkpointer: Checkpointer, n_train: int):
    """A resumed run: checks the config, makes the history match the checkpoint (truncated, or
    rebuilt where history.jsonl was cut or lost). Returns (params, feedback, ResumeState)."""
    _check_resumable(run_files.read_config(run_dir), config)
    ckpt = load_checkpoint(os.path.join(run_dir, CHECKPOINT_NAME))
    checkpointer.saved_epoch = ckpt.resume.epoch
    run_files.write_history(run_dir, run_files.history_for_resume(run_dir, ckpt.resume, n_train))
    run_files.write_config(run_dir, config)
    return ckpt.params, ckpt.feedback, ckpt.resume


def _train(config: RunConfig, data: Data, params, feedback, state, on_epoch, bar: Progress) -> History:
    from dfa_train.trainer import fit

    x_train, y_train, x_test, y_test = data
    with device_scope(config.backend, config.device):
        return fit(
            config.backend,
            config.spec(),
            x_train,
            y_train,
            x_test=x_test,
            y_test=y_test,
            method=config.rule(),
            mode=config.mode,
            optimizer=config.optimizer_spec(),
            devices=config.devices,
            stages=config.stages,
            microbatches=config.microbatches or 1,
            lr_milestones=config.lr_milestones or (),
            lr_gamma=config.lr_gamma,
            kp_decay=config.kp_decay,
            epochs=config.epochs,
            batch_size=config.batch_size,
            seed=config.seed,
            params=params,
            feedback=feedback,
            projection=config.projection(),
            tol=config.tol,
            patience=config.patience,
            align_every=config.align_every,
            resume=state,
            on_epoch=on_epoch,
            on_batch=bar.batch,
            stop_on_nonfinite=True,
            diverge_factor=config.diverge_factor or None,
        )


def _finish(config: RunConfig, run_dir: str, history: History, data: Data) -> Dict[str, Any]:
    """metrics.json, params.npz and the figures of a finished run."""
    n_train, n_test = data[0].shape[0], data[2].shape[0]
    metrics = run_files.metrics_of(config, history, n_train, n_test)
    run_files.write_metrics(run_dir, metrics)
    run_files.save_params(run_dir, history.params)
    if not config.no_plots:
        steps_per_epoch = -(-n_train // config.batch_size)
        run_files.write_plots(
            run_dir, {config.method.upper(): metrics}, run_files.read_history(run_dir), steps_per_epoch
        )
    return metrics


def run(
    config: RunConfig,
    out_dir: str,
    *,
    resume: bool = False,
    progress: bool = False,
    params: Optional[ParamsLike] = None,
    data: Optional[Data] = None,
) -> RunResult:
    """Trains one run into ``out_dir``: config, history, checkpoints, metrics, params and plots.

    Args:
      config: the run's settings.
      out_dir: the run folder (created; must not hold a run unless ``resume``).
      resume: continue the run in ``out_dir`` from its checkpoint; ``config`` must equal its
        config.json but for RESUME_MAY_CHANGE (``epochs`` is the new total).
      progress: show a tqdm bar on stderr.
      params: initial ((W_l (n_l, n_{l-1}), b_l (n_l,)), ...) instead of ``init_params(spec, param_seed)``.
      data: (x_train (N, n_0), y_train (N, n_L), x_test (M, n_0), y_test (M, n_L)) instead of ``load_data(config)``.

    Returns:
      RunResult(run_dir, metrics, history).

    Raises:
      ConfigError: the layer widths do not fit the data (nothing is written).
      ValueError: a new run into a folder that holds one, or a resume with changed settings.
      DivergenceError: the loss or params became NaN/inf, or the loss exploded past
        ``config.diverge_factor`` (the checkpoint holds the last finite epoch).
      MemoryError: the run would not fit in memory (estimated before anything is allocated).
      KeyboardInterrupt: Ctrl-C or SIGTERM (the checkpoint holds the last finished epoch).
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a dfa_train.config.RunConfig, got {type(config).__name__}")
    check_device(config.backend, config.device)
    data = load_data(config) if data is None else data
    check_widths(config, data)
    memory.check_run_memory(
        config.backend,
        config.spec(),
        data[0].shape[0],
        data[2].shape[0],
        config.batch_size,
        10000,
        config.optimizer,
        config.rule(),
        bool(config.align_every),
        projection=config.projection(),
    )
    if launched_rank() != 0:
        return _follow(config, out_dir, resume, params, data)
    checkpointer = Checkpointer(
        os.path.join(out_dir, CHECKPOINT_NAME),
        config.checkpoint_cadence(),
        {"config": config.to_dict(), "backend": config.backend},
    )
    with claim(out_dir, resume) as folder, Interrupts() as interrupts:
        if resume:
            params, feedback, state = _restart(config, out_dir, checkpointer, data[0].shape[0])
        else:
            with interrupts.deferred():
                params, feedback = _start(config, out_dir, params, checkpointer)
            state = None
        steps_per_epoch = -(-data[0].shape[0] // config.batch_size)
        done = state.epoch if state is not None else 0
        bar = Progress(
            progress, f"{config.method}/{config.backend}", config.epochs * steps_per_epoch, done * steps_per_epoch
        )

        def on_epoch(e: EpochEnd) -> None:
            with interrupts.deferred():
                run_files.append_history(out_dir, run_files.epoch_record(e))
                checkpointer.offer(e)
            folder.started()
            bar.epoch(e)

        try:
            history = _train(config, data, params, feedback, state, on_epoch, bar)
        except (KeyboardInterrupt, DivergenceError):
            with interrupts.deferred():
                checkpointer.flush()
            raise
        finally:
            bar.close()
        with interrupts.deferred():
            checkpointer.flush()
        metrics = _finish(config, out_dir, history, data)
    _wait_for_every_rank()
    return RunResult(out_dir, metrics, history)


def _follow(config: RunConfig, out_dir: str, resume: bool, params, data: Data) -> RunResult:
    """A torchrun rank other than 0: trains its shard of every batch in step with rank 0 and writes nothing.

    It starts where rank 0 does (the same seeded draws, or the run folder's checkpoint, read only: rank 0
    writes it only after an epoch, which needs every rank's part) and returns the same History.
    """
    if resume:
        ckpt = load_checkpoint(os.path.join(out_dir, CHECKPOINT_NAME))
        params, feedback, state = ckpt.params, ckpt.feedback, ckpt.resume
    else:
        (params, feedback), state = _initial_state(config, params), None
    history = _train(config, data, params, feedback, state, None, Progress(False, "", 0, 0))
    metrics = run_files.metrics_of(config, history, data[0].shape[0], data[2].shape[0])
    _wait_for_every_rank()
    return RunResult(out_dir, metrics, history)


def _wait_for_every_rank() -> None:
    """Under a torchrun launch, returns once every rank has finished its run (rank 0 has written the
    folder), so a next run in the same processes (a resume) starts from the same checkpoint on every rank."""
    if launched_world_size() == 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def compare(
    config: RunConfig, out_dir: str, *, progress: bool = False, data: Optional[Data] = None, resume: bool = False
) -> Dict[str, RunResult]:
    """DFA and BP from the same initial weights, in ``out_dir/dfa`` and ``out_dir/bp``.

    Writes the joint figures, summary.md (a Markdown table) and summary.json in ``out_dir``.
    With ``resume``, a method whose run finished is kept, an interrupted one resumes from its
    checkpoint and a missing one starts.

    Returns:
      {'DFA': RunResult, 'BP': RunResult} (a kept run's history is None).
    """
    if not resume:
        check_new_folder(out_dir)
    check_device(config.backend, config.device)
    data = load_data(config) if data is None else data
    check_widths(config, data)
    params = dfa_init.init_params(config.spec(), config.param_seed)  # the same initial weights for both
    results = {}
    for method in ("dfa", "bp"):
        member = config.with_method(method).replace(no_plots=True)
        results[method.upper()] = _compare_member(member, os.path.join(out_dir, method), resume, progress, params, data)
    metrics = {label: r.metrics for label, r in results.items()}
    if not config.no_plots:
        run_files.write_plots(
            out_dir,
            metrics,
            run_files.read_history(os.path.join(out_dir, "dfa")),
            -(-data[0].shape[0] // config.batch_size),
        )
    atomic_write_text(os.path.join(out_dir, "summary.md"), comparison_table(metrics))
    summary = {
        "config": config.to_dict(),
        "results": {k: {kk: v for kk, v in m.items() if kk != "confusion"} for k, m in metrics.items()},
    }
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1, allow_nan=False))
    return results


def _compare_member(member: RunConfig, member_dir: str, resume: bool, progress: bool, params, data: Data) -> RunResult:
    if resume and os.path.isfile(os.path.join(member_dir, CHECKPOINT_NAME)):
        metrics_path = os.path.join(member_dir, run_files.METRICS_NAME)
        if os.path.isfile(metrics_path):  # this method's run had finished
            with open(metrics_path) as f:
                return RunResult(member_dir, json.load(f), None)
        return run(member, member_dir, resume=True, progress=progress, data=data)
    return run(member, member_dir, progress=progress, params=params, data=data)


__all__ = [
    "Checkpointer",
    "Data",
    "Interrupts",
    "Progress",
    "RESUME_MAY_CHANGE",
    "RunResult",
    "check_widths",
    "compare",
    "device_scope",
    "check_device",
    "load_data",
    "resolve_dataset",
    "run",
]
