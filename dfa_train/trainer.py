"""One backend-neutral training loop (DFA or BP) that records a per-epoch ``History``.

Imports neither torch nor JAX: the backend module does the arithmetic. Batches are
drawn with NumPy (``np.random.default_rng(seed).permutation`` once per epoch), so the
torch and JAX backends see the same batches in the same order and, in float64, give
the same history.

    from dfa_core import MLPSpec, OptimizerSpec
    from dfa_train.trainer import fit
    spec = MLPSpec((784, 200, 10), activation="tanh", output="sigmoid")
    history = fit("jax", spec, x_train, y_train, x_test=x_test, y_test=y_test,
                  optimizer=OptimizerSpec("sgd", 1e-4), epochs=10, batch_size=200)
    print(history.to_json())
"""

from __future__ import annotations

import math
import numbers
import time
from types import ModuleType
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from dfa_core import validation
from dfa_core.init import DEFAULT_FEEDBACK_SCALE, init_feedback, init_params
from dfa_core.registry import get_backend
from dfa_core.spec import METHODS, MLPSpec, OptimizerSpec
from dfa_train.state import (
    AlignmentRecord,
    EpochEnd,
    History,
    NonFiniteLossError,
    ResumeState,
    opt_state_from_numpy,
    opt_state_to_numpy,
)

_BACKEND_FUNCTIONS = ("asarray", "to_numpy", "precision_scope", "forward", "make_optimizer", "train_step")


def _optimizer_config(opt: OptimizerSpec) -> Dict[str, Any]:
    config = {"name": opt.name, "learning_rate": opt.learning_rate}
    if opt.name == "momentum":
        config.update(momentum=opt.momentum, nesterov=opt.nesterov)
    elif opt.name == "adam":
        config.update(b1=opt.b1, b2=opt.b2, eps=opt.eps)
    return config


def _resolve_backend(backend) -> ModuleType:
    if isinstance(backend, str):
        return get_backend(backend)
    if isinstance(backend, ModuleType) and all(hasattr(backend, f) for f in _BACKEND_FUNCTIONS):
        return backend
    raise TypeError(
        f"backend must be a name ('torch' or 'jax') or a backend module such as dfa_torch, got {backend!r}"
    )


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_data(spec: MLPSpec, x, y, mode: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Checks a whole dataset once (shapes, finiteness, one-hot rows for class_mean); returns NumPy arrays."""
    x, y = np.asarray(x), np.asarray(y)
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
    return np.bincount(true * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def fit(
    backend: Union[str, ModuleType],
    spec: MLPSpec,
    x_train,
    y_train,
    *,
    x_test=None,
    y_test=None,
    method: str = "dfa",
    mode: str = "sample",
    optimizer: Optional[OptimizerSpec] = None,
    epochs: int = 10,
    batch_size: int = 200,
    seed: int = 0,
    params=None,
    param_seed: int = 0,
    feedback: Optional[Sequence[Any]] = None,
    feedback_seed: int = 1,
    feedback_dist: str = "normal",
    feedback_scale: float = DEFAULT_FEEDBACK_SCALE,
    feedback_transform: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    tol: Optional[float] = None,
    patience: int = 1,
    align_every: int = 0,
    eval_batch_size: int = 10000,
    donate: bool = False,
    resume: Optional[ResumeState] = None,
    on_epoch: Optional[Callable[[EpochEnd], None]] = None,
    on_batch: Optional[Callable[[int, int, int], None]] = None,
    stop_on_nonfinite: bool = False,
) -> History:
    """Trains ``spec`` by DFA or BP on one backend and records a ``History``.

    Every step is one call of ``backend.train_step(spec, optimizer, method, mode)`` on a
    batch gathered from arrays converted to the backend once; the data are validated
    once, up front, not per batch. Epoch e visits the samples in the order
    ``rng.permutation(N)`` of ``rng = np.random.default_rng(seed)`` (one draw per epoch),
    in batches of ``batch_size`` (the last one may be smaller).

    Args:
      backend: 'torch', 'jax' or a backend module (``dfa_torch``, ``dfa_jax``).
      spec: the network (its dtype is the dtype of the whole run).
      x_train: inputs, (N, n_0).
      y_train: targets, (N, n_L); one-hot for classification (``mode='class_mean'`` needs it).
      x_test: optional test inputs, (M, n_0); given with ``y_test``.
      y_test: optional test targets, (M, n_L).
      method: 'dfa' or 'bp'.
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
      feedback_seed, feedback_dist, feedback_scale, feedback_transform: the draw
        ``init_feedback(spec, feedback_seed, feedback_dist, feedback_scale, feedback_transform)``
        (the report's N(0, 1.9^2) by default); the transform also applies to ``feedback``.
      tol: stop when the training error changes by at most ``tol`` between consecutive
        epochs, ``patience`` times in a row (compared from the second epoch on); None
        never stops early.
      patience: consecutive epochs within ``tol`` needed to stop, >= 1.
      align_every: every ``align_every`` steps (step 0 included), measure the angles
        between the DFA update and the BP gradient on the step's batch, before its update
        (``<backend>.alignment.alignment_angles``); 0 never measures.
      eval_batch_size: rows per forward pass when measuring errors, >= 1.
      donate: let each step reuse the buffers of the previous parameters (see
        ``train_step``); the trainer owns its copies, so this is safe.
      resume: continue a run: skip ``resume.epoch`` epochs, restore the batch order's
        generator and the optimizer state; ``params`` must be the params at that point.
        ``epochs`` stays the total. Resuming after k epochs ends with the same params as
        an uninterrupted run.
      on_epoch: called after each epoch with an ``EpochEnd`` (NumPy copies of params and
        optimizer state: a host transfer per epoch).
      on_batch: called after each step as ``on_batch(epoch, batch_index, num_batches)``
        (0-based); it gets no arrays, so it forces no synchronisation.
      stop_on_nonfinite: raise ``NonFiniteLossError`` (before ``on_epoch``) when an
        epoch's loss is NaN or infinite.

    Returns:
      History: per epoch loss (mean per-sample loss over the epoch, each batch's loss
      taken before its update), train_error (fraction of the training set misclassified
      after the epoch's updates: argmax, or y > 0.5 with one output unit), test_accuracy,
      time_s; the final confusion matrix; alignment records; the final params and the
      feedback used, as NumPy arrays.

    Raises:
      ValueError, TypeError: a bad backend, spec, option or dataset, before training.
      ImportError: the backend's framework is not installed.
    """
    be = _resolve_backend(backend)
    validation.check_spec(spec)
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    validation.check_mode(mode)
    if method == "bp" and mode != "sample":
        raise ValueError(f"method 'bp' has no grouping mode; use mode='sample', got {mode!r}")
    optimizer = OptimizerSpec() if optimizer is None else optimizer
    if not isinstance(optimizer, OptimizerSpec):
        raise TypeError(f"optimizer must be a dfa_core.OptimizerSpec, got {type(optimizer).__name__}")
    epochs = _check_int("epochs", epochs, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    patience = _check_int("patience", patience, 1)
    align_every = _check_int("align_every", align_every, 0)
    eval_batch_size = _check_int("eval_batch_size", eval_batch_size, 1)
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0):
        raise ValueError(f"tol must be None or a number >= 0, got {tol!r}")
    if not isinstance(donate, bool):
        raise TypeError(f"donate must be a bool, got {donate!r}")
    if (x_test is None) != (y_test is None):
        raise ValueError("x_test and y_test must be given together (or neither)")
    if resume is not None and not isinstance(resume, ResumeState):
        raise TypeError(f"resume must be a dfa_train.trainer.ResumeState, got {type(resume).__name__}")
    for name, fn in (("on_epoch", on_epoch), ("on_batch", on_batch)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")

    x_np, y_np = _check_data(spec, x_train, y_train, mode, "training")
    test = _check_data(spec, x_test, y_test, "sample", "test") if x_test is not None else None
    params_np = init_params(spec, param_seed) if params is None else params
    validation.check_params(spec, params_np)
    feedback_np = init_feedback(
        spec, feedback_seed, feedback_dist, feedback_scale, feedback_transform, matrices=feedback
    )
    step = be.train_step(spec, optimizer, method, mode, donate)
    tx = be.make_optimizer(optimizer, spec.dtype)
    align_step = be.train_step(spec, optimizer, method, mode, donate, with_alignment=True) if align_every else None

    n = x_np.shape[0]
    num_classes = max(spec.n_out, 2)
    y_labels = labels_of(y_np)
    rng = np.random.default_rng(seed)
    losses, errors, accuracies, times, records = [], [], [], [], []
    stopped_early, within_tol, global_step, first_epoch = False, 0, 0, 0
    if resume is not None:
        rng.bit_generator.state = resume.rng_state
        losses, errors = list(resume.loss), list(resume.train_error)
        accuracies, times = list(resume.test_accuracy), list(resume.time_s)
        within_tol, global_step, first_epoch = resume.within_tol, resume.global_step, resume.epoch
    pred = test_pred = None
    num_batches = -(-n // batch_size)

    with be.precision_scope(spec.dtype):
        x_nat, y_nat = be.asarray(x_np), be.asarray(y_np)
        x_test_nat = be.asarray(test[0]) if test is not None else None
        params_nat = be.asarray(params_np)
        feedback_nat = be.asarray(feedback_np)
        opt_state = tx.init(params_nat)
        if resume is not None and resume.opt_state is not None:
            opt_state = opt_state_from_numpy(be, opt_state, resume.opt_state)
        for epoch in range(first_epoch, epochs):
            order = be.asarray(rng.permutation(n).astype(np.int32))
            batch_losses = []
            start_time = time.perf_counter()
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                xb, yb = x_nat[idx], y_nat[idx]
                if align_step is not None and global_step % align_every == 0:
                    # One compiled step that also measures DFA-vs-BP angles before updating.
                    params_nat, opt_state, batch_loss, angles = align_step(params_nat, feedback_nat, opt_state, xb, yb)
                    angles = be.to_numpy(tuple(angles))
                    records.append(
                        AlignmentRecord(global_step, epoch, tuple(map(float, angles[0])), tuple(map(float, angles[1])))
                    )
                else:
                    params_nat, opt_state, batch_loss = step(params_nat, feedback_nat, opt_state, xb, yb)
                batch_losses.append(batch_loss)
                global_step += 1
                if on_batch is not None:
                    on_batch(epoch, start // batch_size, num_batches)
            # One host transfer per epoch; it also waits for the epoch's work to finish.
            batch_losses = np.asarray(be.to_numpy(tuple(batch_losses)), dtype=np.float64)
            times.append(time.perf_counter() - start_time)
            if spec.reduction == "mean":
                sizes = np.diff(np.append(np.arange(0, n, batch_size), n))
                batch_losses = batch_losses * sizes
            losses.append(float(np.sum(batch_losses) / n))
            if stop_on_nonfinite and not math.isfinite(losses[-1]):
                raise NonFiniteLossError(epoch + 1, losses[-1])
            pred = _predict_labels(be, spec, params_nat, x_nat, n, eval_batch_size)
            errors.append(float(np.mean(pred != y_labels)))
            if test is not None:
                test_pred = _predict_labels(be, spec, params_nat, x_test_nat, test[0].shape[0], eval_batch_size)
                accuracies.append(float(np.mean(test_pred == labels_of(test[1]))))
            stop = False
            if tol is not None and epoch >= 1:
                within_tol = within_tol + 1 if abs(errors[-1] - errors[-2]) <= tol else 0
                if within_tol >= patience:
                    stopped_early = epoch + 1 < epochs
                    stop = True
            if on_epoch is not None:
                opt_np = opt_state_to_numpy(be, opt_state)
                resume_here = ResumeState(
                    epoch + 1, global_step, rng.bit_generator.state, opt_np, tuple(losses), tuple(errors),
                    tuple(accuracies), tuple(times), within_tol,
                )
                on_epoch(
                    EpochEnd(
                        epoch=epoch + 1,
                        epochs=epochs,
                        global_step=global_step,
                        loss=losses[-1],
                        train_error=errors[-1],
                        test_accuracy=accuracies[-1] if test is not None else None,
                        time_s=times[-1],
                        samples_per_s=n / times[-1] if times[-1] > 0 else float("inf"),
                        alignment=tuple(r for r in records if r.epoch == epoch),
                        params=tuple((np.asarray(w), np.asarray(b)) for w, b in be.to_numpy(params_nat)),
                        feedback=tuple(np.asarray(b) for b in feedback_np),
                        opt_state=opt_np,
                        resume=resume_here,
                    )
                )
            if stop:
                break
        params_out = be.to_numpy(params_nat)
        if pred is None:  # resumed after the last epoch: nothing ran, measure the given params
            pred = _predict_labels(be, spec, params_nat, x_nat, n, eval_batch_size)
            if test is not None:
                test_pred = _predict_labels(be, spec, params_nat, x_test_nat, test[0].shape[0], eval_batch_size)
    if test is not None:
        confusion = confusion_matrix(labels_of(test[1]), test_pred, num_classes)
    else:
        confusion = confusion_matrix(y_labels, pred, num_classes)
    config = {
        "backend": be.__name__,
        "layer_sizes": list(spec.layer_sizes),
        "activation": spec.activation,
        "output": spec.output,
        "reduction": spec.reduction,
        "dtype": spec.dtype,
        "method": method,
        "mode": mode,
        "optimizer": _optimizer_config(optimizer),
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "param_seed": param_seed if params is None else None,
        "feedback_seed": feedback_seed if feedback is None else None,
        "feedback_dist": feedback_dist if feedback is None else "given",
        "feedback_scale": feedback_scale if feedback is None else None,
        "tol": tol,
        "patience": patience,
        "align_every": align_every,
        "n_train": n,
        "n_test": int(test[0].shape[0]) if test is not None else 0,
    }
    return History(
        loss=tuple(losses),
        train_error=tuple(errors),
        test_accuracy=tuple(accuracies),
        time_s=tuple(times),
        confusion=confusion,
        confusion_split="test" if test is not None else "train",
        alignment=tuple(records),
        stopped_early=stopped_early,
        config=config,
        params=tuple((np.asarray(w), np.asarray(b)) for w, b in params_out),
        feedback=tuple(np.asarray(b) for b in feedback_np),
    )


__all__ = [
    "AlignmentRecord",
    "EpochEnd",
    "History",
    "METHODS",
    "NonFiniteLossError",
    "ResumeState",
    "confusion_matrix",
    "fit",
    "labels_of",
]
