"""Quickstart: the pinned API on both backends, then XOR solved by DFA with each backend.

python examples/quickstart.py
"""

import time

import numpy as np

from dfa_core import MLPSpec, OptimizerSpec, get_backend, init_feedback, init_params


def gradients_agree():
    """One MNIST-sized batch: DFA and BP gradients from torch and JAX, compared."""
    spec = MLPSpec(layer_sizes=(784, 200, 10), activation="tanh", output="sigmoid", reduction="sum", dtype="float32")
    params, feedback = init_params(spec, seed=0), init_feedback(spec, seed=1)
    rng = np.random.default_rng(0)
    x = rng.random((200, 784), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 200)]
    grads = {}
    for name in ("torch", "jax"):
        be = get_backend(name)
        P, F = be.asarray(params), be.asarray(feedback)
        grads[name] = (
            be.to_numpy(be.dfa_grads(spec, P, F, x, y, mode="sample")),
            be.to_numpy(be.bp_grads(spec, P, x, y)),
        )
    for i, method in enumerate(("DFA", "BP")):
        diff = max(
            np.abs(a - b).max() / np.abs(b).max()
            for la, lb in zip(grads["torch"][i], grads["jax"][i])
            for a, b in zip(la, lb)
        )
        print(f"{method} gradients, torch vs JAX, 784-200-10 batch 200 float32: max relative difference {diff:.1e}")
    out_dfa, out_bp = grads["jax"][0][-1][0], grads["jax"][1][-1][0]
    rel = np.abs(out_dfa - out_bp).max() / np.abs(out_bp).max()
    print(f"output layer, sample mode: DFA == BP up to a relative {rel:.1e} (float32 rounding)")


def xor(backend_name, steps=3000):
    """2-4-1 tanh/sigmoid network trained by DFA with plain SGD on the four XOR points."""
    be = get_backend(backend_name)
    spec = MLPSpec((2, 4, 1), activation="tanh", output="sigmoid")
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
    y = np.array([[0], [1], [1], [0]], np.float32)
    opt = OptimizerSpec("sgd", learning_rate=0.5)
    P, F = be.asarray(init_params(spec, seed=0)), be.asarray(init_feedback(spec, seed=1))
    S = be.make_optimizer(opt, spec.dtype).init(P)
    step = be.train_step(spec, opt, method="dfa", mode="sample")
    X, Y = be.asarray(x), be.asarray(y)
    start = time.perf_counter()
    for _ in range(steps):
        P, S, loss = step(P, F, S, X, Y)
    y_hat = be.to_numpy(be.forward(spec, P, X))
    correct = int(((y_hat > 0.5) == (y > 0.5)).sum())
    print(
        f"XOR by DFA on {backend_name:5s}: {correct}/4 correct, loss {float(be.to_numpy(loss)):.4f}, "
        f"{steps} steps in {time.perf_counter() - start:.2f} s"
    )


if __name__ == "__main__":
    gradients_agree()
    for name in ("torch", "jax"):
        xor(name)
