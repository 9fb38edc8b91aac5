"""A pre-norm transformer block trained by DFA and by BP on a synthetic sequence task, on either backend.

Each sequence holds T = 8 tokens of width D = 16 (a fixed random embedding plus a position
vector): one marker A, one marker B, distractors elsewhere. The label says which marker comes
first (chance: 50%). The model is one TransformerBlock (one feedback point at its output,
backprop inside it), Flatten and Dense(2); ``be.train_step`` trains it.

python examples/sequence_transformer.py --backend jax --steps 300
"""

from __future__ import annotations

import argparse
from typing import Tuple

import numpy as np

from dfa_core import Dense, Flatten, ModelSpec, OptimizerSpec, get_backend, init_feedback, init_params
from dfa_core.model import TransformerBlock

T, D, VOCAB = 8, 16, 6  # tokens 0 and 1 are the markers A and B, 2..5 distractors

SPEC = ModelSpec((T, D), (TransformerBlock(heads=2, mlp_hidden=32), Flatten(), Dense(2)), "relu", "softmax", "mean")


def which_first(n: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """n sequences (n, T, D) float32 and one-hot labels (n, 2): [1, 0] when A comes before B."""
    table = np.random.default_rng(1234)  # the same embeddings and positions for every split
    embed_VxD = table.normal(size=(VOCAB, D))
    pos_TxD = 0.5 * table.normal(size=(T, D))
    rng = np.random.default_rng(seed)
    tokens_NxT = rng.integers(2, VOCAB, size=(n, T))
    order = np.argsort(rng.random((n, T)), axis=1)  # two distinct positions per sequence
    pos_a, pos_b = order[:, 0], order[:, 1]
    tokens_NxT[np.arange(n), pos_a] = 0
    tokens_NxT[np.arange(n), pos_b] = 1
    x = (embed_VxD[tokens_NxT] + pos_TxD[None]).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[(pos_b < pos_a).astype(int)]
    return x, y


def train(backend: str, method: str, steps: int = 300, batch: int = 64, lr: float = 3e-3, seed: int = 0) -> float:
    """Trains SPEC by ``method`` with Adam; returns the accuracy on 1,000 held-out sequences."""
    be = get_backend(backend)
    x, y = which_first(steps * batch, seed)
    x_test, y_test = which_first(1000, seed + 1)
    opt = OptimizerSpec("adam", learning_rate=lr)
    params = be.asarray(init_params(SPEC, seed=seed))
    feedback = be.asarray(init_feedback(SPEC, seed=seed + 1))
    state = be.make_optimizer(opt, SPEC.dtype).init(params)
    step = be.train_step(SPEC, opt, method=method)
    for i in range(steps):
        rows = slice(i * batch, (i + 1) * batch)
        params, state, _ = step(params, feedback, state, be.asarray(x[rows]), be.asarray(y[rows]))
    y_hat = np.asarray(be.to_numpy(be.forward(SPEC, params, x_test)))
    return float(np.mean(np.argmax(y_hat, axis=1) == np.argmax(y_test, axis=1)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("torch", "jax"), default="torch")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    for method in ("dfa", "bp"):
        acc = train(args.backend, method, args.steps)
        print(f"which-first by {method.upper()} on {args.backend}: test accuracy {acc:.3f} (chance 0.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
