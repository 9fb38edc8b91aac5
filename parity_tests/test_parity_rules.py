"""Every learning rule on both backends against the NumPy closed form ``numpy_rules`` (float64, rtol 1e-10).

Cases: an MLP (6, 5, 7, 3, 4) with every rule in hybrids (and each rule alone on a 6-5-4 MLP),
and a conv model whose hidden signals cross a conv -> pool -> conv, a conv -> flatten -> dense
and a dense -> dense boundary, with every rule in a few hybrids (JAX's compiles dominate the
time, so one program covers several rules). Also: the reference against the
existing closed forms (its 'bp' is numpy_reference's BP, its 'dfa' numpy_blocks' DFA), FA with
B = W equals BP, an all-'bp' sequence equals bp_grads, an all-'dfa' sequence equals dfa_grads in
every mode, brsf's drawn magnitudes, and KP's B moving toward W over training steps.
"""

import dataclasses

import numpy as np
import pytest

from dfa_core import MODES, MLPSpec, OptimizerSpec
from dfa_core.model import Conv2d, Dense, Flatten, MaxPool2d, ModelSpec
from parity_tests import numpy_blocks as nb
from parity_tests import numpy_reference as ref
from parity_tests import numpy_rules as nr
from parity_tests.helpers import BACKENDS, TOLERANCES, assert_tree_close, backend

RTOL, ATOL = TOLERANCES["float64"]
RULES = ("dfa", "bp", "fa", "usf", "brsf", "frsf", "kp", "drtp", "shallow")
LABELS = np.array([0, 2, 2, 0, 1, 3])


def _mlp():
    return MLPSpec((6, 5, 7, 3, 4), activation="tanh", output="sigmoid", dtype="float64")


def _conv():
    layers = (Conv2d(3, 3, padding=1), MaxPool2d(2), Conv2d(2, 3, padding=1), Flatten(), Dense(5), Dense(4))
    return ModelSpec((2, 6, 6), layers, activation="tanh", output="softmax", dtype="float64")


SPECS = {"mlp": _mlp, "conv": _conv, "mlp1": lambda: MLPSpec((6, 5, 4), dtype="float64")}


def _case(name, reduction="sum", seed=0):
    """(spec, float64 params, x (6, ...), one-hot y (6, 4)) for SPECS[name] with ``reduction``."""
    spec = dataclasses.replace(SPECS[name](), reduction=reduction)
    rng = np.random.default_rng(300 + seed)
    x = rng.normal(size=(len(LABELS), *((spec.n_in,) if isinstance(spec, MLPSpec) else spec.input_shape)))
    y = np.eye(spec.n_out)[LABELS]
    return spec, nb.draw_params(spec, seed) if isinstance(spec, ModelSpec) else _mlp_params(spec, rng), x, y


def _mlp_params(spec, rng):
    return tuple((rng.uniform(-0.6, 0.6, size=w), rng.uniform(-0.6, 0.6, size=b)) for w, b in spec.param_shapes)


def _w_shape(spec, l):
    """Shape of W_{l+1} (0-based hidden index l)."""
    return tuple(spec.param_shapes[l + 1][0])


def feedback_for(spec, rules, seed=7):
    """One entry per hidden block for ``rules`` (a tuple of L names), zero-size where nothing is needed."""
    rng = np.random.default_rng(seed)
    out = []
    for l, rule in enumerate(rules[:-1]):
        if rule in ("dfa", "drtp"):
            out.append(rng.normal(size=spec.feedback_shapes[l]) / 2)
        elif rule in ("fa", "kp"):
            out.append(rng.normal(size=_w_shape(spec, l)) / 2)
        elif rule in ("frsf", "brsf"):
            out.append(np.abs(rng.normal(size=_w_shape(spec, l))) / 2)
        else:
            out.append(np.zeros((0,)))
    return tuple(out)


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_reference_bp_and_dfa_match_the_existing_closed_forms(name):
    """numpy_rules' 'bp' is numpy_reference/numpy_blocks BP; its 'dfa' is their DFA in every mode."""
    spec, params, x, y = _case(name)
    other = ref if isinstance(spec, MLPSpec) else nb
    assert_tree_close(nr.grads(spec, params, (), x, y, "bp"), other.bp_grads(spec, params, x, y), 1e-12, 1e-14)
    rules = ("dfa",) * spec.num_layers
    fb = feedback_for(spec, rules)
    for mode in MODES:
        want = other.dfa_grads(spec, params, fb, x, y, mode)
        assert_tree_close(nr.grads(spec, params, fb, x, y, "dfa", mode), want, 1e-12, 1e-14, mode)


@pytest.mark.parametrize("be_name", BACKENDS)
def test_every_rule_matches_numpy(be_name):
    """grads(method=rule) equals the NumPy closed form for every rule alone (brsf with explicit |R|)."""
    be = backend(be_name)
    spec, params, x, y = _case("mlp1")
    for rule in RULES:
        rules = (rule,) * spec.num_layers
        fb = feedback_for(spec, rules)
        got = be.to_numpy(be.grads(spec, params, fb, x, y, method=rule))
        assert_tree_close(got, nr.grads(spec, params, fb, x, y, rule), RTOL, ATOL, f"{be_name} {rule}")


# (rule or rules, mode, reduction): each direct rule, a mix, every mode and both reductions, pruned.
DIRECT_CASES = {
    "mlp": (("drtp", "sample", "sum"), ("dfa", "class_mean", "mean"), ("drtp", "batch_mean", "mean")),
    "conv": (("drtp", "class_mean", "mean"), (("drtp", "dfa", "drtp", "dfa"), "batch_mean", "sum")),
}


@pytest.mark.parametrize("be_name", BACKENDS)
@pytest.mark.parametrize("name", list(DIRECT_CASES))
def test_direct_rules_in_every_mode_and_reduction(be_name, name):
    """dfa and drtp group a batch (every mode) and honour reduction 'mean'."""
    be = backend(be_name)
    for rule, mode, reduction in DIRECT_CASES[name]:
        spec, params, x, y = _case(name, reduction)
        fb = feedback_for(spec, nr.expand(rule, spec.num_layers))
        got = be.to_numpy(be.grads(spec, params, fb, x, y, method=rule, mode=mode))
        want = nr.grads(spec, params, fb, x, y, rule, mode)
        assert_tree_close(got, want, RTOL, ATOL, f"{be_name} {rule} {mode} {reduction}")


HYBRIDS = {
    "mlp": {
        "dfa_below_bp": ("dfa", "dfa", "bp", "bp"),
        "fa_kp_usf": ("fa", "kp", "usf", "bp"),
        "frsf_over_drtp": ("frsf", "drtp", "brsf", "fa"),
        "shallow_then_bp": ("bp", "dfa", "shallow", "bp"),
    },
    # Stand-ins for a conv kernel behind a max pool (block 1's rule), for a dense W behind Flatten
    # (block 2's) and for the dense output's W (block 3's); fa and kp share their code.
    "conv": {
        "usf_fa_drtp": ("usf", "fa", "drtp", "bp"),
        "kp_drtp_shallow": ("kp", "drtp", "shallow", "bp"),
        "frsf_brsf_dfa": ("frsf", "brsf", "dfa", "bp"),
    },
}


@pytest.mark.parametrize("be_name", BACKENDS)
@pytest.mark.parametrize("name", list(HYBRIDS))
def test_hybrids_match_numpy(be_name, name):
    """A rule per block: each hidden block's signal from its own rule, exactly as the closed form."""
    be = backend(be_name)
    spec, params, x, y = _case(name, "mean")
    for what, rules in HYBRIDS[name].items():
        fb = feedback_for(spec, rules)
        got = be.to_numpy(be.grads(spec, params, fb, x, y, method=rules))
        assert_tree_close(got, nr.grads(spec, params, fb, x, y, rules), RTOL, ATOL, f"{be_name} {what}")


@pytest.mark.parametrize("be_name", BACKENDS)
@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_fa_with_b_equal_w_and_all_bp_sequence_equal_bp(be_name, name):
    """FA with B_l = W_{l+1} is BP (conv kernels too); an all-'bp' sequence is bp_grads (MLP)."""
    be = backend(be_name)
    spec, params, x, y = _case(name)
    bp = be.to_numpy(be.bp_grads(spec, params, x, y))
    mirror = tuple(params[l + 1][0] for l in range(spec.num_hidden))
    assert_tree_close(be.to_numpy(be.grads(spec, params, mirror, x, y, method="fa")), bp, RTOL, ATOL, "fa")
    if name == "mlp":
        seq = ["bp"] * spec.num_layers
        assert_tree_close(be.to_numpy(be.grads(spec, params, (), x, y, method=seq)), bp, RTOL, ATOL, "all-bp")


@pytest.mark.parametrize("be_name", BACKENDS)
def test_all_dfa_sequence_equals_dfa_grads(be_name):
    """method=('dfa',) * L is dfa_grads (on the MLP, in 'class_mean')."""
    be = backend(be_name)
    for name, mode in (("mlp", "class_mean"),):
        spec, params, x, y = _case(name)
        fb = feedback_for(spec, ("dfa",) * spec.num_layers)
        want = be.to_numpy(be.dfa_grads(spec, params, fb, x, y, mode=mode))
        got = be.to_numpy(be.grads(spec, params, fb, x, y, method=("dfa",) * spec.num_layers, mode=mode))
        assert_tree_close(got, want, RTOL, ATOL, f"{name} {mode}")


@pytest.mark.parametrize("be_name", BACKENDS)
def test_brsf_draws_bounded_magnitudes_from_the_key(be_name):
    """brsf with a key equals brsf with the magnitudes that key draws; magnitudes lie in [0, a]."""
    be = backend(be_name)
    rules_mod = __import__(f"dfa_{be_name}.rules", fromlist=["rules"])
    spec, params, x, y = _case("mlp")
    drawn = be.to_numpy(be.grads(spec, params, (), x, y, method="brsf", key=5))
    again = be.to_numpy(be.grads(spec, params, (), x, y, method="brsf", key=5))
    other = be.to_numpy(be.grads(spec, params, (), x, y, method="brsf", key=6))
    assert_tree_close(again, drawn, 0, 0, "same key")
    assert not np.allclose(other[0][0], drawn[0][0])
    shapes = [_w_shape(spec, l) for l in range(spec.num_hidden)]
    if be_name == "jax":
        import jax

        with be.precision_scope("float64"):
            key = jax.random.PRNGKey(5)
            mags = [rules_mod.brsf_magnitudes(jax.random.fold_in(key, l), s, "float64") for l, s in enumerate(shapes)]
    else:
        import torch

        gen = torch.Generator().manual_seed(5)
        mags = [None] * len(shapes)
        for l in reversed(range(len(shapes))):  # drawn top block first
            mags[l] = rules_mod.brsf_magnitudes(gen, shapes[l], torch.float64)
    mags = [np.asarray(be.to_numpy(m)) for m in mags]
    for m, s in zip(mags, shapes):
        assert m.min() >= 0 and m.max() <= rules_mod.brsf_bound(s) and m.std() > 0
    explicit = nr.grads(spec, params, tuple(mags), x, y, "brsf")
    assert_tree_close(drawn, explicit, RTOL, ATOL, "drawn vs explicit")


@pytest.mark.parametrize("be_name", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_kp_b_moves_toward_w_and_steps_match_numpy(be_name, optimizer):
    """KP: W and B get the same update plus decay, so ||W - B|| shrinks by (1 - lambda) per step;
    three steps equal the NumPy trajectory (grads from the closed form, optax's sgd/adam)."""
    be = backend(be_name)
    spec, params, x, y = _case("mlp")
    rules = ("kp",) * spec.num_layers
    fb = feedback_for(spec, rules)
    opt = OptimizerSpec(optimizer, learning_rate=0.05)
    decay = 0.1
    step = be.train_step(spec, opt, "kp", kp_decay=decay)
    p_n, s_n = be.asarray(params), be.asarray(fb)
    state = be.init_rule_state(spec, "kp", be.make_optimizer(opt, "float64").init(p_n), s_n, seed=0)
    numpy_opt = ref.Optimizer(opt)
    w = [np.array(t) for pair in params for t in pair]
    b_np = [np.array(t) for t in fb]
    gaps = [np.linalg.norm(params[l + 1][0] - fb[l]) for l in range(spec.num_hidden)]
    for t in range(3):
        p_n, state, _ = step(p_n, s_n, state, be.asarray(x), be.asarray(y))
        pairs = ref.unflatten(w)
        g = nr.grads(spec, pairs, tuple(b_np), x, y, "kp")
        updates = [n - wi for n, wi in zip(numpy_opt.step(w, ref.flatten(g)), w)]
        new_w = [wi + ui for wi, ui in zip(w, updates)]
        for l in range(spec.num_hidden):
            i = 2 * (l + 1)  # W_{l+2} in the flat list (0-based block l + 1)
            new_w[i] = w[i] + updates[i] - decay * w[i]
            b_np[l] = b_np[l] + updates[i] - decay * b_np[l]
        w = new_w
        got_p = be.to_numpy(p_n)
        assert_tree_close(got_p, ref.unflatten(w), RTOL, ATOL, f"params step {t}")
        assert_tree_close(be.to_numpy(state.kp_feedback), tuple(b_np), RTOL, ATOL, f"B step {t}")
        for l in range(spec.num_hidden):
            gap = np.linalg.norm(got_p[l + 1][0] - be.to_numpy(state.kp_feedback[l]))
            np.testing.assert_allclose(gap, gaps[l] * (1 - decay) ** (t + 1), rtol=1e-9)
            assert gap < gaps[l]
    assert int(be.to_numpy(state.rule_step)) == 3
