"""Shared fixtures of the parity tests: cases, tolerances, comparisons."""

from __future__ import annotations

import numpy as np

from dfa_core import MLPSpec, get_backend, init_feedback, init_params

BACKENDS = ("torch", "jax")

DEPTHS = {  # number of hidden layers -> layer sizes (4 classes)
    0: (6, 4),
    1: (6, 5, 4),
    3: (6, 5, 7, 3, 4),
}

# (rtol, atol) per dtype: float64 compares exact math; float32 is what users run.
TOLERANCES = {"float64": (1e-10, 1e-12), "float32": (1e-5, 1e-6)}

# Labels with a class (2) absent, so 'class_mean' has an empty group.
LABELS = np.array([0, 0, 1, 1, 1, 3, 3, 0, 1])


def make_case(depth, activation="tanh", output="sigmoid", reduction="sum", dtype="float64", seed=0):
    """A spec with its NumPy params, feedback, x (9, 6) and one-hot y (9, 4)."""
    spec = MLPSpec(DEPTHS[depth], activation=activation, output=output, reduction=reduction, dtype=dtype)
    rng = np.random.default_rng(100 + seed)
    x = rng.normal(size=(len(LABELS), spec.n_in)).astype(dtype)
    y = np.eye(spec.n_out, dtype=dtype)[LABELS]
    return spec, init_params(spec, seed=seed), init_feedback(spec, seed=seed + 1), x, y


def assert_tree_close(actual, expected, rtol, atol, what=""):
    """Compares nested tuples/lists of arrays leaf by leaf, naming the failing leaf."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)), f"{what}: expected a sequence, got {type(actual).__name__}"
        assert len(actual) == len(expected), f"{what}: {len(actual)} leaves, expected {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_tree_close(a, e, rtol, atol, f"{what}[{i}]")
        return
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=rtol, atol=atol, err_msg=what)


def backend(name):
    return get_backend(name)
