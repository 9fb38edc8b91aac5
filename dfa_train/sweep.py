"""``sweep(config, seeds, out_dir, lrs=...)``: every (learning rate, seed) member trained together by ``fit_many``.

    dfa sweep --seeds 0-7 --lr 1e-4,3e-4 --epochs 20 --out runs/sweep

A member is one seed s for everything random in a run: the batch order (``seed=s``), the
initial weights (``param_seed=s``) and the feedback matrices (``feedback_seed=s + 1``,
``RunConfig.for_seed``), so member s is exactly ``dfa train --seed s --param-seed s
--feedback-seed s+1`` and member 0 is the default single run. All members go through one
``dfa_train.fit_many`` call (each member's History equals ``fit`` run alone), whatever the
config's learning rule and hardware projection (quantised error, projection noise).

Writes, under ``out_dir``:

    lr=0.0001/seed=3/   config.json, history.jsonl, metrics.json, params.npz (one run folder per member)
    summary.json        per setting: test accuracy mean, std (ddof=1), min, max across seeds; the
                        per-epoch mean and std; every member's finals
    sweep.png           per setting, the mean +- std band of test accuracy per epoch and each member's curve

    sweep.json          the sweep's settings (config, seeds, lrs), written before training
    checkpoints/        ``fit_many``'s checkpoints while the sweep trains (removed once it has finished)

A crashed or interrupted sweep resumes from its last checkpoint: ``resume_sweep(out_dir)``
(``dfa sweep --resume DIR``), and each member's History equals an uninterrupted sweep's.
A member's ``time_s`` (and so its ``samples_per_s`` and ``wall_s``) is that of its whole
``fit_many`` group, all members together.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from dfa_train import run_files
from dfa_train.checkpoint import atomic_write_text
from dfa_train.config import FEEDBACK_SEED_OFFSET, RunConfig
from dfa_train.run import Data, Interrupts, check_widths, device_scope, load_data
from dfa_train.run_dir import check_new_folder
from dfa_train.state import History

SUMMARY_VERSION = 1
SWEEP_VERSION = 1
SWEEP_NAME = "sweep.json"
CHECKPOINTS = "checkpoints"
SEEDS_FORMS = "a range such as 0-7, a list such as 0,3,5, or one seed such as 4 (seeds are ints >= 0)"


class Member(NamedTuple):
    """One run of a sweep."""

    setting: str  # the setting's folder name, e.g. 'lr=0.0001'
    seed: int  # the member's seed (RunConfig.for_seed)
    config: RunConfig  # the member's full config
    run_dir: str  # out_dir/setting/seed=s


def parse_seeds(text: str) -> Tuple[int, ...]:
    """'0-7' -> (0, ..., 7); '0,3,5' -> (0, 3, 5); '4' -> (4,); parts combine ('0-2,9').

    Raises:
      ValueError: an empty part, a non-int, a negative seed, a range a-b with b < a, or a repeated seed.
    """
    seeds: List[int] = []
    for part in str(text).split(","):
        bounds = part.strip().split("-")
        if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
            raise ValueError(f"invalid seeds {text!r}: expected {SEEDS_FORMS}")
        low, high = int(bounds[0]), int(bounds[-1])
        if high < low:
            raise ValueError(f"invalid seeds {text!r}: range {part.strip()} ends before it starts")
        seeds.extend(range(low, high + 1))
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"invalid seeds {text!r}: seed(s) {repeated} given more than once")
    return tuple(seeds)


def parse_floats(text: str) -> Tuple[float, ...]:
    """'1e-4,3e-4' -> (0.0001, 0.0003): distinct finite numbers > 0.

    Raises:
      ValueError: an empty list, a non-number, a value <= 0 or not finite, or a repeated value.
    """
    values = []
    for part in str(text).split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"invalid list {text!r}: {part.strip()!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"invalid list {text!r}: expected finite numbers > 0, got {part.strip()!r}")
        values.append(value)
    if len(set(values)) != len(values):
        raise ValueError(f"invalid list {text!r}: a value is given more than once")
    return tuple(values)


def setting_name(lr: float) -> str:
    """The folder of a learning rate: 'lr=0.0001' (repr: exact and unique per float)."""
    return f"lr={float(lr)!r}"


def members_of(config: RunConfig, seeds: Sequence[int], lrs: Sequence[float], out_dir: str) -> List[Member]:
    """Every (lr, seed) member, lr-major, each with its config and run folder."""
    if not seeds:
        raise ValueError("a sweep needs at least one seed")
    out = []
    for lr in lrs:
        setting = setting_name(lr)
        for seed in seeds:
            member = config.for_seed(seed).replace(lr=float(lr))
            out.append(Member(setting, int(seed), member, os.path.join(out_dir, setting, f"seed={seed}")))
    return out


class _EpochBar:
    """A tqdm bar over the epochs of every group of ``fit_many`` (its ``progress`` callback)."""

    def __init__(self, label: str):
        from tqdm import tqdm

        self.bar = tqdm(total=0, desc=label, unit="epoch", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, group: int, groups: int, epoch: int, epochs: int) -> None:
        self.bar.total = groups * epochs
        self.bar.n = group * epochs + epoch  # a resumed group starts where its checkpoint stopped
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _fit_members(
    config: RunConfig,
    members: Sequence[Member],
    data: Data,
    checkpoint_dir: Optional[str] = None,
    progress: Optional[Callable[[int, int, int, int], None]] = None,
) -> Tuple[History, ...]:
    """One ``dfa_train.fit_many`` call for all members (checkpointed in ``checkpoint_dir``); returns
    their Histories in order."""
    import dfa_train

    fit_many = getattr(dfa_train, "fit_many", None)  # looked up per call: tests may replace it
    if fit_many is None:
        from dfa_train import many

        fit_many = many.fit_many
    x_train, y_train, x_test, y_test = data
    specs = [
        {
            "seed": m.config.seed,
            "param_seed": m.config.param_seed,
            "feedback_seed": m.config.feedback_seed,
            "optimizer": m.config.optimizer_spec(),
        }
        for m in members
    ]
    with device_scope(config.backend, config.device):
        return fit_many(
            config.backend,
            config.spec(),
            x_train,
            y_train,
            members=specs,
            x_test=x_test,
            y_test=y_test,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
            method=config.rule(),
            mode=config.mode,
            epochs=config.epochs,
            batch_size=config.batch_size,
            feedback_dist=config.feedback_dist,
            feedback_scale=config.feedback_scale,
            feedback_options=config.feedback_options(),
            projection=config.projection(),
            tol=config.tol,
            patience=config.patience,
            align_every=config.align_every,
            lr_milestones=config.lr_milestones or (),
            lr_gamma=config.lr_gamma,
            kp_decay=config.kp_decay,
        )


def _write_member(member: Member, history, data: Data) -> Dict[str, Any]:
    """The member's run folder (finished: no checkpoint of its own). Returns its metrics."""
    n_train, n_test = data[0].shape[0], data[2].shape[0]
    os.makedirs(member.run_dir, exist_ok=True)
    run_files.write_config(member.run_dir, member.config)
    run_files.write_history(member.run_dir, run_files.history_records(history, n_train))
    metrics = run_files.metrics_of(member.config, history, n_train, n_test)
    run_files.write_metrics(member.run_dir, metrics)
    run_files.save_params(member.run_dir, history.params)
    return metrics


def _stats(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """mean, std (ddof=1; 0 for one value), min, max of the finite values; None when there are none."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
    }


def per_epoch_mean_std(curves: Sequence[Sequence[Optional[float]]]) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and std (ddof=1; 0 where one member has the epoch) per epoch of ragged member curves.

    Args:
      curves: one sequence per member (members stopped early by ``tol`` are shorter); None = missing.

    Returns:
      (mean (E,), std (E,)), E the longest curve; NaN where no member has a finite value.
    """
    length = max((len(c) for c in curves), default=0)
    table = np.full((len(curves), length), np.nan)
    for i, c in enumerate(curves):
        table[i, : len(c)] = [np.nan if v is None else v for v in c]
    count = np.sum(np.isfinite(table), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(table, axis=0) / count
        var = np.nansum((table - mean) ** 2, axis=0) / np.maximum(count - 1, 1)
    mean[count == 0] = np.nan
    return mean, np.where(count > 0, np.sqrt(var), np.nan)


def _nan_to_none(values) -> List[Optional[float]]:
    return [run_files.finite_or_none(v) for v in values]


def _setting_summary(setting: str, lr: float, members: Sequence[Member], metrics: Sequence[Dict[str, Any]]):
    curves = [m["test_accuracy_per_epoch"] for m in metrics]
    mean, std = per_epoch_mean_std(curves)
    return {
        "name": setting,
        "lr": lr,
        "dir": setting,
        "test_accuracy": _stats([m["test_accuracy"] for m in metrics]),
        "train_error": _stats([m["train_error"][-1] for m in metrics]),
        "test_accuracy_per_epoch": {"mean": _nan_to_none(mean), "std": _nan_to_none(std)},
        "members": [
            {
                "seed": member.seed,
                "dir": os.path.join(setting, f"seed={member.seed}"),
                "param_seed": member.config.param_seed,
                "feedback_seed": member.config.feedback_seed,
                "test_accuracy": m["test_accuracy"],
                "train_error": m["train_error"][-1],
                "loss": m["loss"][-1],
                "epochs_run": m["epochs_run"],
                "test_accuracy_per_epoch": m["test_accuracy_per_epoch"],
            }
            for member, m in zip(members, metrics)
        ],
    }


def summarize(
    config: RunConfig,
    seeds: Sequence[int],
    lrs: Sequence[float],
    members: Sequence[Member],
    metrics: Sequence[Dict[str, Any]],
) -> Dict[str, Any]:
    """summary.json's content: per setting (lr) the statistics across seeds and every member's finals."""
    settings = []
    for lr in lrs:
        chosen = [(m, x) for m, x in zip(members, metrics) if m.setting == setting_name(lr)]
        settings.append(_setting_summary(setting_name(lr), float(lr), [m for m, _ in chosen], [x for _, x in chosen]))
    return {
        "version": SUMMARY_VERSION,
        "config": config.to_dict(),
        "seeds": list(seeds),
        "lrs": [float(lr) for lr in lrs],
        "seed_mapping": f"member seed s: seed=s (batch order), param_seed=s (initial weights), "
        f"feedback_seed=s+{FEEDBACK_SEED_OFFSET} (feedback matrices)",
        "std": "sample standard deviation across seeds (ddof=1; 0 for a single seed)",
        "settings": settings,
    }


def _plot(summary: Dict[str, Any], path: str) -> str:
    from dfa_train import plots

    bands: Dict[str, Dict[str, Any]] = {}
    for s in summary["settings"]:
        curves = [m["test_accuracy_per_epoch"] for m in s["members"]]
        mean, std = per_epoch_mean_std(curves)
        bands[s["name"]] = {"members": curves, "mean": mean, "std": std}
    return plots.plot_sweep(bands, path)


def sweep(
    config: RunConfig,
    seeds: Sequence[int],
    out_dir: str,
    *,
    lrs: Optional[Sequence[float]] = None,
    data: Optional[Data] = None,
    progress: bool = False,
) -> Dict[str, Any]:
    """Trains every (lr, seed) member of ``config`` through one ``fit_many`` call; writes the sweep folder.

    Args:
      config: the settings shared by all members (its seeds and, when ``lrs`` is given, its lr are replaced).
      seeds: member seeds (``parse_seeds``); each is used as ``RunConfig.for_seed`` describes.
      out_dir: the sweep folder (must not hold a sweep).
      lrs: learning rates, one setting each; default ``(config.lr,)``.
      data: (x_train, y_train, x_test, y_test) instead of ``load_data(config)``.
      progress: a tqdm bar on stderr over the epochs of every group of members.

    Returns:
      The summary written to summary.json.

    Raises:
      ConfigError: the layer widths do not fit the data.
      ValueError: no seeds, or ``out_dir`` already holds a sweep.
    """
    lrs = (config.lr,) if lrs is None else tuple(float(lr) for lr in lrs)
    check_new_folder(out_dir)
    members = members_of(config, seeds, lrs, out_dir)
    if os.path.exists(os.path.join(out_dir, SWEEP_NAME)):
        raise ValueError(f"{out_dir!r} holds an unfinished sweep; continue it with dfa sweep --resume {out_dir}")
    if os.path.exists(os.path.join(out_dir, "summary.json")) or any(
        os.path.exists(os.path.join(m.run_dir, run_files.CONFIG_NAME)) for m in members
    ):
        raise ValueError(f"{out_dir!r} already holds a sweep; choose another folder")
    data = load_data(config) if data is None else data
    check_widths(config, data)
    settings = {"version": SWEEP_VERSION, "config": config.to_dict(), "seeds": list(seeds), "lrs": list(lrs)}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, SWEEP_NAME), json.dumps(settings, indent=1))
    return _train_and_write(config, seeds, lrs, members, out_dir, data, progress)


def resume_sweep(out_dir: str, *, data: Optional[Data] = None, progress: bool = False) -> Dict[str, Any]:
    """Finishes the sweep in ``out_dir`` from its checkpoints, with the settings of its sweep.json.

    Returns:
      The summary written to summary.json (equal to an uninterrupted sweep's but for times).

    Raises:
      ValueError: ``out_dir`` holds no sweep to resume (no sweep.json), a finished one, or
        checkpoints of other settings.
    """
    path = os.path.join(out_dir, SWEEP_NAME)
    if os.path.exists(os.path.join(out_dir, "summary.json")):
        raise ValueError(f"{out_dir!r} holds a finished sweep (summary.json): nothing to resume")
    if not os.path.isfile(path):
        raise ValueError(f"{out_dir!r} holds no sweep to resume (no {SWEEP_NAME})")
    with open(path) as f:
        settings = json.load(f)
    if settings.get("version") != SWEEP_VERSION:
        raise ValueError(f"{path}: sweep format {settings.get('version')!r}, this version reads {SWEEP_VERSION}")
    config = RunConfig.from_json(json.dumps(settings["config"]))
    seeds, lrs = tuple(settings["seeds"]), tuple(float(lr) for lr in settings["lrs"])
    members = members_of(config, seeds, lrs, out_dir)
    data = load_data(config) if data is None else data
    check_widths(config, data)
    return _train_and_write(config, seeds, lrs, members, out_dir, data, progress)


def _train_and_write(
    config, seeds, lrs, members: Sequence[Member], out_dir: str, data: Data, progress: bool = False
) -> Dict[str, Any]:
    """Trains the members (checkpointed under out_dir), writes their folders, summary and plot."""
    checkpoints = os.path.join(out_dir, CHECKPOINTS)
    bar = _EpochBar(f"sweep {config.method} x{len(members)}") if progress else None
    try:
        with Interrupts():  # SIGTERM, as Ctrl-C, ends the sweep with its checkpoints whole
            histories = _fit_members(config, members, data, checkpoints, bar)
    finally:
        if bar is not None:
            bar.close()
    metrics = [_write_member(m, h, data) for m, h in zip(members, histories)]
    summary = summarize(config, seeds, lrs, members, metrics)
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1, allow_nan=False))
    if not config.no_plots:
        _plot(summary, os.path.join(out_dir, "sweep.png"))
    shutil.rmtree(checkpoints, ignore_errors=True)  # the results are written: the checkpoints have served
    return summary


__all__ = [
    "Member",
    "SUMMARY_VERSION",
    "members_of",
    "parse_floats",
    "parse_seeds",
    "per_epoch_mean_std",
    "resume_sweep",
    "setting_name",
    "summarize",
    "sweep",
]
