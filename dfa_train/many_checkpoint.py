"""``fit_many``'s checkpoints: one file per group of members, so a crashed sweep resumes.

A group (members of one optimizer structure, one program) writes ``group-<g>.npz`` into the
checkpoint folder after an epoch when ``cadence.checkpoint_due`` says so, and at its end
(marked done). The file holds everything the group's loop carries from one epoch to the next:
the stacked params and optimizer state (``state.opt_state_to_numpy``, KP's B and the draws'
counters included), each member's NumPy generator state (its batch orders), and each member's
record so far (losses, errors, accuracies, times, angles, the tol counters, the last
predictions). Written atomically (``checkpoint._atomic_write_bytes``): a crash at any moment
leaves the previous file whole. A file is read back only when its fingerprint (the spec, the
members, the shared options, the training set's size) equals the call's: another sweep's file
is an error, not a silent restart.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from dfa_train.checkpoint import _atomic_write_bytes
from dfa_train.state import AlignmentRecord

FORMAT_VERSION = 1
_SCALARS = ("within_tol", "stopped_early", "active")
_CURVES = ("losses", "errors", "accuracies", "times")


class Saved(NamedTuple):
    """A group's checkpoint as read back (NumPy; the caller puts the arrays on its device)."""

    epoch: int  # epochs the group has run (the next one to run)
    done: bool  # the group finished: its records are final
    params: Any  # ((W_l (M, ...), b_l (M, ...)), ...) NumPy
    opt_arrays: Dict[str, np.ndarray]  # ``state.opt_state_to_numpy`` of the stacked state
    rng_states: List[Dict[str, Any]]  # per member, ``np.random.Generator.bit_generator.state``
    records: List[Dict[str, Any]]  # per member, the fields of ``many._Record`` (lists, scalars, preds)


def fingerprint(spec: Any, members: Sequence[Any], opts: Dict[str, Any], n_train: int) -> str:
    """A digest of what a group's results depend on: the spec, every member, the shared options
    (arrays by shape only) and the training set's size."""
    shared = {k: (f"array{np.shape(v)}" if hasattr(v, "shape") else repr(v)) for k, v in sorted(opts.items())}
    text = repr((FORMAT_VERSION, spec, tuple(members), shared, int(n_train)))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def group_path(folder: str, group: int) -> str:
    return os.path.join(folder, f"group-{group}.npz")


def save(path: str, digest: str, saved: Saved) -> None:
    """Writes ``saved`` to ``path`` atomically (.npz with its metadata inside as ``__meta__``)."""
    arrays: Dict[str, Any] = {}
    for l, leaves in enumerate(saved.params):
        for i, leaf in enumerate(leaves):
            arrays[f"params/{l}/{i}"] = np.asarray(leaf)
    for key, value in saved.opt_arrays.items():
        arrays[f"opt/{key}"] = np.asarray(value)
    scalars = []
    for m, rec in enumerate(saved.records):
        for name in _CURVES:
            arrays[f"rec/{m}/{name}"] = np.asarray(rec[name], dtype=np.float64)
        for name in ("pred", "test_pred"):
            if rec[name] is not None:
                arrays[f"rec/{m}/{name}"] = np.asarray(rec[name], dtype=np.int64)
        align = rec["alignment"]
        arrays[f"rec/{m}/align_steps"] = np.asarray([[a.step, a.epoch] for a in align], dtype=np.int64).reshape(-1, 2)
        width = len(align[0].weights) if align else 0
        angles = [(a.weights, a.deltas) for a in align]
        arrays[f"rec/{m}/align_angles"] = np.asarray(angles, dtype=np.float64).reshape(len(align), 2, width)
        scalars.append({name: rec[name] for name in _SCALARS})
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": digest,
        "epoch": saved.epoch,
        "done": saved.done,
        "param_leaves": [len(leaves) for leaves in saved.params],
        "rng_states": saved.rng_states,
        "scalars": scalars,
    }
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _atomic_write_bytes(path, buffer.getvalue())


def load(path: str, digest: str) -> Optional[Saved]:
    """The group's checkpoint at ``path``, or None when there is none.

    Raises:
      ValueError: the file belongs to another run (fingerprint), another format, or is unreadable.
    """
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a readable fit_many checkpoint ({err})") from None
    if meta.get("format_version") != FORMAT_VERSION or meta.get("fingerprint") != digest:
        raise ValueError(
            f"{path} was written by another fit_many run (other members, spec, options or data); "
            "resume with the settings it was started with, or start in an empty folder"
        )
    params = tuple(tuple(arrays[f"params/{l}/{i}"] for i in range(n)) for l, n in enumerate(meta["param_leaves"]))
    opt_arrays = {k[len("opt/") :]: v for k, v in arrays.items() if k.startswith("opt/")}
    records = []
    for m, scalars in enumerate(meta["scalars"]):
        rec: Dict[str, Any] = {name: [float(v) for v in arrays[f"rec/{m}/{name}"]] for name in _CURVES}
        for name in ("pred", "test_pred"):
            rec[name] = arrays.get(f"rec/{m}/{name}")
        steps, angles = arrays[f"rec/{m}/align_steps"], arrays[f"rec/{m}/align_angles"]
        rec["alignment"] = [
            AlignmentRecord(int(s), int(e), tuple(map(float, w)), tuple(map(float, d)))
            for (s, e), (w, d) in zip(steps, angles)
        ]
        rec.update(scalars)
        records.append(rec)
    return Saved(int(meta["epoch"]), bool(meta["done"]), params, opt_arrays, meta["rng_states"], records)


__all__ = ["FORMAT_VERSION", "Saved", "fingerprint", "group_path", "load", "save"]
