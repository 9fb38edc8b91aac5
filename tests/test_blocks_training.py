"""Models of blocks through the training engine: train_epoch, predict_labels, fit, fit_many, checkpoints.

The block math itself is parity-tested in parity_tests/test_parity_blocks.py; here the point is
that every layer above it (compiled epochs, many members, resume files) carries a ModelSpec
exactly: float64 results equal the per-step path and each other across backends.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dfa_core import (
    Conv2d,
    Dense,
    Flatten,
    MaxPool2d,
    MLPSpec,
    ModelSpec,
    OptimizerSpec,
    get_backend,
    init_feedback,
    init_params,
)
from dfa_train import fit, fit_many
from dfa_train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dfa_train.state import ResumeState

SPEC = ModelSpec(
    (1, 8, 8),
    (Conv2d(3, 3, padding=1), MaxPool2d(2), Flatten(), Dense(12), Dense(4)),
    activation="tanh",
    output="softmax",
    reduction="mean",
    dtype="float64",
)
OPT = OptimizerSpec("adam", 1e-2)
BACKENDS = ("jax", "torch")


def _data(n=70, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 8, 8)), np.eye(4)[rng.integers(0, 4, n)]


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for pu, pv in zip(a, b) for u, v in zip(pu, pv))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,mode", [("dfa", "sample"), ("dfa", "class_mean"), ("bp", "sample")])
def test_train_epoch_equals_the_per_step_path(backend, method, mode):
    be = get_backend(backend)
    x, y = _data()
    params, feedback = be.asarray(init_params(SPEC, 0)), be.asarray(init_feedback(SPEC, 1, scale=0.1))
    state = be.make_optimizer(OPT, SPEC.dtype).init(params)
    order = np.random.default_rng(3).permutation(len(x))
    got, _, losses, _ = be.train_epoch(SPEC, OPT, method, mode, batch_size=16)(
        params, feedback, state, be.asarray(x), be.asarray(y), order
    )
    step = be.train_step(SPEC, OPT, method, mode)
    p, s, expected_losses = params, state, []
    for i in range(0, len(x), 16):  # 4 full batches and a ragged one of 6
        p, s, loss = step(p, feedback, s, x[order[i : i + 16]], y[order[i : i + 16]])
        expected_losses.append(float(be.to_numpy(loss)))
    assert _max_diff(be.to_numpy(got), be.to_numpy(p)) < 1e-12
    np.testing.assert_allclose(be.to_numpy(losses), expected_losses, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_labels_takes_image_batches_in_chunks(backend):
    be = get_backend(backend)
    x, _ = _data(23)
    params = be.asarray(init_params(SPEC, 0))
    labels = be.to_numpy(be.predict_labels(SPEC, batch_size=5)(params, be.asarray(x)))
    expected = np.argmax(be.to_numpy(be.forward(SPEC, params, x)), axis=1)
    np.testing.assert_array_equal(labels, expected)


def _fit(backend, mode, **kw):
    x, y = _data()
    flat = x.reshape(len(x), -1)  # fit reshapes flat rows to the spec's (C, H, W)
    return fit(
        backend,
        SPEC,
        flat,
        y,
        x_test=x[:20],
        y_test=y[:20],
        mode=mode,
        optimizer=OPT,
        epochs=2,
        batch_size=16,
        feedback_scale=0.1,
        **kw,
    )


@pytest.mark.parametrize("mode", ["sample", "batch_mean", "class_mean"])
def test_fit_histories_agree_across_backends(mode):
    h_jax, h_torch = _fit("jax", mode), _fit("torch", mode)
    np.testing.assert_allclose(h_jax.loss, h_torch.loss, rtol=1e-10)
    assert h_jax.train_error == h_torch.train_error and h_jax.test_accuracy == h_torch.test_accuracy
    assert h_jax.config["arch"] == "conv3k3p1,maxpool2,flatten,dense12,dense4"
    assert h_jax.config["input_shape"] == [1, 8, 8]
    assert _max_diff(h_jax.params, h_torch.params) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_many_members_equal_single_fits(backend):
    members = [dict(seed=0), dict(seed=1, feedback_seed=5)]
    x, y = _data()
    many = fit_many(
        backend,
        SPEC,
        x,
        y,
        members=members,
        mode="class_mean",
        optimizer=OPT,
        epochs=2,
        batch_size=16,
        feedback_scale=0.1,
    )
    for member, history in zip(members, many):
        alone = fit(
            backend, SPEC, x, y, mode="class_mean", optimizer=OPT, epochs=2, batch_size=16, feedback_scale=0.1, **member
        )
        np.testing.assert_allclose(history.loss, alone.loss, rtol=1e-10)
        assert _max_diff(history.params, alone.params) < 1e-10


@pytest.mark.parametrize("mode", ["sample", "batch_mean", "class_mean"])
def test_block_alignment_of_a_dense_model_equals_the_mlp_one(mode):
    dense = ModelSpec((6,), (Dense(5), Dense(4), Dense(3)), activation="tanh", reduction="mean", dtype="float64")
    mlp = MLPSpec((6, 5, 4, 3), activation="tanh", reduction="mean", dtype="float64")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(9, 6)), np.eye(3)[rng.integers(0, 3, 9)]
    params, feedback = init_params(mlp, 0), init_feedback(mlp, 1)
    for backend in BACKENDS:
        be = get_backend(backend)
        got = be.alignment.alignment_angles(dense, params, feedback, x, y, mode)
        expected = be.alignment.alignment_angles(mlp, params, feedback, x, y, mode)
        np.testing.assert_allclose(be.to_numpy(got.weights), be.to_numpy(expected.weights), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(be.to_numpy(got.deltas), be.to_numpy(expected.deltas), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["sample", "class_mean"])
def test_conv_alignment_agrees_across_backends(mode):
    x, y = _data(12)
    params, feedback = init_params(SPEC, 0), init_feedback(SPEC, 1)
    angles = [get_backend(b).alignment.alignment_angles(SPEC, params, feedback, x, y, mode) for b in BACKENDS]
    (wj, dj), (wt, dt) = [tuple(np.asarray(get_backend(b).to_numpy(t)) for t in a) for b, a in zip(BACKENDS, angles)]
    np.testing.assert_allclose(wj, wt, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dj, dt, rtol=1e-9, atol=1e-9)
    assert wj.shape == (SPEC.num_layers,) and dj[-1] < 1e-6  # the output block's delta is BP's
    assert np.all((wj[:-1] > 1) & (wj[:-1] < 179))  # random feedback: the hidden blocks are not aligned yet


def test_fit_measures_block_alignment_inside_the_compiled_epoch():
    h_jax, h_torch = _fit("jax", "sample", align_every=2), _fit("torch", "sample", align_every=2)
    assert [r.step for r in h_jax.alignment] == list(range(0, 10, 2))  # 5 steps per epoch, 2 epochs
    assert len(h_jax.alignment[0].weights) == SPEC.num_layers
    for a, b in zip(h_jax.alignment, h_torch.alignment):
        assert a.step == b.step
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-8, atol=1e-8)


def _resume():
    return ResumeState(1, 5, {"state": 1}, None, (1.0,), (0.5,), (0.4,), (0.1,), 0, 2.0)


def test_checkpoint_round_trips_blocks_with_any_number_of_leaves(tmp_path):
    params = tuple(tuple(np.asarray(a) for a in pair) for pair in init_params(SPEC, 0))
    params = params[:-1] + (params[-1] + (np.arange(3.0),),)  # a block with three leaves (a composite's)
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, Checkpoint(params, tuple(init_feedback(SPEC, 1)), _resume(), {"k": 1}))
    back = load_checkpoint(path)
    assert [len(p) for p in back.params] == [2, 2, 3]
    assert _max_diff(back.params, params) == 0
    assert back.params[0][0].shape == (3, 1, 3, 3)


def test_checkpoint_of_format_version_1_still_loads(tmp_path):
    """An MLP checkpoint written before blocks (params/{l}/W and params/{l}/b) reads back."""
    w, b = np.ones((3, 2)), np.zeros(3)
    meta = {
        "format_version": 1,
        "num_layers": 1,
        "num_feedback": 0,
        "has_opt_state": False,
        "epoch": 2,
        "global_step": 4,
        "rng_state": {},
        "loss": [1.0, 0.5],
        "train_error": [0.5, 0.25],
        "test_accuracy": [0.5, 0.75],
        "time_s": [0.1, 0.1],
        "within_tol": 0,
        "meta": {},
    }
    path = str(tmp_path / "old.npz")
    text = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **{"params/0/W": w, "params/0/b": b, "__meta__": text})
    back = load_checkpoint(path)
    assert back.resume.epoch == 2
    np.testing.assert_array_equal(back.params[0][0], w)
    assert os.path.getsize(path) > 0
