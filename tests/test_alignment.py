"""Angles between DFA updates and BP gradients (dfa_torch.alignment, dfa_jax.alignment)."""

import numpy as np
import pytest
from dfa_test_data import mnist

import dfa_jax
import dfa_jax.alignment
import dfa_torch
import dfa_torch.alignment
from dfa_core import MODES, MLPSpec, OptimizerSpec, init_feedback, init_params
from dfa_train.trainer import fit

BACKENDS = {"torch": dfa_torch.alignment, "jax": dfa_jax.alignment}
SPEC = MLPSpec((6, 5, 4, 3), dtype="float64")


def _batch(n=9, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, SPEC.n_in)), np.eye(SPEC.n_out)[rng.integers(0, SPEC.n_out, n)]


def _angles(backend, mode, spec=SPEC, seed=0):
    x, y = _batch(seed=seed)
    angles = BACKENDS[backend].alignment_angles(spec, init_params(spec, 0), init_feedback(spec, 1), x, y, mode)
    to_numpy = dfa_torch.to_numpy if backend == "torch" else dfa_jax.to_numpy
    return tuple(to_numpy(tuple(angles)))


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("mode", MODES)
def test_angles_are_in_range_and_output_layer_is_aligned(backend, mode):
    """Hidden angles lie in [0, 180]; the output delta angle is ~0 in every mode and the
    output weight angle ~0 in 'sample' mode (DFA's output layer is exact there)."""
    weights, deltas = _angles(backend, mode)
    assert weights.shape == deltas.shape == (SPEC.num_layers,)
    assert np.all((weights >= 0) & (weights <= 180)) and np.all((deltas >= 0) & (deltas <= 180))
    assert deltas[-1] < 1e-6
    if mode == "sample":
        assert weights[-1] < 1e-6
    else:
        assert weights[-1] > 1e-3  # grouping changes the output update: not BP's


@pytest.mark.parametrize("mode", MODES)
def test_torch_and_jax_angles_agree(mode):
    """Both backends give the same angles in float64."""
    t, j = _angles("torch", mode), _angles("jax", mode)
    np.testing.assert_allclose(t[0], j[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(t[1], j[1], rtol=1e-9, atol=1e-9)


def test_bp_deltas_match_the_backprop_gradient():
    """Where DFA's feedback equals the forward weights (one hidden layer, B_1 = W_2^T), its
    hidden delta is BP's: every angle is ~0, which checks the BP side of the comparison."""
    spec = MLPSpec((6, 5, 3), dtype="float64")
    params = init_params(spec, 0)
    x, y = _batch()
    for module in BACKENDS.values():
        angles = module.alignment_angles(spec, params, (params[1][0].T.copy(),), x, y, "sample")
        assert np.all(np.asarray(angles.weights) < 1e-5) and np.all(np.asarray(angles.deltas) < 1e-5)


def test_jax_alignment_compiles_once_per_spec_and_mode():
    """Repeated calls with new values reuse the compiled function."""
    spec = MLPSpec((6, 7, 3), dtype="float64")
    before = dfa_jax.TRACE_COUNTS["alignment_angles"]
    for seed in range(3):
        _angles("jax", "class_mean", spec=spec, seed=seed)
    assert dfa_jax.TRACE_COUNTS["alignment_angles"] == before + 1


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_alignment_rejects_bad_inputs(backend):
    """Shapes and modes are checked before any compute."""
    x, y = _batch()
    module = BACKENDS[backend]
    with pytest.raises(ValueError, match="mode must be one of"):
        module.alignment_angles(SPEC, init_params(SPEC), init_feedback(SPEC), x, y, "per_class")
    with pytest.raises(ValueError, match="feedback: expected 2 matrices"):
        module.alignment_angles(SPEC, init_params(SPEC), (), x, y, "sample")
    with pytest.raises(ValueError, match="y must have shape"):
        module.alignment_angles(SPEC, init_params(SPEC), init_feedback(SPEC), x, y[:, :2], "sample")


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_dfa_aligns_with_bp_after_a_short_mnist_run(backend):
    """784-100-10 trained by DFA on 2000 MNIST samples for 3 epochs: the hidden layer's update
    and delta point within 90 degrees of BP's (they start near 90), and accuracy beats chance."""
    data = mnist()
    spec = MLPSpec((784, 100, 10), activation="tanh", output="sigmoid")
    h = fit(
        backend,
        spec,
        data.x_train[:2000],
        data.y_train[:2000],
        x_test=data.x_test[:1000],
        y_test=data.y_test[:1000],
        optimizer=OptimizerSpec("sgd", 1e-3),
        epochs=3,
        batch_size=100,
        align_every=10,
    )
    first, last = h.alignment[0], h.alignment[-1]
    assert last.step == 50
    assert last.weights[0] < 80 and last.deltas[0] < 80
    assert last.weights[0] < first.weights[0]
    assert last.weights[1] < 1e-2 and last.deltas[1] < 1e-2  # output layer, float32
    assert h.test_accuracy[-1] > 0.7
