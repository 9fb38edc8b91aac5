"""dfa_train.trainer.fit: one loop for both backends, same batches, same float64 history."""

import json

import numpy as np
import pytest

import dfa_torch
from dfa_core import MLPSpec, OptimizerSpec, init_feedback, init_params
from dfa_train.trainer import History, confusion_matrix, fit, labels_of

SPEC64 = MLPSpec((8, 12, 10, 3), activation="tanh", output="sigmoid", dtype="float64")


def _data(n, seed=0):
    """Three classes set by the signs of a few input sums: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    label = (x[:, :3].sum(axis=1) > 0).astype(int) + (x[:, 3] > 0.5)
    return x, np.eye(3)[label]


X, Y = _data(130)
X_TRAIN, Y_TRAIN, X_TEST, Y_TEST = X[:100], Y[:100], X[100:], Y[100:]

# (method, mode, optimizer, batch_size); batch 32 over 100 samples leaves a last batch of 4
# (one more JAX compilation, so only one case has it).
PARITY_CASES = {
    "dfa_sample_sgd_ragged": ("dfa", "sample", OptimizerSpec("sgd", 0.02), 32),
    "dfa_batch_mean_momentum": ("dfa", "batch_mean", OptimizerSpec("momentum", 0.05), 25),
    "dfa_class_mean_adam": ("dfa", "class_mean", OptimizerSpec("adam", 1e-2), 25),
    "bp_sample_sgd": ("bp", "sample", OptimizerSpec("sgd", 0.02), 25),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_torch_and_jax_give_the_same_float64_history(case):
    """In float64 both backends see the same batches and record the same history:
    losses and angles within rtol 1e-8, identical error counts, equal final params."""
    method, mode, opt, batch_size = PARITY_CASES[case]
    kwargs = dict(
        x_test=X_TEST,
        y_test=Y_TEST,
        method=method,
        mode=mode,
        optimizer=opt,
        epochs=3,
        batch_size=batch_size,
        seed=4,
        align_every=2,
    )
    h_torch = fit("torch", SPEC64, X_TRAIN, Y_TRAIN, **kwargs)
    h_jax = fit("jax", SPEC64, X_TRAIN, Y_TRAIN, **kwargs)
    np.testing.assert_allclose(h_torch.loss, h_jax.loss, rtol=1e-8)
    assert h_torch.train_error == h_jax.train_error
    assert h_torch.test_accuracy == h_jax.test_accuracy
    np.testing.assert_array_equal(h_torch.confusion, h_jax.confusion)
    for (w, b), (w_ref, b_ref) in zip(h_torch.params, h_jax.params):
        np.testing.assert_allclose(w, w_ref, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(b, b_ref, rtol=1e-8, atol=1e-12)
    assert [r.step for r in h_torch.alignment] == [r.step for r in h_jax.alignment] == list(range(0, 12, 2))
    for r_t, r_j in zip(h_torch.alignment, h_jax.alignment):
        np.testing.assert_allclose(r_t.weights, r_j.weights, rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(r_t.deltas, r_j.deltas, rtol=1e-8, atol=1e-9)
    assert len(h_torch.loss) == len(h_torch.time_s) == len(h_torch.test_accuracy) == 3


def test_fit_is_train_step_over_numpy_ordered_batches():
    """fit's updates are SGD on dfa_grads over the batches rng.permutation(N) per epoch
    (rng = default_rng(seed)), so a hand-written loop reproduces its params and losses."""
    opt = OptimizerSpec("sgd", 0.02)
    h = fit(
        "torch", SPEC64, X_TRAIN, Y_TRAIN, optimizer=opt, epochs=2, batch_size=32, seed=9, param_seed=3, feedback_seed=5
    )
    params, feedback = init_params(SPEC64, 3), init_feedback(SPEC64, 5)
    rng = np.random.default_rng(9)
    for epoch in range(2):
        perm = rng.permutation(100)
        loss = 0.0
        for start in range(0, 100, 32):
            idx = perm[start : start + 32]
            xb, yb = dfa_torch.asarray((X_TRAIN[idx], Y_TRAIN[idx]))
            loss += float(dfa_torch.loss(SPEC64, dfa_torch.asarray(params), xb, yb))
            grads = dfa_torch.to_numpy(dfa_torch.dfa_grads(SPEC64, params, feedback, X_TRAIN[idx], Y_TRAIN[idx]))
            params = tuple((w - 0.02 * gw, b - 0.02 * gb) for (w, b), (gw, gb) in zip(params, grads))
        assert h.loss[epoch] == pytest.approx(loss / 100, rel=1e-12)
    for (w, b), (w_ref, b_ref) in zip(h.params, params):
        np.testing.assert_allclose(w, w_ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(b, b_ref, rtol=1e-12, atol=1e-14)
    y_hat = dfa_torch.forward(SPEC64, dfa_torch.asarray(params), dfa_torch.asarray(X_TRAIN))
    pred = labels_of(dfa_torch.to_numpy(y_hat))
    assert h.train_error[-1] == np.mean(pred != labels_of(Y_TRAIN))
    np.testing.assert_array_equal(h.confusion, confusion_matrix(labels_of(Y_TRAIN), pred, 3))
    assert h.confusion_split == "train" and h.test_accuracy == () and h.alignment == ()


def test_tol_and_patience_stop_early():
    """tol compares epochs from the second on; patience needs that many epochs in a row."""
    kwargs = dict(optimizer=OptimizerSpec("sgd", 1e-300), epochs=6, batch_size=50)  # nothing moves
    h = fit("torch", SPEC64, X_TRAIN, Y_TRAIN, tol=0.0, **kwargs)
    assert h.epochs_run == 2 and h.stopped_early
    h = fit("torch", SPEC64, X_TRAIN, Y_TRAIN, tol=0.0, patience=3, **kwargs)
    assert h.epochs_run == 4 and h.stopped_early
    h = fit("torch", SPEC64, X_TRAIN, Y_TRAIN, tol=None, **kwargs)
    assert h.epochs_run == 6 and not h.stopped_early


def test_history_to_json_is_strict_json():
    """to_json gives strict JSON (NaN angles become null) with every recorded field."""
    spec = MLPSpec((8, 6, 3), dtype="float64")
    zero = tuple((np.zeros_like(w), np.zeros_like(b)) for w, b in init_params(spec))
    # From zero weights BP's hidden gradient is exactly 0, so its angle is undefined (NaN).
    h = fit("torch", spec, X_TRAIN, Y_TRAIN, params=zero, epochs=1, batch_size=100, align_every=1)
    assert np.isnan(h.alignment[0].weights[0])
    d = json.loads(h.to_json())
    assert d["alignment"][0]["weights"][0] is None
    assert set(d) >= {"loss", "train_error", "test_accuracy", "time_s", "confusion", "alignment", "config"}
    assert d["config"]["layer_sizes"] == [8, 6, 3] and d["config"]["backend"] == "dfa_torch"
    assert isinstance(h, History) and h.to_dict()["epochs_run"] == 1


def test_xor_by_dfa_on_both_backends():
    """XOR (one sigmoid output, labels y > 0.5) is learned by DFA on torch and JAX alike."""
    from dfa_train.data import xor_dataset

    spec = MLPSpec((2, 8, 1), dtype="float64")
    x, y = xor_dataset("float64")
    for backend in ("torch", "jax"):
        h = fit(
            backend,
            spec,
            x,
            y,
            optimizer=OptimizerSpec("sgd", 0.5),
            epochs=300,
            batch_size=4,
            seed=0,
            param_seed=0,
            feedback_seed=1,
        )
        assert h.train_error[-1] == 0.0, backend
        np.testing.assert_array_equal(h.confusion, [[2, 0], [0, 2]])


BAD_FITS = {
    "backend_name": (dict(backend="numpy"), ValueError, "unknown backend"),
    "backend_type": (dict(backend=3), TypeError, "backend must be"),
    "method": (dict(method="hebb"), ValueError, "method must be one of"),
    "mode": (dict(mode="mean"), ValueError, "mode must be one of"),
    "bp_with_grouping": (dict(method="bp", mode="batch_mean"), ValueError, "no grouping mode"),
    "optimizer": (dict(optimizer="sgd"), TypeError, "OptimizerSpec"),
    "epochs": (dict(epochs=0), ValueError, "epochs must be >= 1"),
    "batch_size": (dict(batch_size=1.5), TypeError, "batch_size must be an int"),
    "tol": (dict(tol=-0.1), ValueError, "tol must be"),
    "x_width": (dict(x_train=X_TRAIN[:, :5]), ValueError, r"training data: x must have shape \(batch, 8\)"),
    "y_rows": (dict(y_train=Y_TRAIN[:-1]), ValueError, "training data: y must have shape"),
    "x_nan": (dict(x_train=np.full_like(X_TRAIN, np.nan)), ValueError, "non-finite"),
    "class_mean_soft_labels": (dict(mode="class_mean", y_train=Y_TRAIN * 0.5), ValueError, "one-hot"),
    "test_without_labels": (dict(x_test=X_TEST), ValueError, "together"),
    "test_width": (dict(x_test=X_TEST[:, :2], y_test=Y_TEST), ValueError, "test data: x must have shape"),
    "feedback_shape": (dict(feedback=[np.zeros((12, 3)), np.zeros((9, 3))]), ValueError, r"B_2 must have shape"),
    "params_dtype": (dict(params=init_params(MLPSpec((8, 12, 10, 3)))), TypeError, "float64"),
}


@pytest.mark.parametrize("case", list(BAD_FITS))
def test_fit_rejects_bad_arguments_before_training(case):
    """Bad backends, options and datasets raise errors naming what was expected."""
    overrides, error, match = BAD_FITS[case]
    kwargs = dict(backend="torch", spec=SPEC64, x_train=X_TRAIN, y_train=Y_TRAIN, epochs=1)
    kwargs.update(overrides)
    with pytest.raises(error, match=match):
        fit(kwargs.pop("backend"), kwargs.pop("spec"), kwargs.pop("x_train"), kwargs.pop("y_train"), **kwargs)
