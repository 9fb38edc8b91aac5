"""The files of a run folder: config.json, history.jsonl, metrics.json, params.npz and the figures.

    run_dir/config.json      RunConfig.to_json(): everything needed to rerun
    run_dir/history.jsonl    one JSON record per finished epoch (loss, errors, speed, alignment)
    run_dir/checkpoint.npz   the state to resume from (dfa_train.checkpoint), + checkpoint.json
    run_dir/metrics.json     the run's summary (metrics_of)
    run_dir/params.npz       final parameters as W0, b0, W1, b1, ...
    run_dir/*.png            training curves, confusion matrix, precision/recall, alignment

Backend-neutral: NumPy, JSON and (for the figures, when asked) matplotlib.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from dfa_core.backend import ParamsLike
from dfa_train.checkpoint import atomic_write_text
from dfa_train.config import RunConfig
from dfa_train.state import EpochEnd, History, ResumeState

CONFIG_NAME = "config.json"
HISTORY_NAME = "history.jsonl"
METRICS_NAME = "metrics.json"
PARAMS_NAME = "params.npz"


def finite_or_none(value: Optional[float]) -> Optional[float]:
    """``value`` as a float, or None when it is None, NaN or infinite (strict JSON has no NaN)."""
    return None if value is None or not math.isfinite(value) else float(value)


def _alignment_records(records) -> List[Dict[str, Any]]:
    return [
        {
            "step": r.step,
            "weights": [finite_or_none(v) for v in r.weights],
            "deltas": [finite_or_none(v) for v in r.deltas],
        }
        for r in records
    ]


def epoch_record(e: EpochEnd) -> Dict[str, Any]:
    """The history.jsonl line of one finished epoch."""
    return {
        "epoch": e.epoch,
        "loss": finite_or_none(e.loss),
        "train_error": e.train_error,
        "test_accuracy": e.test_accuracy,
        "time_s": e.time_s,
        "samples_per_s": e.samples_per_s,
        "alignment": _alignment_records(e.alignment),
    }


def history_records(history: History, n_train: int) -> List[Dict[str, Any]]:
    """history.jsonl's lines rebuilt from a whole ``History`` (for runs trained without ``on_epoch``)."""
    records = []
    for i, (loss, error, time_s) in enumerate(zip(history.loss, history.train_error, history.time_s)):
        records.append(
            {
                "epoch": i + 1,
                "loss": finite_or_none(loss),
                "train_error": error,
                "test_accuracy": history.test_accuracy[i] if history.test_accuracy else None,
                "time_s": time_s,
                "samples_per_s": n_train / time_s if time_s > 0 else None,
                "alignment": _alignment_records(r for r in history.alignment if r.epoch == i),
            }
        )
    return records


def read_history(run_dir: str, up_to_epoch: Optional[int] = None) -> List[Dict[str, Any]]:
    """history.jsonl's records with epoch <= ``up_to_epoch`` (all when None); [] without the file."""
    path = os.path.join(run_dir, HISTORY_NAME)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if up_to_epoch is None or r["epoch"] <= up_to_epoch]


def _readable_records(path: str) -> List[Dict[str, Any]]:
    """history.jsonl's records, stopping at the first line that is not a whole record (a write cut
    short by a crash); [] without the file."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                break
            records.append(record)
    return records


def history_for_resume(run_dir: str, resume: ResumeState, n_train: int) -> List[Dict[str, Any]]:
    """The history of the checkpoint's ``resume.epoch`` epochs, one record each.

    Records come from history.jsonl where it has them; a missing file, a cut last line or
    missing epochs are rebuilt from the checkpoint, which holds each epoch's loss, errors and
    time (the rebuilt records have no alignment angles). Records past the checkpoint go.
    """
    kept = {r["epoch"]: r for r in _readable_records(os.path.join(run_dir, HISTORY_NAME))}
    records = []
    for i in range(resume.epoch):
        if i + 1 in kept:
            records.append(kept[i + 1])
            continue
        time_s = resume.time_s[i] if i < len(resume.time_s) else 0.0
        records.append(
            {
                "epoch": i + 1,
                "loss": finite_or_none(resume.loss[i]),
                "train_error": resume.train_error[i],
                "test_accuracy": resume.test_accuracy[i] if i < len(resume.test_accuracy) else None,
                "time_s": time_s,
                "samples_per_s": n_train / time_s if time_s > 0 else None,
                "alignment": [],
            }
        )
    return records


def write_history(run_dir: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Replaces history.jsonl by ``records``, atomically."""
    atomic_write_text(os.path.join(run_dir, HISTORY_NAME), "".join(json.dumps(r) + "\n" for r in records))


def append_history(run_dir: str, record: Mapping[str, Any]) -> None:
    """Adds one epoch's line to history.jsonl."""
    with open(os.path.join(run_dir, HISTORY_NAME), "a") as f:
        f.write(json.dumps(record) + "\n")


def write_config(run_dir: str, config: RunConfig) -> None:
    atomic_write_text(os.path.join(run_dir, CONFIG_NAME), config.to_json())


def read_config(run_dir: str) -> RunConfig:
    """The RunConfig of run_dir/config.json.

    Raises:
      FileNotFoundError: no config.json there.
      ValueError: a config.json that ``RunConfig.from_json`` refuses (the message names the key).
    """
    path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {run_dir}")
    with open(path) as f:
        text = f.read()
    try:
        return RunConfig.from_json(text)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def metrics_of(config: RunConfig, history: History, n_train: int, n_test: int) -> Dict[str, Any]:
    """metrics.json: final and per-epoch errors, speed, confusion matrix, per-class precision/recall."""
    wall = float(sum(history.time_s))
    epochs = len(history.loss)
    metrics = {
        "method": config.method,
        "backend": config.backend,
        "mode": config.mode,
        "test_accuracy": history.test_accuracy[-1] if history.test_accuracy else None,
        "train_error": list(history.train_error),
        "loss": [finite_or_none(v) for v in history.loss],
        "test_accuracy_per_epoch": list(history.test_accuracy),
        "epochs_run": epochs,
        "stopped_early": history.stopped_early,
        "wall_s": wall,
        "samples_per_s": n_train * epochs / wall if wall > 0 else None,
        "confusion": np.asarray(history.confusion).tolist(),
        "confusion_split": history.confusion_split,
        "n_train": int(n_train),
        "n_test": int(n_test),
    }
    if np.asarray(history.confusion).shape[0] > 0:
        from dfa_train.plots import precision_recall

        precision, recall = precision_recall(history.confusion)
        metrics["precision"] = [finite_or_none(v) for v in precision]
        metrics["recall"] = [finite_or_none(v) for v in recall]
    return metrics


def write_metrics(run_dir: str, metrics: Mapping[str, Any]) -> None:
    atomic_write_text(os.path.join(run_dir, METRICS_NAME), json.dumps(metrics, indent=1, allow_nan=False))


def save_params(run_dir: str, params: ParamsLike) -> None:
    """params.npz with W0, b0, W1, b1, ... (W_l (n_l, n_{l-1}), b_l (n_l,))."""
    # Dict[str, Any]: numpy's stubs type savez's **kwds as allow_pickle's bool as well.
    arrays: Dict[str, Any] = {f"{k}{l}": np.asarray(a) for l, pair in enumerate(params) for k, a in zip("Wb", pair)}
    np.savez(os.path.join(run_dir, PARAMS_NAME), **arrays)


def write_plots(
    out_dir: str, runs: Mapping[str, Mapping[str, Any]], records: Sequence[Mapping[str, Any]], steps_per_epoch: int
) -> List[str]:
    """Curves, confusion matrices, precision/recall and (from ``records``) alignment PNGs in ``out_dir``.

    Args:
      out_dir: the folder.
      runs: label -> metrics (``metrics_of``), e.g. {'DFA': ..., 'BP': ...}.
      records: history.jsonl records whose alignment is drawn (one run's).
      steps_per_epoch: puts the alignment plot's x axis in epochs.

    Returns:
      The paths written.
    """
    from dfa_train import plots

    written = [plots.plot_curves(runs, os.path.join(out_dir, "training_curves.png"))]
    for label, m in runs.items():
        suffix = "" if len(runs) == 1 else f"_{label.lower()}"
        written.append(
            plots.plot_confusion(
                np.asarray(m["confusion"]),
                os.path.join(out_dir, f"confusion{suffix}.png"),
                f"confusion matrix ({label}, {m['confusion_split']} set)",
            )
        )
    written.append(
        plots.plot_precision_recall(
            {k: np.asarray(m["confusion"]) for k, m in runs.items()}, os.path.join(out_dir, "precision_recall.png")
        )
    )
    alignment = [a for r in records for a in r.get("alignment", [])]
    method = next(iter(runs)) if len(runs) == 1 else "DFA"  # 'dfa compare' draws its DFA run's angles
    path = plots.plot_alignment(alignment, os.path.join(out_dir, "alignment.png"), steps_per_epoch, method)
    if path:
        written.append(path)
    return written


__all__ = [
    "CONFIG_NAME",
    "HISTORY_NAME",
    "METRICS_NAME",
    "PARAMS_NAME",
    "append_history",
    "epoch_record",
    "finite_or_none",
    "history_records",
    "metrics_of",
    "read_config",
    "read_history",
    "save_params",
    "write_config",
    "write_history",
    "write_metrics",
    "write_plots",
]
