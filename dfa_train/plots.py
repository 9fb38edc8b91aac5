"""The report's figures as PNG files: error and loss curves, confusion matrix, precision/recall, alignment.

Uses matplotlib's object-oriented API on an Agg canvas (``matplotlib.figure.Figure``),
never ``pyplot``, so it works headless and does not switch the backend of a notebook
or script that imports it. matplotlib is imported when a function is called.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np


def _figure(width: float = 6.0, height: float = 4.0):
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("plots need matplotlib: pip install matplotlib") from err
    return Figure(figsize=(width, height), dpi=100)


def precision_recall(confusion: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-class precision and recall from a (C, C) confusion matrix (rows true, columns predicted).

    Returns:
      (precision (C,), recall (C,)); NaN for a class never predicted (precision) or absent (recall).
    """
    c = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / c.sum(axis=0), tp / c.sum(axis=1)


def plot_curves(runs: Mapping[str, Mapping[str, Sequence[float]]], path: str, title: str = "") -> str:
    """Training error and loss per epoch, one line per run (e.g. {'DFA': metrics, 'BP': metrics}).

    Args:
      runs: label -> a mapping with 'train_error' and 'loss' lists (one value per epoch).
      path: the PNG to write.
    """
    fig = _figure(10, 4)
    ax_err, ax_loss = fig.subplots(1, 2)
    for label, m in runs.items():
        epochs = np.arange(1, len(m["train_error"]) + 1)
        ax_err.plot(epochs, 100 * np.asarray(m["train_error"], dtype=float), marker="o", ms=3, label=label)
        ax_loss.plot(
            epochs,
            np.asarray([np.nan if v is None else v for v in m["loss"]], dtype=float),
            marker="o",
            ms=3,
            label=label,
        )
    ax_err.set(xlabel="epoch", ylabel="training error (%)", title="training error")
    ax_loss.set(xlabel="epoch", ylabel="mean loss per sample", title="training loss")
    for ax in (ax_err, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_confusion(confusion: np.ndarray, path: str, title: str = "confusion matrix") -> str:
    """The (C, C) confusion matrix as an annotated heat map (rows true, columns predicted)."""
    c = np.asarray(confusion)
    fig = _figure(5.5, 5)
    ax = fig.subplots()
    im = ax.imshow(c, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    n = c.shape[0]
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(int(c[i, j])),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if c[i, j] > c.max() / 2 else "black",
                )
    ax.set(xlabel="predicted class", ylabel="true class", title=title, xticks=range(n), yticks=range(n))
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_precision_recall(confusions: Mapping[str, np.ndarray], path: str) -> str:
    """Per-class precision and recall, grouped bars, one colour per run."""
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    k = len(confusions)
    width = 0.8 / max(k, 1)
    for r, (label, conf) in enumerate(confusions.items()):
        precision, recall = precision_recall(conf)
        x = np.arange(len(precision)) + (r - (k - 1) / 2) * width
        axes[0].bar(x, np.nan_to_num(precision), width, label=label)
        axes[1].bar(x, np.nan_to_num(recall), width, label=label)
    for ax, name in zip(axes, ("precision", "recall")):
        n = len(next(iter(confusions.values())))
        ax.set(xlabel="class", ylabel=name, title=f"per-class {name}", ylim=(0, 1.05), xticks=range(n))
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_alignment(
    records: Sequence[Mapping], path: str, steps_per_epoch: Optional[int] = None, method: str = "DFA"
) -> Optional[str]:
    """Angles to BP per layer over training steps: the update (left) and the teaching signal (right).

    Args:
      records: dicts with 'step', 'weights' and 'deltas' (one angle in degrees per layer, None for
        undefined), as in ``History.to_dict()['alignment']``.
      path: the PNG to write.
      steps_per_epoch: if given, the x axis is in epochs.
      method: the rule's name for the labels ('DFA', 'FA', ...).

    Returns:
      ``path``, or None when there are no records (nothing is written).
    """
    if not records:
        return None
    steps = np.asarray([r["step"] for r in records], dtype=float)
    x = steps / steps_per_epoch if steps_per_epoch else steps
    fig = _figure(11, 4)
    for ax, key, what in zip(fig.subplots(1, 2), ("weights", "deltas"), ("update of W_l", "teaching signal delta_l")):
        angles = np.asarray([[np.nan if v is None else v for v in r.get(key, ())] for r in records], dtype=float)
        for l in range(angles.shape[1] if angles.ndim == 2 else 0):
            label = f"layer {l + 1}" + (" (output)" if l == angles.shape[1] - 1 else "")
            ax.plot(x, angles[:, l], label=label)
        ax.axhline(90, color="grey", ls=":", lw=1)
        ax.set(
            xlabel="epoch" if steps_per_epoch else "step",
            ylabel=f"angle {method} vs BP (degrees)",
            title=f"{what}: {method} vs BP",
            ylim=(0, 180),
        )
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_sweep(settings: Mapping[str, Mapping[str, Sequence]], path: str, ylabel: str = "test accuracy (%)") -> str:
    """Per setting, the mean +- std band of a per-epoch curve across seeds, and each member's thin curve.

    Args:
      settings: label (e.g. 'lr=0.0001') -> {'members': one per-epoch sequence per seed (fractions,
        None for missing; members may differ in length), 'mean': (E,), 'std': (E,)}.
      path: the PNG to write.
      ylabel: the y axis label; values are drawn x 100.

    Returns:
      ``path``.
    """
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    colours = [f"C{i % 10}" for i in range(len(settings))]
    for colour, (label, s) in zip(colours, settings.items()):
        for curve in s["members"]:
            y = 100 * np.asarray([np.nan if v is None else v for v in curve], dtype=float)
            ax.plot(np.arange(1, len(y) + 1), y, color=colour, lw=0.7, alpha=0.35)
        mean, std = 100 * np.asarray(s["mean"], dtype=float), 100 * np.asarray(s["std"], dtype=float)
        epochs = np.arange(1, len(mean) + 1)
        ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.2, lw=0)
        ax.plot(
            epochs,
            mean,
            color=colour,
            lw=2,
            marker="o",
            ms=3,
            label=f"{label} (mean ± std of {len(s['members'])} seeds)",
        )
    ax.set(xlabel="epoch", ylabel=ylabel, title="sweep: mean ± std across seeds, thin lines per seed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


__all__ = ["plot_alignment", "plot_confusion", "plot_curves", "plot_precision_recall", "plot_sweep", "precision_recall"]
