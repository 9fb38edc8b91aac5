"""MLPSpec / OptimizerSpec validation and the seeded NumPy initialisers."""

import numpy as np
import pytest

from dfa_core import MLPSpec, OptimizerSpec, init_feedback, init_params


def test_spec_is_frozen_hashable_and_normalised():
    """Specs key compiled functions, so equal specs must hash equal and be immutable."""
    a = MLPSpec([784, 200, 10])
    b = MLPSpec((784, 200, 10), "tanh", "sigmoid", "sum", "float32")
    assert a == b and hash(a) == hash(b) and a.layer_sizes == (784, 200, 10)
    with pytest.raises(Exception):
        a.activation = "relu"
    assert a.param_shapes == (((200, 784), (200,)), ((10, 200), (10,)))
    assert a.feedback_shapes == ((200, 10),)
    assert a.num_params() == 784 * 200 + 200 + 200 * 10 + 10


@pytest.mark.parametrize(
    "kwargs,error,fragment",
    [
        (dict(layer_sizes=(10,)), ValueError, "at least 2 entries"),
        (dict(layer_sizes=()), ValueError, "at least 2 entries"),
        (dict(layer_sizes=(10, 0, 3)), ValueError, "layer_sizes[1] must be positive, got 0"),
        (dict(layer_sizes=(10, -2)), ValueError, "must be positive"),
        (dict(layer_sizes=(10, 2.5)), TypeError, "must be an int"),
        (dict(layer_sizes=(10, True)), TypeError, "must be an int"),
        (dict(layer_sizes="784,10"), TypeError, "sequence of ints"),
        (dict(layer_sizes=(4, 2), activation="gelu"), ValueError, "activation must be one of"),
        (dict(layer_sizes=(4, 2), output="tanh"), ValueError, "output must be one of"),
        (dict(layer_sizes=(4, 2), reduction="max"), ValueError, "reduction must be one of"),
        (dict(layer_sizes=(4, 2), dtype="float16"), ValueError, "dtype must be one of"),
    ],
)
def test_spec_rejects_bad_fields_with_a_message(kwargs, error, fragment):
    """Each bad field names what was expected and what arrived."""
    with pytest.raises(error) as info:
        MLPSpec(**kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(name="rmsprop"), "optimizer name must be one of"),
        (dict(learning_rate=0.0), "learning_rate must be > 0"),
        (dict(learning_rate=float("nan")), "must be finite"),
        (dict(momentum=1.0), "momentum must be in [0, 1)"),
        (dict(b2=-0.1), "b2 must be in [0, 1)"),
        (dict(eps=0.0), "eps must be > 0"),
        (dict(weight_decay=-1e-4), "weight_decay must be >= 0"),
    ],
)
def test_optimizer_spec_rejects_bad_fields(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        OptimizerSpec(**kwargs)
    assert fragment in str(info.value)


def test_weight_decay_is_recorded_only_when_set():
    assert "weight_decay" not in OptimizerSpec("adam", 1e-3).to_dict()
    assert OptimizerSpec("sgd", 0.1, weight_decay=1e-3).to_dict() == {
        "name": "sgd",
        "learning_rate": 0.1,
        "weight_decay": 1e-3,
    }


def test_init_params_draws_torch_linear_default_distribution():
    """W_l, b_l ~ U(-1/sqrt(n_in), 1/sqrt(n_in)), same seed -> same arrays, spec dtype."""
    spec = MLPSpec((400, 300, 10), dtype="float64")
    params = init_params(spec, seed=3)
    for (w, b), n_in in zip(params, (400, 300)):
        bound = 1 / np.sqrt(n_in)
        assert w.dtype == np.float64 and np.all(np.abs(w) <= bound) and np.all(np.abs(b) <= bound)
        # Uniform on [-c, c] has std c/sqrt(3): checks the width, not only the bound.
        np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.02)
    again = init_params(spec, seed=3)
    assert all(np.array_equal(p, q) for pair, qair in zip(params, again) for p, q in zip(pair, qair))
    assert not np.array_equal(params[0][0], init_params(spec, seed=4)[0][0])
    zeros = init_params(MLPSpec((5, 3)), init="zeros")
    assert zeros[0][0].dtype == np.float32 and not zeros[0][0].any()


def test_init_feedback_default_is_normal_with_std_1_9():
    """The report's B_l ~ N(0, 1.9^2), one per hidden layer, shape (n_l, n_L)."""
    spec = MLPSpec((20, 300, 200, 10))
    fb = init_feedback(spec, seed=1)
    assert [b.shape for b in fb] == [(300, 10), (200, 10)] and fb[0].dtype == np.float32
    np.testing.assert_allclose(np.concatenate([b.ravel() for b in fb]).std(), 1.9, rtol=0.03)
    assert init_feedback(MLPSpec((5, 3)), seed=1) == ()


def test_init_feedback_options():
    spec = MLPSpec((4, 6, 3), dtype="float64")
    uni = init_feedback(spec, seed=2, dist="uniform", scale=0.5)[0]
    assert np.all(np.abs(uni) <= 0.5) and uni.std() > 0.2
    doubled = init_feedback(spec, seed=2, transform=lambda m: 2 * m)[0]
    np.testing.assert_allclose(doubled, 2 * init_feedback(spec, seed=2)[0])
    mine = np.arange(18.0).reshape(6, 3)
    got = init_feedback(spec, matrices=[mine])[0]
    got[0, 0] = -1.0
    assert mine[0, 0] == 0.0, "user matrices must be copied, not aliased"


@pytest.mark.parametrize(
    "kwargs,error,fragment",
    [
        (dict(dist="cauchy"), ValueError, "dist must be one of"),
        (dict(scale=0), ValueError, "scale must be a finite number > 0"),
        (dict(matrices=[np.ones((6, 3)), np.ones((6, 3))]), ValueError, "expected 1 feedback matrices"),
        (dict(matrices=[np.ones((3, 6))]), ValueError, "B_1 must have shape (6, 3), got (3, 6)"),
        (dict(matrices=[np.full((6, 3), np.nan)]), ValueError, "non-finite"),
        (dict(transform=lambda m: m[:2]), ValueError, "transform returned shape (2, 3)"),
        (dict(transform="double"), TypeError, "transform must be callable"),
        (dict(seed=-1), TypeError, "seed must be a non-negative int"),
    ],
)
def test_init_feedback_rejects_bad_options(kwargs, error, fragment):
    with pytest.raises(error) as info:
        init_feedback(MLPSpec((4, 6, 3)), **kwargs)
    assert fragment in str(info.value)
