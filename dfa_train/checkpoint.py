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
import zipfile
import zlib
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from dfa_train.state import ResumeState

FORMAT_VERSION = 2
"""Bumped whenever the layout of the .npz changes; ``load_checkpoint`` reads this one and
``READ_VERSIONS``, and refuses others. Version 2 stores block l's params as ``params/{l}/{i}``
(any number of leaves per block, ``param_leaves`` in the metadata: a conv or composite block);
version 1 (MLPs, ``params/{l}/W`` and ``params/{l}/b``) still loads."""

READ_VERSIONS = (1, 2)

CHECKPOINT_NAME = "checkpoint.npz"


class Checkpoint(NamedTuple):
    """One saved training state, all NumPy."""

    params: Tuple[Tuple[np.ndarray, ...], ...]  # each block's leaves: ((W_1, b_1), ...) for Dense and Conv2d
    feedback: Tuple[np.ndarray, ...]  # (B_1, ..., B_{L-1}), B_l (n_l, n_L)
    resume: ResumeState  # epoch, global_step, rng_state, opt_state (dict of arrays) and history so far
    meta: Dict[str, Any]  # free JSON: the run's config, backend that wrote it, ...


TEMP_PREFIX = ".tmp-"
"""Prefix of the temporary files an atomic write leaves only if it is killed mid-write."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes through a temporary file in the same folder, fsync, then ``os.replace``.

    The file gets the mode an ordinary ``open`` would give (0666 less the umask), not
    mkstemp's 0600. On any failure (a full disk, a signal) the temporary file is removed
    and the previous file at ``path``, if any, is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.basename(path), dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove_quietly(tmp)
        raise OSError(
            err.errno, f"could not write {path} ({err.strerror or err}); the previous version, if any, is unchanged"
        ) from err
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def remove_stale_temps(folder: str) -> Tuple[str, ...]:
    """Removes the temporary files a killed atomic write left in ``folder``; returns their names."""
    if not os.path.isdir(folder):
        return ()
    stale = tuple(sorted(name for name in os.listdir(folder) if name.startswith(TEMP_PREFIX)))
    for name in stale:
        _remove_quietly(os.path.join(folder, name))
    return stale


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and ``os.replace``."""
    _atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str, checkpoint: Checkpoint) -> None:
    """Writes ``checkpoint`` to ``path`` (.npz) atomically, and its metadata beside it as .json.

    The .npz is self-contained (its metadata is stored inside, as ``__meta__``); the
    .json next to it is a human-readable copy.

    Raises:
      ValueError: non-finite params (the last finite checkpoint is kept instead).
      OSError: the file could not be written (the previous checkpoint is unchanged).
    """
    resume = checkpoint.resume
    for l, pair in enumerate(checkpoint.params, start=1):
        if not all(np.all(np.isfinite(a)) for a in pair):
            raise ValueError(
                f"refusing to save a checkpoint to {path}: layer {l}'s params are not finite "
                "(a diverged state would overwrite the last good one)"
            )
    arrays: Dict[str, Any] = {}  # NumPy arrays; Any as numpy's stubs type savez's **kwds as allow_pickle too
    for l, leaves in enumerate(checkpoint.params):
        for i, leaf in enumerate(leaves):
            arrays[f"params/{l}/{i}"] = np.asarray(leaf)
    for l, b in enumerate(checkpoint.feedback):
        arrays[f"feedback/{l}"] = np.asarray(b)
    for key, value in (resume.opt_state or {}).items():
        arrays[f"opt/{key}"] = np.asarray(value)
    meta = {
        "format_version": FORMAT_VERSION,
        "num_layers": len(checkpoint.params),
        "param_leaves": [len(leaves) for leaves in checkpoint.params],
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
        "reference_loss": resume.reference_loss,
        "meta": checkpoint.meta,
    }
    # NaN losses are legal in the history (JSON's NaN extension is read back by json.loads).
    meta_json = json.dumps(meta, indent=1)
    arrays["__meta__"] = np.frombuffer(meta_json.encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _atomic_write_bytes(path, buffer.getvalue())
    atomic_write_text(os.path.splitext(path)[0] + ".json", meta_json)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


_META_KEYS = {
    "num_layers": int,
    "num_feedback": int,
    "has_opt_state": bool,
    "epoch": int,
    "global_step": int,
    "rng_state": dict,
    "loss": list,
    "train_error": list,
    "test_accuracy": list,
    "time_s": list,
    "within_tol": int,
    "meta": dict,
}


def _read_arrays(path: str) -> Dict[str, np.ndarray]:
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path} is empty (a write was cut short?); remove it or resume from a copy")
    if head != b"PK\x03\x04":
        raise CheckpointError(f"{path} is not a checkpoint: it is not an .npz (zip) file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise CheckpointError(f"{path} is damaged (truncated or corrupted .npz: {err})") from None


def _read_meta(path: str, arrays: Dict[str, np.ndarray]) -> Dict[str, Any]:
    if "__meta__" not in arrays:
        raise CheckpointError(f"{path} is an .npz without checkpoint metadata (no '__meta__')")
    try:
        meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: its metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format_version") not in READ_VERSIONS:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: checkpoint format version {version!r}, this code reads {list(READ_VERSIONS)}")
    keys = dict(_META_KEYS, param_leaves=list) if meta["format_version"] >= 2 else _META_KEYS
    for key, kind in keys.items():
        if not isinstance(meta.get(key), kind):
            got = type(meta[key]).__name__ if key in meta else "nothing"
            raise CheckpointError(f"{path}: metadata key {key!r} must be a {kind.__name__}, got {got}")
    return meta


def _array(path: str, arrays: Dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in arrays:
        raise CheckpointError(f"{path}: array {key!r} is missing")
    return arrays[key]


def _read_params(path: str, arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> Tuple[Tuple[np.ndarray, ...], ...]:
    """Block l's leaves: ``params/{l}/{i}`` (version 2) or ``params/{l}/W``, ``params/{l}/b`` (version 1)."""
    names: List[Tuple[str, ...]]
    if meta["format_version"] == 1:
        names = [("W", "b")] * meta["num_layers"]
    else:
        counts = meta["param_leaves"]
        if len(counts) != meta["num_layers"] or not all(isinstance(n, int) and n >= 1 for n in counts):
            raise CheckpointError(
                f"{path}: metadata 'param_leaves' {counts!r} does not fit {meta['num_layers']} layers"
            )
        names = [tuple(str(i) for i in range(n)) for n in counts]
    return tuple(tuple(_array(path, arrays, f"params/{l}/{name}") for name in block) for l, block in enumerate(names))


def load_checkpoint(path: str) -> Checkpoint:
    """Reads a checkpoint written by ``save_checkpoint`` (by either backend).

    Raises:
      FileNotFoundError: no file at ``path``.
      CheckpointError (a ValueError): empty, truncated, corrupted, not a checkpoint, another
        format version, or missing pieces; the message names the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    arrays = _read_arrays(path)
    meta = _read_meta(path, arrays)
    params = _read_params(path, arrays, meta)
    feedback = tuple(_array(path, arrays, f"feedback/{l}") for l in range(meta["num_feedback"]))
    opt_state: Optional[Dict[str, np.ndarray]] = None
    if meta["has_opt_state"]:
        opt_state = {key[len("opt/") :]: value for key, value in arrays.items() if key.startswith("opt/")}
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
        reference_loss=meta.get("reference_loss"),
    )
    return Checkpoint(params, feedback, resume, meta["meta"])


__all__ = [
    "CHECKPOINT_NAME",
    "Checkpoint",
    "CheckpointError",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "atomic_write_text",
    "load_checkpoint",
    "remove_stale_temps",
    "save_checkpoint",
]
