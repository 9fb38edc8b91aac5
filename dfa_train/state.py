"""The records a training run produces and resumes from, and optimizer states as NumPy.

``History`` is what ``fit`` returns; ``ResumeState`` is where a run left off (what a
checkpoint stores); ``EpochEnd`` is what ``fit`` hands its ``on_epoch`` callback. The
optimizer state is stored backend-neutrally (``opt_state_to_numpy``): the torch states
(``dfa_torch.optim``: EmptyState / TraceState(trace) / AdamState(count, mu, nu)) and the
optax ones ((EmptyState, EmptyState), (TraceState(trace), EmptyState),
(ScaleByAdamState(count, mu, nu), EmptyState)) both flatten to the keys ``count``,
``trace/i``, ``mu/i``, ``nu/i`` (i indexes the leaves W_1, b_1, W_2, ...), so a state
saved from torch resumes on JAX and back. Imports neither torch nor JAX.
"""

from __future__ import annotations

import json
import math
from types import ModuleType
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from dfa_core.tree import flatten_pairs, unflatten_pairs

_TREE_FIELDS = ("trace", "mu", "nu")  # optimizer-state fields shaped like params
_SCALAR_FIELDS = ("count",)
# dfa_core.backend.RuleState ('kp', 'brsf'): its inner optimizer state is walked as any other;
# KP's B (a flat tuple, zero-size where a block is not kp) and brsf's seed and step are stored as
# 'kp_feedback/i', 'rule_seed' and 'rule_step'.
_RULE_TREE_FIELDS = ("kp_feedback",)
_RULE_SCALAR_FIELDS = ("rule_seed", "rule_step")
_KNOWN_FIELDS = _TREE_FIELDS + _SCALAR_FIELDS + _RULE_TREE_FIELDS + _RULE_SCALAR_FIELDS


class AlignmentRecord(NamedTuple):
    """Angles to BP of a rule's update and teaching signal per block, measured on one batch before its update."""

    step: int  # global step (0-based) whose batch was measured
    epoch: int  # 0-based epoch of that step
    weights: Tuple[float, ...]  # (L,): degrees per layer, the last is the output layer; NaN if undefined
    deltas: Tuple[float, ...]  # (L,): degrees per layer for the teaching signal delta_l


class History(NamedTuple):
    """What ``fit`` records. Per-epoch tuples have one entry per epoch run."""

    loss: Tuple[float, ...]  # per epoch: mean per-sample training loss, from each batch's loss before its update
    train_error: Tuple[float, ...]  # per epoch: fraction of training samples misclassified at the epoch's end
    test_accuracy: Tuple[float, ...]  # per epoch: fraction of test samples classified right; () without a test set
    time_s: Tuple[float, ...]  # per epoch: wall seconds of steps and alignment, synchronised; no evaluation
    confusion: np.ndarray  # (C, C) int64 counts at the end, rows true class, columns predicted class
    confusion_split: str  # 'test' if a test set was given, else 'train'
    alignment: Tuple[AlignmentRecord, ...]  # every ``align_every`` steps; () when align_every = 0
    stopped_early: bool  # True when ``tol`` ended training before ``epochs``
    config: Dict[str, Any]  # the run's settings (backend, spec, method, mode, optimizer, seeds, ...)
    params: Tuple[Tuple[np.ndarray, ...], ...]  # final params per block ((W_l, b_l) or a composite's leaves), NumPy
    feedback: Tuple[np.ndarray, ...]  # the feedback matrices (B_1, ..., B_{L-1}) used, NumPy

    @property
    def epochs_run(self) -> int:
        return len(self.loss)

    def to_dict(self) -> Dict[str, Any]:
        """Everything but ``params`` and ``feedback`` as JSON-ready Python values (NaN -> None)."""
        return {
            "loss": [_finite_or_none(v) for v in self.loss],
            "train_error": [_finite_or_none(v) for v in self.train_error],
            "test_accuracy": [_finite_or_none(v) for v in self.test_accuracy],
            "time_s": list(self.time_s),
            "confusion": np.asarray(self.confusion).tolist(),
            "confusion_split": self.confusion_split,
            "alignment": [
                {
                    "step": r.step,
                    "epoch": r.epoch,
                    "weights": [_finite_or_none(v) for v in r.weights],
                    "deltas": [_finite_or_none(v) for v in r.deltas],
                }
                for r in self.alignment
            ],
            "stopped_early": self.stopped_early,
            "epochs_run": self.epochs_run,
            "config": self.config,
        }

    def to_json(self, indent: Optional[int] = None) -> str:
        """``to_dict`` as strict JSON (no NaN)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


class ResumeState(NamedTuple):
    """Where an interrupted ``fit`` left off; with the params it had, ``fit`` continues exactly.

    ``dfa_train.checkpoint`` saves and loads it; ``params`` and ``feedback`` travel as
    ``fit``'s own arguments.
    """

    epoch: int  # epochs already run (the next epoch is this 0-based index)
    global_step: int  # steps already taken
    rng_state: Mapping[str, Any]  # np.random.default_rng(seed).bit_generator.state after those epochs
    opt_state: Optional[Dict[str, np.ndarray]]  # checkpoint.opt_state_to_numpy(...); None: a fresh init
    loss: Tuple[float, ...] = ()  # the per-epoch records so far, prepended to the returned History
    train_error: Tuple[float, ...] = ()
    test_accuracy: Tuple[float, ...] = ()
    time_s: Tuple[float, ...] = ()
    within_tol: int = 0  # consecutive epochs within ``tol`` so far
    reference_loss: Optional[float] = None  # per-sample loss of the run's first batch before any update


class EpochEnd(NamedTuple):
    """What ``fit`` hands ``on_epoch`` after each epoch: enough to checkpoint and log it."""

    epoch: int  # epochs run so far, 1-based
    epochs: int  # the run's maximum number of epochs
    global_step: int  # steps taken so far
    loss: float  # this epoch's mean per-sample training loss
    train_error: float  # this epoch's training error
    test_accuracy: Optional[float]  # None without a test set
    time_s: float  # this epoch's wall seconds (steps and alignment)
    samples_per_s: float  # training samples per second of ``time_s``
    alignment: Tuple[AlignmentRecord, ...]  # the records measured during this epoch
    params: Tuple[Tuple[np.ndarray, ...], ...]  # params per block after the epoch, NumPy
    feedback: Tuple[np.ndarray, ...]  # (B_1, ..., B_{L-1}), NumPy
    opt_state: Dict[str, np.ndarray]  # the optimizer state as ``checkpoint.opt_state_to_numpy`` gives it
    resume: ResumeState  # pass to ``fit(resume=...)`` with ``params`` to continue from here


class DivergenceError(FloatingPointError):
    """Training diverged and was stopped (``fit(stop_on_nonfinite=True)`` or ``diverge_factor``)."""

    def __init__(self, epoch: int, loss: float, what: str):
        super().__init__(
            f"epoch {epoch}: {what}; training stopped. Lower the learning rate (--lr), use reduction "
            "'mean' or check the inputs; the last checkpoint holds the last finite state"
        )
        self.epoch = epoch
        self.loss = loss


class NonFiniteLossError(DivergenceError):
    """An epoch's loss, or the params after it, were NaN or infinite (``fit(stop_on_nonfinite=True)``)."""

    def __init__(self, epoch: int, loss: float, what: str = ""):
        super().__init__(epoch, loss, what or f"the training loss is {loss}")


class LossExplodedError(DivergenceError):
    """An epoch's loss rose above ``diverge_factor`` times the run's initial loss."""

    def __init__(self, epoch: int, loss: float, reference: float, factor: float):
        super().__init__(
            epoch,
            loss,
            f"the training loss {loss:.4g} is over {factor:g} times the initial "
            f"per-sample loss {reference:.4g} (the divergence guard; switch it off with "
            "--diverge-factor 0)",
        )
        self.reference = reference


def _finite_or_none(value) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def _walk_states(state):
    """Yields every NamedTuple in a (possibly nested) optimizer state; a RuleState's inner state too."""
    if hasattr(state, "_fields"):
        yield state
        if "inner" in state._fields:
            yield from _walk_states(state.inner)
    elif isinstance(state, (tuple, list)):
        for s in state:
            yield from _walk_states(s)


def opt_state_to_numpy(backend: ModuleType, state: Any) -> Dict[str, np.ndarray]:
    """A torch or optax optimizer state as a flat dict of NumPy arrays.

    Args:
      backend: the backend module whose ``to_numpy`` reads the state's arrays.
      state: ``make_optimizer(...).init(params)`` or a later state.

    Returns:
      {} for SGD; {'trace/i': ...} for momentum; {'count': () int32, 'mu/i': ...,
      'nu/i': ...} for Adam, i over the flattened params W_1, b_1, W_2, ...

    Raises:
      ValueError: a state field this module does not know (a new optimizer).
    """
    out: Dict[str, np.ndarray] = {}
    for s in _walk_states(state):
        for field in s._fields:
            value = getattr(s, field)
            if field == "inner":
                continue  # walked by _walk_states
            if field in _TREE_FIELDS:
                for i, leaf in enumerate(flatten_pairs(value)):
                    out[f"{field}/{i}"] = np.asarray(backend.to_numpy(leaf))
            elif field in _RULE_TREE_FIELDS:
                for i, leaf in enumerate(value):
                    out[f"{field}/{i}"] = np.asarray(backend.to_numpy(leaf))
            elif field in _SCALAR_FIELDS or field in _RULE_SCALAR_FIELDS:
                out[field] = np.asarray(backend.to_numpy(value))
            else:
                raise ValueError(
                    f"optimizer state {type(s).__name__} has a field {field!r} that checkpoints cannot "
                    f"store; known fields: {list(_KNOWN_FIELDS)}"
                )
    return out


def opt_state_from_numpy(backend: ModuleType, template: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """Fills a fresh optimizer state of ``backend`` with arrays from ``opt_state_to_numpy``.

    Args:
      backend: the backend module (its ``asarray`` makes the native arrays).
      template: ``make_optimizer(...).init(params)`` on that backend: gives the structure.
      arrays: the flat dict, possibly written by the other backend.

    Returns:
      A state of the template's structure holding ``arrays``.

    Raises:
      ValueError: keys or shapes that do not match the template (another optimizer or network).
    """
    expected = opt_state_to_numpy(backend, template)
    if set(expected) != set(arrays):
        raise ValueError(
            f"optimizer state mismatch: the checkpoint has keys {sorted(arrays)}, this optimizer "
            f"needs {sorted(expected)}; resume with the optimizer the run was started with"
        )
    for key, ref in expected.items():
        if np.shape(arrays[key]) != ref.shape:
            raise ValueError(f"optimizer state {key!r}: checkpoint shape {np.shape(arrays[key])}, expected {ref.shape}")

    def fill(state):
        if hasattr(state, "_fields"):
            updates = {}
            for field in state._fields:
                value = getattr(state, field)
                if field == "inner":
                    updates[field] = fill(value)
                elif field in _RULE_TREE_FIELDS:
                    refs = backend.to_numpy(tuple(value))
                    updates[field] = tuple(
                        _like(backend, np.asarray(arrays[f"{field}/{i}"], dtype=ref.dtype), leaf)
                        for i, (ref, leaf) in enumerate(zip(refs, value))
                    )
                elif field in _RULE_SCALAR_FIELDS:
                    ref = np.asarray(backend.to_numpy(value))
                    updates[field] = _like(backend, np.asarray(arrays[field], dtype=ref.dtype), value)
                elif field in _TREE_FIELDS:
                    leaves = [
                        np.asarray(arrays[f"{field}/{i}"], dtype=ref.dtype)
                        for i, ref in enumerate(backend.to_numpy(tuple(flatten_pairs(value))))
                    ]
                    updates[field] = backend.asarray(unflatten_pairs(leaves, value))
                elif field in _SCALAR_FIELDS:
                    ref = np.asarray(backend.to_numpy(value))
                    updates[field] = backend.asarray(np.asarray(arrays[field], dtype=ref.dtype))
            return state._replace(**updates) if updates else state
        if isinstance(state, (tuple, list)):
            return type(state)(fill(s) for s in state)
        return state

    return fill(template)


def _like(backend: ModuleType, array: np.ndarray, template: Any) -> Any:
    """``array`` as a native array on the template's device (a torch tensor's device; JAX's default)."""
    device = getattr(template, "device", None)
    if backend.NAME == "torch" and device is not None:
        return backend.asarray(array, device=str(device))
    return backend.asarray(array)


__all__ = [
    "AlignmentRecord",
    "DivergenceError",
    "LossExplodedError",
    "EpochEnd",
    "History",
    "NonFiniteLossError",
    "ResumeState",
    "opt_state_from_numpy",
    "opt_state_to_numpy",
]
