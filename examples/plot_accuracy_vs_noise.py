"""Plot final test accuracy against projection noise from `dfa train` run folders.

    python examples/plot_accuracy_vs_noise.py OUT.png exact=runs/dfa 0.1=runs/noise_0.1 0.3=runs/noise_0.3 ...

Each argument after the output file is LABEL=RUN_DIR; a numeric label is the noise level sigma
(as a multiple of max|e|) and goes on the x axis, ``exact`` is drawn as sigma 0, any other label
(for example ``ternary``) as a horizontal reference line. Reads each folder's metrics.json.
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _accuracy(run_dir: str) -> float:
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        return float(json.load(fh)["test_accuracy"])


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    points, lines = [], []
    for arg in argv[1:]:
        label, run_dir = arg.split("=", 1)
        acc = 100 * _accuracy(run_dir)
        if label == "exact":
            points.append((0.0, acc))
        else:
            try:
                points.append((float(label), acc))
            except ValueError:
                lines.append((label, acc))
    points.sort()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="DFA, additive noise")
    for (label, acc), style in zip(lines, ("--", ":", "-.")):
        ax.axhline(acc, linestyle=style, color="gray", label=f"DFA, {label}")
    ax.set_xlabel("noise sigma (x max|e| per layer)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(argv[0], dpi=120)
    print(f"wrote {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
