"""The learning-rule zoo's API: clear errors for undefined combinations, train_step for every rule,
RuleState through train_epoch and through a checkpoint's NumPy form."""

import numpy as np
import pytest

from dfa_core import METHODS, MLPSpec, OptimizerSpec, get_backend
from dfa_core.backend import RuleState
from dfa_core.model import Conv2d, Dense, Flatten, ModelSpec, Sequential
from dfa_core.rules import KP_DECAY
from dfa_core.validation import check_train_step, method_rules
from dfa_train.state import opt_state_from_numpy, opt_state_to_numpy

SPEC = MLPSpec((4, 5, 3, 2), dtype="float64")
RNG = np.random.default_rng(0)
PARAMS = tuple((RNG.uniform(-0.5, 0.5, size=w), RNG.uniform(-0.5, 0.5, size=b)) for w, b in SPEC.param_shapes)
X = RNG.normal(size=(6, 4))
Y = np.eye(2)[[0, 1, 1, 0, 1, 0]]


def _feedback(rules):
    out = []
    for l, rule in enumerate(rules[:-1]):
        if rule in ("dfa", "drtp"):
            out.append(RNG.normal(size=SPEC.feedback_shapes[l]))
        elif rule in ("fa", "kp", "frsf"):
            out.append(RNG.normal(size=SPEC.param_shapes[l + 1][0]))
        else:
            out.append(np.zeros((0,)))
    return tuple(out)


def test_methods_list_every_rule():
    assert set(METHODS) == {"dfa", "bp", "fa", "usf", "brsf", "frsf", "kp", "drtp", "shallow"}


ERRORS = {
    "unknown": ("hebb", "sample", "method must be one of"),
    "short_sequence": (("dfa", "bp"), "sample", "one rule per block"),
    "unknown_in_sequence": (("dfa", "hebb", "bp"), "sample", r"method\[1\] must be one of"),
    "chain_below_shallow": (("bp", "shallow", "bp"), "sample", "block 2 is 'shallow'"),
    "fa_grouped": ("fa", "batch_mean", "method 'fa' has no grouping mode"),
    "bp_grouped": ("bp", "class_mean", "method 'bp' has no grouping mode"),
    "hybrid_grouped": (("dfa", "kp", "bp"), "batch_mean", r"methods \['bp', 'kp'\] has no grouping mode"),
    "not_a_method": (3, "sample", "method must be one of"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_undefined_methods_and_combinations_are_refused(case):
    method, mode, message = ERRORS[case]
    with pytest.raises(ValueError, match=message):
        check_train_step(SPEC, OptimizerSpec(), method, mode)


def test_rules_that_replace_w_refuse_a_composite_above():
    spec = ModelSpec((1, 4, 4), (Conv2d(2, 3, padding=1), Sequential(Conv2d(2, 3, padding=1)), Flatten(), Dense(2)))
    for rule in ("fa", "kp", "usf", "brsf", "frsf"):
        with pytest.raises(ValueError, match="block 2 is a Sequential"):
            method_rules(spec, rule)
    assert method_rules(spec, ("bp", "dfa", "bp")) == ("bp", "dfa", "bp")
    assert method_rules(spec, "drtp") == ("drtp",) * 3


@pytest.mark.parametrize("be_name", ["torch", "jax"])
def test_grads_errors_name_what_is_missing(be_name):
    be = get_backend(be_name)
    with pytest.raises(ValueError, match="pass key="):
        be.grads(SPEC, PARAMS, (), X, Y, method="brsf")
    with pytest.raises(ValueError, match=r"entry 1 \(rule 'fa'\) must have shape \(3, 5\)"):
        be.grads(SPEC, PARAMS, (np.zeros((5, 2)), np.zeros((2, 3))), X, Y, method="fa")
    with pytest.raises(ValueError, match="expected 2 entries"):
        be.grads(SPEC, PARAMS, (), X, Y, method="dfa")
    with pytest.raises(ValueError, match="kp_decay"):
        be.train_step(SPEC, OptimizerSpec(), "kp", kp_decay=-1.0)


@pytest.mark.parametrize("be_name", ["torch", "jax"])
def test_train_step_takes_every_rule(be_name):
    """One sgd step under each rule is params - lr * grads(rule); brsf draws from the state's (seed, step)."""
    be = get_backend(be_name)
    opt = OptimizerSpec("sgd", learning_rate=0.1)
    for rule in METHODS:
        rules = (rule,) * SPEC.num_layers
        fb = _feedback(rules)
        state = be.init_rule_state(SPEC, rule, be.make_optimizer(opt, "float64").init(be.asarray(PARAMS)), fb, 3)
        assert isinstance(state, RuleState) == (rule in ("kp", "brsf")), rule
        step = be.train_step(SPEC, opt, rule, donate=False)
        new, state, loss = step(be.asarray(PARAMS), be.asarray(fb), state, be.asarray(X), be.asarray(Y))
        if rule == "brsf":
            assert int(be.to_numpy(state.rule_step)) == 1
            continue  # its draw is the step's own; test_parity_rules checks brsf's key wiring
        g = be.to_numpy(be.grads(SPEC, PARAMS, fb, X, Y, method=rule))
        want = [[p - 0.1 * gp for p, gp in zip(pair, gpair)] for pair, gpair in zip(PARAMS, g)]
        if rule == "kp":  # KP's decay on W_{l+1}
            for l in range(SPEC.num_hidden):
                w = PARAMS[l + 1][0]
                want[l + 1][0] = w - 0.1 * g[l + 1][0] - KP_DECAY * w
        got = be.to_numpy(new)
        for pair, wpair in zip(got, want):
            for a, b in zip(pair, wpair):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=rule)
        assert np.isfinite(float(be.to_numpy(loss)))


@pytest.mark.parametrize("be_name", ["torch", "jax"])
def test_kp_trains_through_train_epoch_and_checkpoints(be_name):
    """train_epoch carries RuleState; its NumPy form round-trips, across backends too."""
    be = get_backend(be_name)
    opt = OptimizerSpec("adam", learning_rate=0.01)
    method = ("kp", "brsf", "bp")
    fb = (RNG.normal(size=SPEC.param_shapes[1][0]), np.zeros((0,)))
    params = be.asarray(PARAMS)
    state = be.init_rule_state(SPEC, method, be.make_optimizer(opt, "float64").init(params), fb, 1)
    epoch = be.train_epoch(SPEC, opt, method, batch_size=4)
    params, state, losses, _ = epoch(params, be.asarray(fb), state, be.asarray(X), be.asarray(Y), np.arange(6))
    assert int(be.to_numpy(state.rule_step)) == 2 and np.all(np.isfinite(be.to_numpy(losses)))
    flat = opt_state_to_numpy(be, state)
    assert {"count", "kp_feedback/0", "kp_feedback/1", "rule_seed", "rule_step"} <= set(flat)
    assert flat["kp_feedback/1"].shape == (0,)
    for target in (be, get_backend("jax" if be_name == "torch" else "torch")):
        fresh = target.init_rule_state(
            SPEC, method, target.make_optimizer(opt, "float64").init(target.asarray(PARAMS)), fb, 0
        )
        back = opt_state_to_numpy(target, opt_state_from_numpy(target, fresh, flat))
        assert set(back) == set(flat)
        for key in flat:
            np.testing.assert_array_equal(back[key], flat[key], err_msg=key)
