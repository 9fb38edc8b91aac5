"""Multi-step trajectories: 60 train_step calls on fixed batches, torch vs JAX vs NumPy, float64.

Every optimizer (sgd, momentum, nesterov momentum, adam) x method (DFA in each mode, BP);
parameters after every step agree to rtol 1e-8.
"""

import numpy as np
import pytest

from dfa_core import OptimizerSpec
from parity_tests import numpy_reference as ref
from parity_tests.helpers import BACKENDS, assert_tree_close, backend, make_case

STEPS = 60
RTOL, ATOL = 1e-8, 1e-10

OPTIMIZERS = {
    "sgd": OptimizerSpec("sgd", learning_rate=0.05),
    "momentum": OptimizerSpec("momentum", learning_rate=0.02, momentum=0.9),
    "nesterov": OptimizerSpec("momentum", learning_rate=0.02, momentum=0.8, nesterov=True),
    "adam": OptimizerSpec("adam", learning_rate=0.01),
    # weight decay: sgd (torch's fused SGD step must step aside for it) and adam (L2 before the moments)
    "sgd+wd": OptimizerSpec("sgd", learning_rate=0.05, weight_decay=0.05),
    "adam+wd": OptimizerSpec("adam", learning_rate=0.01, weight_decay=0.01),
}
METHOD_MODES = [("dfa", "sample"), ("dfa", "batch_mean"), ("dfa", "class_mean"), ("bp", "sample")]


def _batches(x, y, steps):
    """A fixed schedule: batch i is a seeded subset of rows (same for every backend)."""
    rng = np.random.default_rng(7)
    for _ in range(steps):
        idx = rng.choice(x.shape[0], size=6, replace=False)
        yield x[idx], y[idx]


@pytest.mark.parametrize("method,mode", METHOD_MODES, ids=[f"{m}-{g}" for m, g in METHOD_MODES])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_trajectories_agree(opt_name, method, mode):
    """60 steps of train_step stay within rtol 1e-8 of the closed form on both backends."""
    opt = OPTIMIZERS[opt_name]
    spec, params, feedback, x, y = make_case(3, "tanh", "sigmoid", "sum", "float64", seed=3)
    reference = ref.Optimizer(opt)
    flat = ref.flatten(params)
    states = {}
    for name in BACKENDS:
        be = backend(name)
        P, F = be.asarray(params), be.asarray(feedback)
        states[name] = (be, be.train_step(spec, opt, method, mode), P, F, be.make_optimizer(opt, spec.dtype).init(P))
    for step, (xb, yb) in enumerate(_batches(x, y, STEPS)):
        p_list = ref.unflatten(flat)
        grads = (
            ref.dfa_grads(spec, p_list, feedback, xb, yb, mode)
            if method == "dfa"
            else ref.bp_grads(spec, p_list, xb, yb)
        )
        want_loss = ref.loss(spec, p_list, xb, yb)
        flat = reference.step(flat, ref.flatten(grads))
        for name, (be, step_fn, P, F, S) in states.items():
            with be.precision_scope(spec.dtype):
                P, S, loss = step_fn(P, F, S, be.asarray(xb), be.asarray(yb))
            states[name] = (be, step_fn, P, F, S)
            np.testing.assert_allclose(
                float(be.to_numpy(loss)), want_loss, rtol=RTOL, err_msg=f"{name} loss at step {step}"
            )
            assert_tree_close(be.to_numpy(P), ref.unflatten(flat), RTOL, ATOL, f"{name} params after step {step}")


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_optimizer_update_matches_closed_form(opt_name):
    """make_optimizer + apply_updates of both backends on the same gradient sequence."""
    opt = OPTIMIZERS[opt_name]
    spec, params, _, _, _ = make_case(1, dtype="float64")
    rng = np.random.default_rng(5)
    grads_seq = [[rng.normal(size=p.shape) for p in ref.flatten(params)] for _ in range(5)]
    reference, flat = ref.Optimizer(opt), ref.flatten(params)
    for g in grads_seq:
        flat = reference.step(flat, g)
    for name in BACKENDS:
        be = backend(name)
        with be.precision_scope("float64"):
            tx = be.make_optimizer(opt, "float64")
            P = be.asarray(params)
            S = tx.init(P)
            for g in grads_seq:
                updates, S = tx.update(be.asarray(tuple(ref.unflatten(g))), S, P)
                P = be.apply_updates(P, updates)
        assert_tree_close(be.to_numpy(P), ref.unflatten(flat), 1e-12, 1e-14, f"{name} {opt_name}")
