"""train_epoch / predict_labels on both backends, and fit's compiled-epoch engine against its per-step one."""

import functools

import numpy as np
import pytest

from dfa_core import MLPSpec, OptimizerSpec, get_backend, init_feedback, init_params
from dfa_train.trainer import fit, labels_of

BACKENDS = ("torch", "jax")
SPEC64 = MLPSpec((8, 12, 10, 3), activation="tanh", output="sigmoid", dtype="float64")


def _data(n, seed=0):
    """Three classes set by the signs of a few input sums: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    label = (x[:, :3].sum(axis=1) > 0).astype(int) + (x[:, 3] > 0.5)
    return x, np.eye(3)[label]


X, Y = _data(130)
X_TRAIN, Y_TRAIN, X_TEST, Y_TEST = X[:100], Y[:100], X[100:], Y[100:]

OPTIMIZERS = {
    "sgd": OptimizerSpec("sgd", 0.02),
    "momentum": OptimizerSpec("momentum", 0.05),
    "nesterov": OptimizerSpec("momentum", 0.05, nesterov=True),
    "adam": OptimizerSpec("adam", 1e-2),
}
METHOD_MODES = (("dfa", "sample"), ("dfa", "batch_mean"), ("dfa", "class_mean"), ("bp", "sample"))
# Two Latin squares of (method, mode) x optimizer: every method and mode meets two optimizers and
# every optimizer two of them (the engines' loops do not depend on the pairing; the full product
# of 16 added compile time, not coverage). The first square runs with a ragged last batch and angles:
# 100 samples in batches of 32 leave a last batch of 4 (4 steps per epoch, 3 epochs);
# align_every=3 measures steps 0, 3 (a ragged batch), 6 and 9, align_every=2 steps 0, 2, ..., 10.
# The other cases use batches of 25 and no angles, which saves JAX compilations (each case
# compiles its own programs; compiling, not training, is what these tests spend time on).
RAGGED_ALIGNED = {"dfa-sample-sgd": 2, "dfa-batch_mean-nesterov": 2, "dfa-class_mean-adam": 3, "bp-sample-momentum": 2}
CASES = [*RAGGED_ALIGNED, "dfa-sample-adam", "dfa-batch_mean-momentum", "dfa-class_mean-sgd", "bp-sample-nesterov"]
assert {tuple(c.split("-")[:2]) for c in CASES} == set(METHOD_MODES) and {c.split("-")[2] for c in CASES} == set(
    OPTIMIZERS
)


@functools.lru_cache(maxsize=None)
def _fit(backend, engine, case, spec=SPEC64, donate=False):
    method, mode, opt = case.split("-")
    batch_size, align_every = (32, RAGGED_ALIGNED[case]) if case in RAGGED_ALIGNED else (25, 0)
    return fit(
        backend,
        spec,
        X_TRAIN,
        Y_TRAIN,
        x_test=X_TEST,
        y_test=Y_TEST,
        method=method,
        mode=mode,
        optimizer=OPTIMIZERS[opt],
        epochs=3,
        batch_size=batch_size,
        seed=4,
        align_every=align_every,
        eval_batch_size=40,
        donate=donate,
        engine=engine,
    )


def _assert_histories_close(h, ref, rtol):
    np.testing.assert_allclose(h.loss, ref.loss, rtol=rtol)
    assert h.train_error == ref.train_error
    assert h.test_accuracy == ref.test_accuracy
    np.testing.assert_array_equal(h.confusion, ref.confusion)
    for (w, b), (w_ref, b_ref) in zip(h.params, ref.params):
        np.testing.assert_allclose(w, w_ref, rtol=rtol, atol=1e-14)
        np.testing.assert_allclose(b, b_ref, rtol=rtol, atol=1e-14)
    assert [(r.step, r.epoch) for r in h.alignment] == [(r.step, r.epoch) for r in ref.alignment]
    for r, r_ref in zip(h.alignment, ref.alignment):
        np.testing.assert_allclose(r.weights, r_ref.weights, rtol=rtol, atol=1e-11)
        np.testing.assert_allclose(r.deltas, r_ref.deltas, rtol=rtol, atol=1e-11)
    same_config = lambda h: {k: v for k, v in h.config.items() if k != "backend"}
    assert same_config(h) == same_config(ref)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_engine_equals_step_engine(backend, case):
    """In float64 the compiled epoch records the per-step loop's history (rtol 1e-10): losses,
    errors, accuracies, params and angles (in the RAGGED_ALIGNED cases, with a ragged last batch)."""
    h_epoch, h_step = _fit(backend, "epoch", case), _fit(backend, "step", case)
    _assert_histories_close(h_epoch, h_step, rtol=1e-10)
    measured = list(range(0, 12, RAGGED_ALIGNED[case])) if case in RAGGED_ALIGNED else []
    assert [r.step for r in h_epoch.alignment] == measured
    assert h_epoch.epochs_run == 3


@pytest.mark.parametrize("case", CASES)
def test_epoch_engines_of_both_backends_agree(case):
    """torch's and JAX's epoch engines give the same float64 history (rtol 1e-10, same error counts)."""
    _assert_histories_close(_fit("torch", "epoch", case), _fit("jax", "epoch", case), rtol=1e-10)


def test_mean_reduction_with_a_ragged_batch():
    """With reduction 'mean' the ragged batch is averaged over its own 4 samples (no padding):
    on each backend the epoch engine equals the step engine, and the backends agree."""
    spec = MLPSpec((8, 12, 10, 3), reduction="mean", dtype="float64")
    case = "dfa-sample-sgd"
    for backend in BACKENDS:
        _assert_histories_close(_fit(backend, "epoch", case, spec), _fit(backend, "step", case, spec), rtol=1e-10)
    _assert_histories_close(_fit("torch", "epoch", case, spec), _fit("jax", "epoch", case, spec), rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_donated_epochs_give_the_same_history(backend):
    """donate=True (buffers reused on JAX, updates in place on torch) changes nothing."""
    h = _fit(backend, "epoch", "dfa-sample-momentum", donate=True)
    _assert_histories_close(h, _fit(backend, "epoch", "dfa-sample-momentum"), rtol=1e-12)


def test_on_batch_sees_every_step_in_both_engines():
    """The epoch engine calls on_batch(epoch, i, num_batches) for every batch, as the step engine does
    (trainer logic, the same for both backends)."""
    calls = {}
    for engine in ("epoch", "step"):
        calls[engine] = []
        fit(
            "torch",
            SPEC64,
            X_TRAIN,
            Y_TRAIN,
            epochs=2,
            batch_size=32,
            engine=engine,
            on_batch=lambda *a, seen=calls[engine]: seen.append(a),
        )
    assert calls["epoch"] == calls["step"] == [(e, i, 4) for e in range(2) for i in range(4)]


def _epoch_inputs(be, spec, opt, n=100):
    x, y = X_TRAIN[:n].astype(spec.dtype), Y_TRAIN[:n].astype(spec.dtype)
    with be.precision_scope(spec.dtype):
        params = be.asarray(init_params(spec, 0))
        return (
            params,
            be.asarray(init_feedback(spec, 1)),
            be.make_optimizer(opt, spec.dtype).init(params),
            *be.asarray((x, y)),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_epoch_is_train_steps_over_the_order(backend):
    """An epoch equals train_step over order[i*B:(i+1)*B] (ragged last batch at its own size);
    angle rows with (step0 + i) % align_every == 0 hold train_step(with_alignment=True)'s angles,
    measured before the update, and the other rows are NaN."""
    be, opt = get_backend(backend), OPTIMIZERS["adam"]
    order = np.random.default_rng(7).permutation(100).astype(np.int32)
    params, feedback, state, x, y = _epoch_inputs(be, SPEC64, opt)
    epoch = be.train_epoch(SPEC64, opt, "dfa", "class_mean", 32, align_every=3)
    p_epoch, _, losses, angles = epoch(params, feedback, state, x, y, order, 5)
    step = be.train_step(SPEC64, opt, "dfa", "class_mean", with_alignment=True)
    ref_losses, ref_angles = [], []
    with be.precision_scope("float64"):
        for start in range(0, 100, 32):
            xb, yb = be.asarray((X_TRAIN[order[start : start + 32]], Y_TRAIN[order[start : start + 32]]))
            params, state, batch_loss, a = step(params, feedback, state, xb, yb)
            ref_losses.append(be.to_numpy(batch_loss))
            ref_angles.append(np.stack(be.to_numpy(tuple(a))))
    np.testing.assert_allclose(be.to_numpy(losses), ref_losses, rtol=1e-12)
    for (w, b), (w_ref, b_ref) in zip(be.to_numpy(p_epoch), be.to_numpy(params)):
        np.testing.assert_allclose(w, w_ref, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(b, b_ref, rtol=1e-12, atol=1e-15)
    angles = be.to_numpy(angles)
    assert angles.shape == (4, 2, SPEC64.num_layers)
    assert np.isnan(angles[[0, 2, 3]]).all()  # steps 5, 7, 8 are not multiples of 3
    np.testing.assert_allclose(angles[1], ref_angles[1], rtol=1e-10)  # step 6
    assert be.train_epoch(SPEC64, opt, "dfa", "class_mean", 32)(*_epoch_inputs(be, SPEC64, opt), order, 0)[3] is None


def test_jax_epoch_is_traced_once_per_data_shape():
    """Further epochs with a new order and step0 reuse the compiled epoch; a new N traces once more."""
    import dfa_jax

    spec, opt = MLPSpec((8, 7, 3), dtype="float64"), OPTIMIZERS["sgd"]  # a spec no other test compiles
    epoch = dfa_jax.train_epoch(spec, opt, "dfa", "sample", 25)
    before = dfa_jax.TRACE_COUNTS["train_epoch_dfa"]
    params, feedback, state, x, y = _epoch_inputs(dfa_jax, spec, opt)
    for step0 in (0, 4, 8):
        order = np.random.default_rng(step0).permutation(100)
        params, state, _, _ = epoch(params, feedback, state, x, y, order, step0)
    assert dfa_jax.TRACE_COUNTS["train_epoch_dfa"] == before + 1
    epoch(*_epoch_inputs(dfa_jax, spec, opt, n=64), np.arange(64), 0)
    assert dfa_jax.TRACE_COUNTS["train_epoch_dfa"] == before + 2
    assert dfa_jax.train_epoch(spec, opt, "dfa", "sample", 25) is epoch


PREDICT_CASES = {  # (rows, chunk): a scan plus a remainder, one exact chunk, fewer rows than a chunk
    "scan_and_rest": (100, 30),
    "one_chunk": (100, 100),
    "short": (100, 1000),
}


@pytest.mark.parametrize("case", list(PREDICT_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_out", [3, 1])
def test_predict_labels_is_labels_of_forward(backend, case, n_out):
    """predict_labels gives labels_of(forward(x)) (argmax, or y_hat > 0.5 with one output) for any chunking."""
    be = get_backend(backend)
    spec = MLPSpec((8, 12, n_out), dtype="float64")
    rows, chunk = PREDICT_CASES[case]
    with be.precision_scope("float64"):
        params, x = be.asarray(init_params(spec, 2)), be.asarray(X_TRAIN[:rows])
        got = be.to_numpy(be.predict_labels(spec, chunk)(params, x))
        want = labels_of(be.to_numpy(be.forward(spec, params, x)))
    assert got.shape == (rows,) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(want)) > 1  # the check is not vacuous


def test_jax_predict_labels_is_traced_once_per_shape():
    import dfa_jax

    spec = MLPSpec((8, 5, 3), dtype="float64")
    predict = dfa_jax.predict_labels(spec, 30)
    before = dfa_jax.TRACE_COUNTS["predict_labels"]
    with dfa_jax.precision_scope("float64"):
        x = dfa_jax.asarray(X_TRAIN)
        for seed in range(3):
            predict(dfa_jax.asarray(init_params(spec, seed)), x)
    assert dfa_jax.TRACE_COUNTS["predict_labels"] == before + 1


def test_float32_engines_agree():
    """In float32 (what users run) the JAX epoch engine stays within rounding of the step engine."""
    spec = MLPSpec((8, 12, 10, 3))
    kw = dict(optimizer=OPTIMIZERS["sgd"], epochs=2, batch_size=32, seed=2)
    h_epoch = fit("jax", spec, X_TRAIN, Y_TRAIN, engine="epoch", **kw)
    h_step = fit("jax", spec, X_TRAIN, Y_TRAIN, engine="step", **kw)
    np.testing.assert_allclose(h_epoch.loss, h_step.loss, rtol=1e-5)
    for (w, _), (w_ref, _) in zip(h_epoch.params, h_step.params):
        np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-6)


BAD_BUILDS = {
    "batch_size_zero": (dict(batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
    "batch_size_float": (dict(batch_size=2.0), TypeError, "batch_size must be an int, got float"),
    "batch_size_bool": (dict(batch_size=True), TypeError, "batch_size must be an int, got bool"),
    "align_every_negative": (dict(align_every=-1), ValueError, "align_every must be >= 0, got -1"),
    "method": (dict(method="hebb"), ValueError, "method must be one of"),
    "bp_grouping": (dict(method="bp", mode="class_mean"), ValueError, "no grouping mode"),
    "optimizer": (dict(opt="adam"), TypeError, "OptimizerSpec"),
}


@pytest.mark.parametrize("case", list(BAD_BUILDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_epoch_rejects_bad_arguments(backend, case):
    """Bad arguments raise before anything is built, naming what was expected and what came."""
    overrides, error, match = BAD_BUILDS[case]
    kw = dict(spec=SPEC64, opt=OPTIMIZERS["sgd"])
    kw.update(overrides)
    with pytest.raises(error, match=match):
        get_backend(backend).train_epoch(**kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_labels_and_fit_reject_bad_arguments(backend):
    be = get_backend(backend)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        be.predict_labels(SPEC64, 0)
    with pytest.raises(TypeError, match="spec must be a dfa_core.MLPSpec"):
        be.predict_labels((8, 3))
    with pytest.raises(ValueError, match=r"engine must be one of \['epoch', 'step'\], got 'scan'"):
        fit(backend, SPEC64, X_TRAIN, Y_TRAIN, engine="scan")
