"""Alignment angles of every learning rule, on both backends, against NumPy (float64).

``alignment.update_angles`` measures, per block, the angle between the update a rule applies and
BP's gradient, and between its teaching signal delta_l and dLoss/da_l. Here the same angles come
from the NumPy closed forms (``numpy_rules`` for the rule, ``numpy_reference`` / ``numpy_blocks``
for BP, ``numpy_hardware`` for a quantised projection) and ``_angle`` below. The training step's
angles are also checked against the update it actually applied: under SGD, -(W_new - W_old) / lr
is the gradient used, whatever the rule drew (brsf's magnitudes, projection noise).
"""

import contextlib
import importlib

import numpy as np
import pytest

from dfa_core import OptimizerSpec
from dfa_core.hardware import Projection
from parity_tests import numpy_blocks as nb
from parity_tests import numpy_hardware as nh
from parity_tests import numpy_reference as ref
from parity_tests import numpy_rules as nr
from parity_tests.helpers import BACKENDS, backend
from parity_tests.test_parity_rules import HYBRIDS, RULES, _case, feedback_for

RTOL, ATOL = 1e-9, 1e-7  # degrees; ATOL for angles at 0 (the output block's)


def _angle(u, v):
    """Degrees between two arrays, flattened, by 2 atan2(|u^ - v^|, |u^ + v^|); NaN if one is zero."""
    u, v = np.ravel(u), np.ravel(v)
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0:
        return np.nan
    return np.degrees(2 * np.arctan2(np.linalg.norm(u / nu - v / nv), np.linalg.norm(u / nu + v / nv)))


def _numpy_angles(rule_grads, rule_deltas, bp_grads, bp_deltas, G):
    weights = [_angle(g[0], b[0]) for g, b in zip(rule_grads, bp_grads)]
    deltas = [_angle(d, G @ b.reshape(b.shape[0], -1)) for d, b in zip(rule_deltas, bp_deltas)]
    return np.array(weights), np.array(deltas)


def _scope(be_name):
    if be_name == "jax":
        from dfa_jax.arrays import precision_scope

        return precision_scope("float64")
    return contextlib.nullcontext()


def _update_angles(be_name, spec, params, fb, x, y, rules, mode="sample", projection=None):
    """The backend's update_angles on float64 arrays, as NumPy (weights (L,), deltas (L,))."""
    be, alignment = backend(be_name), importlib.import_module(f"dfa_{be_name}.alignment")
    with _scope(be_name):
        args = be.asarray(params), be.asarray(fb), be.asarray(x), be.asarray(y)
        a = alignment.update_angles(spec, *args, rules, mode, None, projection)
        return be.to_numpy(a.weights), be.to_numpy(a.deltas)


def _assert_angles(got, want, what):
    for g, w, part in zip(got, want, ("weights", "deltas")):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"{what} {part}")


@pytest.mark.parametrize("be_name", BACKENDS)
def test_every_rule_and_hybrid_matches_numpy_on_an_mlp(be_name):
    """Each rule alone and the MLP hybrids: update and delta angles per layer equal NumPy's; a
    shallow layer's are NaN (no update), BP's own are 0."""
    spec, params, x, y = _case("mlp")
    bp_deltas, _ = ref.bp_deltas(spec, params, x, y)
    bp_grads = ref.bp_grads(spec, params, x, y)
    G = ref.grouping_matrix("sample", y)
    for rules in [(r,) * spec.num_layers for r in RULES] + list(HYBRIDS["mlp"].values()):
        fb = feedback_for(spec, rules)
        grads, deltas = nr.mlp_grads(spec, params, fb, x, y, rules, with_deltas=True)
        want = _numpy_angles(grads, deltas, bp_grads, bp_deltas, G)
        _assert_angles(_update_angles(be_name, spec, params, fb, x, y, rules), want, f"{be_name} {rules}")
        if "shallow" in rules:
            assert np.isnan(want[0][rules.index("shallow")])
    bp = _update_angles(be_name, spec, params, (), x, y, ("bp",) * spec.num_layers)
    np.testing.assert_allclose(np.concatenate(bp), 0.0, atol=ATOL)


@pytest.mark.parametrize("be_name", BACKENDS)
@pytest.mark.parametrize("rule, mode, reduction", [("dfa", "class_mean", "mean"), ("drtp", "batch_mean", "sum")])
def test_direct_rules_compare_grouped_signals(be_name, rule, mode, reduction):
    """Grouped modes: delta_l (K rows) is compared with BP's dLoss/da_l grouped by the same G."""
    spec, params, x, y = _case("mlp", reduction)
    rules = (rule,) * spec.num_layers
    fb = feedback_for(spec, rules)
    grads, deltas = nr.mlp_grads(spec, params, fb, x, y, rules, mode, with_deltas=True)
    bp_deltas, _ = ref.bp_deltas(spec, params, x, y)
    want = _numpy_angles(grads, deltas, ref.bp_grads(spec, params, x, y), bp_deltas, ref.grouping_matrix(mode, y))
    _assert_angles(_update_angles(be_name, spec, params, fb, x, y, rules, mode), want, f"{be_name} {rule} {mode}")


def test_conv_hybrids_match_numpy_and_each_other():
    """Conv / pool / flatten boundaries: update angles equal NumPy's; delta angles equal across backends."""
    spec, params, x, y = _case("conv")
    bp_grads = nb.bp_grads(spec, params, x, y)
    for rules in HYBRIDS["conv"].values():
        fb = feedback_for(spec, rules)
        want = [_angle(g[0], b[0]) for g, b in zip(nr.block_grads(spec, params, fb, x, y, rules), bp_grads)]
        got = {be_name: _update_angles(be_name, spec, params, fb, x, y, rules) for be_name in BACKENDS}
        for be_name in BACKENDS:
            np.testing.assert_allclose(got[be_name][0], want, rtol=RTOL, atol=ATOL, err_msg=f"{be_name} {rules}")
        np.testing.assert_allclose(got["jax"][1], got["torch"][1], rtol=RTOL, atol=ATOL, err_msg=str(rules))
        assert np.all(np.isfinite(got["jax"][1][[i for i, r in enumerate(rules) if r != "shallow"]]))


@pytest.mark.parametrize("be_name", BACKENDS)
def test_a_quantised_projection_measures_the_quantised_update(be_name):
    """DFA with a ternarised error: the angles are those of the ternarised update (numpy_hardware),
    not of the exact DFA direction."""
    spec, params, x, y = _case("mlp")
    rules = ("dfa",) * spec.num_layers
    fb = feedback_for(spec, rules)
    ternary = Projection(quantize="ternary", threshold=0.2)
    bp_grads = ref.bp_grads(spec, params, x, y)
    want = [_angle(g[0], b[0]) for g, b in zip(nh.mlp_dfa_grads(spec, params, fb, x, y, "sample", ternary), bp_grads)]
    got = _update_angles(be_name, spec, params, fb, x, y, rules, projection=ternary)
    np.testing.assert_allclose(got[0], want, rtol=RTOL, atol=ATOL)
    exact = _update_angles(be_name, spec, params, fb, x, y, rules)
    assert np.max(np.abs(got[0][:-1] - exact[0][:-1])) > 1.0  # the quantisation moved the update


STEP_CASES = ["fa", "usf", "brsf", "frsf", "kp", "drtp", ("fa", "dfa", "brsf", "bp"), "dfa+noise"]


@pytest.mark.parametrize("be_name", BACKENDS)
def test_the_step_reports_the_angles_of_the_update_it_applies(be_name):
    """train_step(with_alignment=True) under SGD: each reported weight angle equals the angle between
    the applied update -(W_new - W_old) / lr and BP's gradient (NumPy), for deterministic rules,
    brsf's per-step draws and DFA with projection noise drawn inside the step; three steps each."""
    be = backend(be_name)
    spec, params, x, y = _case("mlp")
    lr = 0.05
    opt = OptimizerSpec("sgd", learning_rate=lr)
    for case in STEP_CASES:
        method, projection = ("dfa", Projection(noise="additive", sigma=0.5)) if case == "dfa+noise" else (case, None)
        rules = nr.expand(method, spec.num_layers)
        fb = feedback_for(spec, rules)
        if method == "brsf" or (isinstance(method, tuple) and "brsf" in method):
            fb = tuple(np.zeros((0,)) if r == "brsf" else b for r, b in zip(rules, fb))  # draw |R| per step
        step = be.train_step(spec, opt, method, kp_decay=0.0, projection=projection, with_alignment=True)
        with _scope(be_name):
            p_n, fb_n = be.asarray(params), be.asarray(fb)
            state = be.init_rule_state(spec, method, be.make_optimizer(opt, "float64").init(p_n), fb_n, 3, projection)
            for t in range(3):
                before = be.to_numpy(p_n)
                p_n, state, _, angles = step(p_n, fb_n, state, be.asarray(x), be.asarray(y))
                after = be.to_numpy(p_n)
                bp_grads = ref.bp_grads(spec, before, x, y)
                applied = [_angle((w0 - w1) / lr, b[0]) for (w0, _), (w1, _), b in zip(before, after, bp_grads)]
                np.testing.assert_allclose(
                    be.to_numpy(angles.weights), applied, rtol=1e-8, atol=ATOL, err_msg=f"{be_name} {case} step {t}"
                )
