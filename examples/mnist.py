"""MNIST by DFA and BP from the same initial weights, on either backend; writes the report's figures.

    python examples/mnist.py --backend jax --epochs 10               # full training set
    python examples/mnist.py --limit 2000 --epochs 2 --out runs/demo  # a quick look

What ``dfa compare`` does, as library calls: a ``RunConfig`` with the report's network
784-200-10 tanh/sigmoid, batch 200, SGD on summed updates, handed to
``dfa_train.run.compare``. MNIST comes from --data-dir, else $DFA_DATA_DIR, else the
user cache, else a download.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from dfa_train.config import RunConfig
from dfa_train.run import compare
from dfa_train.tables import comparison_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("torch", "jax"), default="torch")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None, help="use the first N training (and N//5 test) samples")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    config = RunConfig(
        backend=args.backend,
        dataset="mnist",
        data_dir=args.data_dir,
        layers=(784, args.hidden, 10),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=200,
        limit_train=args.limit,
        limit_test=max(args.limit // 5, 1) if args.limit else None,
    )
    out = args.out or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-mnist-example")
    results = compare(config, out, progress=sys.stderr.isatty())
    print(comparison_table({label: r.metrics for label, r in results.items()}), end="")
    print(f"comparison folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
