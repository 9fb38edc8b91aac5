"""Checkpoints of a training run as one .npz (arrays + JSON metadata), loadable by either backend.

A checkpoint holds the params, the feedback matrices, the optimizer state, the number of
epochs run and the batch-order generator's state, enough for ``fit(resume=...)`` to end
with the same params as an uninterrupted run. Arrays are stored as NumPy; the optimizer
state as ``dfa_train.state.opt_state_to_numpy`` flattens it, so a checkpoint written on
torch resumes on JAX and back.

Files are written to a temporary name in the same folder and moved in place with
``os.replace``, so a crash never leaves a half-written checkpoint under the real name.
Imports neither torch nor JAX.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np

from dfa_train.state import ResumeState

FORMAT_VERSION = 1
"""Bumped whenever the layout of the .npz changes; ``load_checkpoint`` refuses other versions."""

CHECKPOINT_NAME = "checkpoint.npz"



class Checkpoint(NamedTuple):
    """One saved training state, all NumPy."""

    params: Tuple[Tuple[np.ndarray, np.ndarray], ...]  # ((W_l (n_l, n_{l-1}), b_l (n_l,)), ...)
    feedback: Tuple[np.ndarray, ...]  # (B_1, ..., B_{L-1}), B_l (n_l, n_L)
    resume: ResumeState  # epoch, global_step, rng_state, opt_state (dict of arrays) and history so far
    meta: Dict[str, Any]  # free JSON: the run's config, backend that wrote it, ...


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
    "save_checkpoint",
]
