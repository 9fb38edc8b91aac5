"""Checkpoints of a training run as one .npz (arrays + JSON metadata), loadable by either backend.

A checkpoint holds the params, the feedback matrices, the optimizer state, the number of
epochs run and the batch-order generator's state, enough for ``fit(resume=...)`` to end
with the same params as an uninterrupted run. Arrays are stored as NumPy; the optimizer
state is stored backend-neutrally (``opt_state_to_numpy``): the torch states
(``dfa_torch.optim``: EmptyState / TraceState(trace) / AdamState(count, mu, nu)) and the
optax ones ((EmptyState, EmptyState), (TraceState(trace), EmptyState),
(ScaleByAdamState(count, mu, nu), EmptyState)) both flatten to the keys ``count``,
``trace/i``, ``mu/i``, ``nu/i`` (i indexes the leaves W_1, b_1, W_2, ...), so a checkpoint
written on torch resumes on JAX and back.

Files are written to a temporary name in the same folder and moved in place with
``os.replace``, so a crash never leaves a half-written checkpoint under the real name.
Imports neither torch nor JAX.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from types import ModuleType
from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np

from dfa_core.trainer import ResumeState

FORMAT_VERSION = 1
"""Bumped whenever the layout of the .npz changes; ``load_checkpoint`` refuses other versions."""

CHECKPOINT_NAME = "checkpoint.npz"

_TREE_FIELDS = ("trace", "mu", "nu")  # optimizer-state fields shaped like params
_SCALAR_FIELDS = ("count",)


class Checkpoint(NamedTuple):
    """One saved training state, all NumPy."""

    params: Tuple[Tuple[np.ndarray, np.ndarray], ...]  # ((W_l (n_l, n_{l-1}), b_l (n_l,)), ...)
    feedback: Tuple[np.ndarray, ...]  # (B_1, ..., B_{L-1}), B_l (n_l, n_L)
    resume: ResumeState  # epoch, global_step, rng_state, opt_state (dict of arrays) and history so far
    meta: Dict[str, Any]  # free JSON: the run's config, backend that wrote it, ...


def _flatten(tree) -> list:
    return [leaf for pair in tree for leaf in pair]


def _unflatten(leaves, like) -> tuple:
    out, i = [], 0
    for pair in like:
        out.append(tuple(leaves[i : i + len(pair)]))
        i += len(pair)
    return tuple(out)


def _walk_states(state):
    """Yields every NamedTuple in a (possibly nested) optimizer state."""
    if hasattr(state, "_fields"):
        yield state
    elif isinstance(state, (tuple, list)):
        for s in state:
            yield from _walk_states(s)


def opt_state_to_numpy(backend: ModuleType, state) -> Dict[str, np.ndarray]:
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
            if field in _TREE_FIELDS:
                for i, leaf in enumerate(_flatten(value)):
                    out[f"{field}/{i}"] = np.asarray(backend.to_numpy(leaf))
            elif field in _SCALAR_FIELDS:
                out[field] = np.asarray(backend.to_numpy(value))
            else:
                raise ValueError(
                    f"optimizer state {type(s).__name__} has a field {field!r} that checkpoints cannot "
                    f"store; known fields: {list(_TREE_FIELDS + _SCALAR_FIELDS)}"
                )
    return out


def opt_state_from_numpy(backend: ModuleType, template, arrays: Dict[str, np.ndarray]):
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
                if field in _TREE_FIELDS:
                    leaves = [np.asarray(arrays[f"{field}/{i}"], dtype=ref.dtype)
                              for i, ref in enumerate(backend.to_numpy(tuple(_flatten(value))))]
                    updates[field] = backend.asarray(_unflatten(leaves, value))
                elif field in _SCALAR_FIELDS:
                    ref = np.asarray(backend.to_numpy(value))
                    updates[field] = backend.asarray(np.asarray(arrays[field], dtype=ref.dtype))
            return state._replace(**updates) if updates else state
        if isinstance(state, (tuple, list)):
            return type(state)(fill(s) for s in state)
        return state

    return fill(template)


def _atomic_write_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and ``os.replace``."""
    _atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str, checkpoint: Checkpoint) -> None:
    """Writes ``checkpoint`` to ``path`` (.npz) atomically, and its metadata beside it as .json.

    The .npz is self-contained (its metadata is stored inside, as ``__meta__``); the
    .json next to it is a human-readable copy.
    """
    resume = checkpoint.resume
    arrays: Dict[str, np.ndarray] = {}
    for l, (w, b) in enumerate(checkpoint.params):
        arrays[f"params/{l}/W"], arrays[f"params/{l}/b"] = np.asarray(w), np.asarray(b)
    for l, b in enumerate(checkpoint.feedback):
        arrays[f"feedback/{l}"] = np.asarray(b)
    for key, value in (resume.opt_state or {}).items():
        arrays[f"opt/{key}"] = np.asarray(value)
    meta = {
        "format_version": FORMAT_VERSION,
        "num_layers": len(checkpoint.params),
        "num_feedback": len(checkpoint.feedback),
        "has_opt_state": resume.opt_state is not None,
        "epoch": resume.epoch,
        "global_step": resume.global_step,
        "rng_state": resume.rng_state,
        "loss": list(resume.loss),
        "train_error": list(resume.train_error),
        "test_accuracy": list(resume.test_accuracy),
        "time_s": list(resume.time_s),
        "within_tol": resume.within_tol,
        "meta": checkpoint.meta,
    }
    # NaN losses are legal in the history (JSON's NaN extension is read back by json.loads).
    meta_json = json.dumps(meta, indent=1)
    arrays["__meta__"] = np.frombuffer(meta_json.encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _atomic_write_bytes(path, buffer.getvalue())
    atomic_write_text(os.path.splitext(path)[0] + ".json", meta_json)


def load_checkpoint(path: str) -> Checkpoint:
    """Reads a checkpoint written by ``save_checkpoint`` (by either backend).

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: not a checkpoint, or another format version.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable checkpoint (.npz): {err}") from None
    if "__meta__" not in arrays:
        raise ValueError(f"{path} is an .npz without checkpoint metadata (no '__meta__')")
    meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    params = tuple(
        (arrays[f"params/{l}/W"], arrays[f"params/{l}/b"]) for l in range(meta["num_layers"])
    )
    feedback = tuple(arrays[f"feedback/{l}"] for l in range(meta["num_feedback"]))
    opt_state: Optional[Dict[str, np.ndarray]] = None
    if meta["has_opt_state"]:
        opt_state = {key[len("opt/"):]: value for key, value in arrays.items() if key.startswith("opt/")}
    resume = ResumeState(
        epoch=meta["epoch"],
        global_step=meta["global_step"],
        rng_state=meta["rng_state"],
        opt_state=opt_state,
        loss=tuple(meta["loss"]),
        train_error=tuple(meta["train_error"]),
        test_accuracy=tuple(meta["test_accuracy"]),
        time_s=tuple(meta["time_s"]),
        within_tol=meta["within_tol"],
    )
    return Checkpoint(params, feedback, resume, meta["meta"])


__all__ = [
    "CHECKPOINT_NAME",
    "Checkpoint",
    "FORMAT_VERSION",
    "atomic_write_text",
    "load_checkpoint",
    "opt_state_from_numpy",
    "opt_state_to_numpy",
    "save_checkpoint",
]
