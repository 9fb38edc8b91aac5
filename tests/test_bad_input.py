"""Bad input raises a clear ValueError/TypeError before any tracing; caller's arrays are untouched."""

import numpy as np
import pytest

from dfa_core import MLPSpec, OptimizerSpec, get_backend, init_feedback, init_params

BACKENDS = ("torch", "jax")
SPEC = MLPSpec((6, 5, 4, 3), dtype="float32")


def _good():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6)).astype("float32")
    y = np.eye(3, dtype="float32")[[0, 1, 2, 0, 1, 2, 0, 1]]
    return list(init_params(SPEC, 0)), list(init_feedback(SPEC, 1)), x, y


def _case(kind):
    params, feedback, x, y = _good()
    mode = "sample"
    if kind == "x_wrong_width":
        x = x[:, :5]
    elif kind == "x_rank_1":
        x = x[0]
    elif kind == "x_empty_batch":
        x, y = x[:0], y[:0]
    elif kind == "y_wrong_batch":
        y = y[:7]
    elif kind == "y_wrong_classes":
        y = np.zeros((8, 4), "float32")
    elif kind == "params_missing_layer":
        params = params[:2]
    elif kind == "params_wrong_shape":
        params[1] = (params[1][0].T, params[1][1])
    elif kind == "params_wrong_dtype":
        params[0] = (params[0][0].astype("float64"), params[0][1])
    elif kind == "feedback_missing":
        feedback = feedback[:1]
    elif kind == "feedback_wrong_shape":
        feedback[0] = feedback[0][:, :2]
    elif kind == "unknown_mode":
        mode = "per_class"
    elif kind == "x_nan":
        x[2, 3] = np.nan
    elif kind == "y_inf":
        y[1, 0] = np.inf
    elif kind == "y_not_one_hot_for_class_mean":
        y[0] = [0.5, 0.5, 0.0]
        mode = "class_mean"
    elif kind == "x_complex":
        x = x.astype("complex64")
    return params, feedback, x, y, mode


CASES = {
    "x_wrong_width": (ValueError, "x must have shape (batch, 6)"),
    "x_rank_1": (ValueError, "x must have shape (batch, 6)"),
    "x_empty_batch": (ValueError, "batch >= 1"),
    "y_wrong_batch": (ValueError, "y must have shape (batch, n_L) = (8, 3)"),
    "y_wrong_classes": (ValueError, "got (8, 4)"),
    "params_missing_layer": (ValueError, "expected 3 (W, b) pairs"),
    "params_wrong_shape": (ValueError, "W_2 must have shape (4, 5), got (5, 4)"),
    "params_wrong_dtype": (TypeError, "W_1 must have dtype float32 (spec.dtype), got float64"),
    "feedback_missing": (ValueError, "expected 2 matrices"),
    "feedback_wrong_shape": (ValueError, "B_1 must have shape (5, 3)"),
    "unknown_mode": (ValueError, "mode must be one of ['sample', 'batch_mean', 'class_mean'], got 'per_class'"),
    "x_nan": (ValueError, "x has non-finite values"),
    "y_inf": (ValueError, "y has non-finite values"),
    "y_not_one_hot_for_class_mean": (ValueError, "y must be one-hot"),
    "x_complex": (TypeError, "x must have a real numeric dtype, got complex64"),
}


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("kind", list(CASES))
def test_dfa_grads_rejects_bad_input_before_tracing(name, kind):
    """The error names expected vs got, and nothing was traced or compiled."""
    be = get_backend(name)
    params, feedback, x, y, mode = _case(kind)
    error, fragment = CASES[kind]
    before = dict(be.TRACE_COUNTS)
    with pytest.raises(error) as info:
        be.dfa_grads(SPEC, params, feedback, x, y, mode=mode)
    assert fragment in str(info.value)
    assert dict(be.TRACE_COUNTS) == before


@pytest.mark.parametrize("name", BACKENDS)
def test_bp_grads_and_train_step_reject_bad_arguments(name):
    be = get_backend(name)
    params, _, x, y = _good()
    with pytest.raises(ValueError, match="x must have shape"):
        be.bp_grads(SPEC, params, x[:, :2], y)
    with pytest.raises(TypeError, match="spec must be a dfa_core.MLPSpec"):
        be.bp_grads((6, 5, 4, 3), params, x, y)
    opt = OptimizerSpec("sgd", learning_rate=0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        be.train_step(SPEC, opt, "hebbian", "sample")
    with pytest.raises(ValueError, match="method 'bp' has no grouping mode"):
        be.train_step(SPEC, opt, "bp", "class_mean")
    with pytest.raises(TypeError, match="opt must be a dfa_core.OptimizerSpec"):
        be.train_step(SPEC, "sgd", "dfa", "sample")


@pytest.mark.parametrize("name", BACKENDS)
def test_callers_arrays_are_never_modified(name):
    """dfa_grads, bp_grads, asarray and a (non-donating) train_step leave the inputs as they were."""
    be = get_backend(name)
    params, feedback, x, y = _good()
    snapshot = [a.copy() for pair in params for a in pair] + [b.copy() for b in feedback] + [x.copy(), y.copy()]
    be.dfa_grads(SPEC, params, feedback, x, y, mode="class_mean")
    be.bp_grads(SPEC, params, x, y)
    P, F = be.asarray(params), be.asarray(feedback)
    P_before = be.to_numpy(P)
    opt = OptimizerSpec("adam", learning_rate=0.1)
    new, _, _ = be.train_step(SPEC, opt)(P, F, be.make_optimizer(opt).init(P), be.asarray(x), be.asarray(y))
    after = [a for pair in params for a in pair] + list(feedback) + [x, y]
    assert all(np.array_equal(s, a) for s, a in zip(snapshot, after))
    for (w0, b0), (w1, b1) in zip(P_before, be.to_numpy(P)):
        assert np.array_equal(w0, w1) and np.array_equal(b0, b1)
    assert not np.array_equal(be.to_numpy(new)[0][0], P_before[0][0])
    if name == "torch":  # BP's autodiff must not leave autograd state on the caller's tensors
        be.bp_grads(SPEC, P, x, y)
        be.train_step(SPEC, opt, "bp")(P, F, be.make_optimizer(opt).init(P), be.asarray(x), be.asarray(y))
        assert all(not t.requires_grad and t.grad is None for pair in P for t in pair)


@pytest.mark.parametrize("name", BACKENDS)
def test_accepts_numpy_and_native_arrays_alike(name):
    """NumPy inputs (any real dtype, lists of pairs) and native arrays give the same gradients."""
    be = get_backend(name)
    params, feedback, x, y = _good()
    from_numpy = be.to_numpy(be.dfa_grads(SPEC, params, feedback, x.astype("float64"), y.astype("int64")))
    native = be.to_numpy(be.dfa_grads(SPEC, be.asarray(params), be.asarray(feedback), be.asarray(x), be.asarray(y)))
    for (a, b), (c, d) in zip(from_numpy, native):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
