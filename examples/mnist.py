"""MNIST by DFA and BP from the same initial weights, on either backend; writes the report's figures.

    python examples/mnist.py --backend jax --epochs 10               # full training set
    python examples/mnist.py --limit 2000 --epochs 2 --out runs/demo  # a quick look

The same as ``dfa compare`` (it calls it), with the report's network 784-200-10
tanh/sigmoid, batch 200, SGD on summed updates. MNIST comes from --data-dir, else
$DFA_DATA_DIR, else the user cache, else a download.
"""

from __future__ import annotations

import argparse
import sys

from dfa_train import cli


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
    argv = ["compare", "--backend", args.backend, "--dataset", "mnist", "--layers", f"784,{args.hidden},10",
            "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size", "200"]
    if args.limit:
        argv += ["--limit-train", str(args.limit), "--limit-test", str(max(args.limit // 5, 1))]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.out:
        argv += ["--out", args.out]
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
