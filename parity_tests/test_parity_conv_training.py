"""Conv-net trajectories: 60 train_step calls on a small conv net, torch vs JAX vs NumPy, float64.

The net, (1, 12, 12) -> Conv2d(4, 3, padding=1) -> MaxPool2d(2) -> Conv2d(6, 3) -> Flatten ->
Dense(16) -> Dense(5), trains from one init and one feedback draw on one fixed schedule of
batches, with DFA in each grouping mode and with BP, under sgd and adam. After 60 steps the
parameters of both backends agree with each other and with a NumPy trajectory (the closed-form
gradients of ``numpy_blocks`` stepped by ``numpy_reference.Optimizer``) to rtol 1e-10; the batch
losses agree at every step.
"""

import numpy as np
import pytest

from dfa_core import OptimizerSpec
from dfa_core.model import Conv2d, Dense, Flatten, MaxPool2d, ModelSpec
from parity_tests import numpy_blocks as nb
from parity_tests import numpy_reference as ref
from parity_tests.helpers import BACKENDS, assert_tree_close, backend

STEPS = 60
BATCH = 6
RTOL, ATOL = 1e-10, 1e-12
# How far every tensor must have moved from its init (max change over max |init|) for the comparison
# to say something: a step that silently did nothing would match itself.
MIN_TRAVEL = 1e-2

SPEC = ModelSpec(
    (1, 12, 12),
    (Conv2d(4, 3, padding=1), MaxPool2d(2), Conv2d(6, 3), Flatten(), Dense(16), Dense(5)),
    activation="tanh",
    output="softmax",
    reduction="mean",
    dtype="float64",
)
# 12 rows, class 4 absent, so 'class_mean' has an empty group in every batch.
LABELS = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 0, 1, 2])

OPTIMIZERS = {
    # At lr 0.1, DFA 'sample' amplifies a perturbation of the params ~1e5-fold over the 60 steps (rounding
    # differences reach 1e-10); at 0.05 every case stays under ~30-fold, adam under ~1e4-fold.
    "sgd": OptimizerSpec("sgd", learning_rate=0.05),
    "adam": OptimizerSpec("adam", learning_rate=0.01),
}
METHOD_MODES = [("dfa", "sample"), ("dfa", "batch_mean"), ("dfa", "class_mean"), ("bp", "sample")]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """torch on one thread for this module, restored after: these (6, 4, 12, 12) tensors are far below
    where a second thread pays, and on a busy 2-core machine its OpenMP barriers stalled single
    steps for seconds (torch's 480 steps here took 6-14 s with two threads, 1.7 s with one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data():
    """x (12, 1, 12, 12) ~ N(0, 1), one-hot y (12, 5), params and feedback of SPEC (NumPy, float64)."""
    rng = np.random.default_rng(300)
    x = rng.normal(size=(len(LABELS), *SPEC.input_shape))
    y = np.eye(SPEC.n_out)[LABELS]
    return x, y, nb.draw_params(SPEC, seed=3), nb.draw_feedback(SPEC, seed=4)


def _batches(x, y):
    """The schedule: batch i is a seeded subset of BATCH rows (the same for every backend)."""
    rng = np.random.default_rng(7)
    for _ in range(STEPS):
        idx = rng.choice(x.shape[0], size=BATCH, replace=False)
        yield x[idx], y[idx]


def _numpy_trajectory(opt, method, mode, params, feedback, x, y):
    """Returns (params after STEPS steps as [(W, b), ...], the loss of every batch before its step)."""
    stepper, flat, losses = ref.Optimizer(opt), ref.flatten(params), []
    for xb, yb in _batches(x, y):
        p_list = ref.unflatten(flat)
        losses.append(nb.loss(SPEC, p_list, xb, yb))
        grads = (
            nb.dfa_grads(SPEC, p_list, feedback, xb, yb, mode) if method == "dfa" else nb.bp_grads(SPEC, p_list, xb, yb)
        )
        flat = stepper.step(flat, ref.flatten(grads))
    return ref.unflatten(flat), np.array(losses)


def _backend_trajectory(name, opt, method, mode, params, feedback, x, y):
    """The same STEPS steps through ``train_step`` of backend ``name``; params and losses as NumPy."""
    be = backend(name)
    step = be.train_step(SPEC, opt, method, mode)
    with be.precision_scope(SPEC.dtype):
        P, F = be.asarray(params), be.asarray(feedback)
        S = be.make_optimizer(opt, SPEC.dtype).init(P)
        losses = []
        for xb, yb in _batches(x, y):
            P, S, loss = step(P, F, S, be.asarray(xb), be.asarray(yb))
            losses.append(float(be.to_numpy(loss)))
    return be.to_numpy(P), np.array(losses)


@pytest.mark.parametrize("method,mode", METHOD_MODES, ids=[f"{m}-{g}" for m, g in METHOD_MODES])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_conv_trajectories_agree(opt_name, method, mode):
    """60 conv-net steps: torch == JAX == the NumPy closed form at rtol 1e-10, params and every loss."""
    opt = OPTIMIZERS[opt_name]
    x, y, params, feedback = _data()
    want_params, want_losses = _numpy_trajectory(opt, method, mode, params, feedback, x, y)
    travel = min(
        np.abs(w - w0).max() / np.abs(w0).max()
        for pair, pair0 in zip(want_params, params)
        for w, w0 in zip(pair, pair0)
    )
    assert travel > MIN_TRAVEL, f"a tensor barely moved in {STEPS} steps (relative change {travel:.2e})"
    got = {name: _backend_trajectory(name, opt, method, mode, params, feedback, x, y) for name in BACKENDS}
    torch_params, jax_params = got["torch"][0], got["jax"][0]
    assert_tree_close(torch_params, jax_params, RTOL, ATOL, f"torch vs jax params after {STEPS} steps")
    for name, (got_params, got_losses) in got.items():
        np.testing.assert_allclose(got_losses, want_losses, rtol=RTOL, err_msg=f"{name} losses")
        assert_tree_close(got_params, want_params, RTOL, ATOL, f"{name} vs NumPy params after {STEPS} steps")
