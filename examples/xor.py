"""XOR by DFA (and BP for comparison) through dfa_train.trainer.fit, on either backend.

python examples/xor.py --backend jax --epochs 300
"""

from __future__ import annotations

import argparse

from dfa_core import MLPSpec, OptimizerSpec
from dfa_train.data import xor_dataset
from dfa_train.trainer import fit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("torch", "jax"), default="torch")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.5)
    args = parser.parse_args(argv)
    spec = MLPSpec((2, 8, 1), activation="tanh", output="sigmoid", dtype="float64")
    x, y = xor_dataset("float64")
    for method in ("dfa", "bp"):
        h = fit(
            args.backend,
            spec,
            x,
            y,
            method=method,
            optimizer=OptimizerSpec("sgd", args.lr),
            epochs=args.epochs,
            batch_size=4,
            seed=0,
            param_seed=0,
            feedback_seed=1,
        )
        correct = 4 - round(4 * h.train_error[-1])
        print(
            f"XOR by {method.upper()} on {args.backend}: {correct}/4 correct after {h.epochs_run} epochs, "
            f"loss {h.loss[-1]:.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
