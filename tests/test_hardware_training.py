"""DFA's hardware effects (dfa_core.hardware.Projection) in training: train_step, train_epoch, fit,
RunConfig and ``dfa train``; noise drawn from (rule_seed, step), so a resumed run draws the same."""

import json
import os

import jax
import numpy as np
import pytest

from dfa_core import MLPSpec, OptimizerSpec, get_backend, init_feedback, init_params
from dfa_core.backend import RuleState
from dfa_core.hardware import Projection
from dfa_train import cli
from dfa_train.checkpoint import load_checkpoint
from dfa_train.config import CONFIG_VERSION, ConfigError, RunConfig
from dfa_train.trainer import fit

BACKENDS = ("torch", "jax")
SEED = 3
NOISY = Projection(quantize="ternary", threshold=0.05, noise="additive", sigma=0.5, mu=0.1)
PROJECTIONS = {
    "ternary_additive": NOISY,
    "kbit3_multiplicative": Projection(quantize="kbit:3", noise="multiplicative", sigma=0.2),
}


def case(n=10, dtype="float64"):
    """A small MLP with two hidden blocks, its params and feedback, and n samples of 4 classes."""
    spec = MLPSpec((6, 5, 7, 4), activation="tanh", output="softmax", dtype=dtype)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype(dtype)
    y = np.eye(4, dtype=dtype)[rng.integers(0, 4, n)]
    return spec, init_params(spec, seed=0), init_feedback(spec, seed=1), x, y


def step_key(name, t):
    """The key a step at rule_step t draws from: brsf's derivation (dfa_*/train.py)."""
    return jax.random.fold_in(jax.random.PRNGKey(SEED), t) if name == "jax" else SEED * 2**32 + t


def assert_trees_close(a, b, rtol):
    for s, t in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(s), np.asarray(t), rtol=rtol, atol=1e-13)


def as_numpy(be, tree):
    return jax.tree_util.tree_map(np.asarray, be.to_numpy(tree))


def project_numpy(feedback_np, calls):
    """A plug-in device computing q B_l^T in NumPy on the host (what the compiled step does)."""

    def project(q):
        calls.append(q.shape)
        return tuple(q @ b.T for b in feedback_np)

    return project


@pytest.mark.parametrize("mode", ["sample", "class_mean"])
@pytest.mark.parametrize("name", BACKENDS)
def test_train_step_is_the_grads_drawn_with_the_step_key_plus_the_update(name, mode):
    """Two steps of a noisy train_step equal dfa_grads with key (rule_seed, t) and the optimizer's
    update, in float64 (rtol 1e-12); rule_step counts the steps."""
    be = get_backend(name)
    spec, params_np, feedback_np, x, y = case()
    opt = OptimizerSpec("adam", 1e-2)
    with be.precision_scope(spec.dtype):  # the hand-made update in float64, as the step's
        tx = be.make_optimizer(opt, spec.dtype)
        params, feedback = be.asarray(params_np), be.asarray(feedback_np)
        state = be.init_rule_state(spec, "dfa", tx.init(params), feedback, SEED, projection=NOISY)
        assert isinstance(state, RuleState) and state.kp_feedback == ()
        step = be.train_step(spec, opt, "dfa", mode, projection=NOISY)
        want_params, want_inner = params, tx.init(params)
        for t, rows in enumerate((slice(0, 5), slice(5, 10))):
            xb, yb = be.asarray(x[rows]), be.asarray(y[rows])
            key = step_key(name, t)
            grads = be.dfa_grads(spec, want_params, feedback, xb, yb, mode, projection=NOISY, key=key)
            updates, want_inner = tx.update(grads, want_inner, want_params)
            want_params = be.apply_updates(want_params, updates)
            params, state, _ = step(params, feedback, state, xb, yb)
            assert_trees_close(as_numpy(be, params), as_numpy(be, want_params), rtol=1e-12)
    assert int(state.rule_step) == 2 and int(state.rule_seed) == SEED
    assert_trees_close(as_numpy(be, state.inner), as_numpy(be, want_inner), rtol=1e-12)


@pytest.mark.parametrize("projection", list(PROJECTIONS))
@pytest.mark.parametrize("name", BACKENDS)
def test_train_epoch_equals_the_step_loop(name, projection):
    """One train_epoch (JAX: a lax.scan) equals train_step called per batch (a ragged last batch
    included), with the projection's noise drawn per step: params, losses, rule_step (float64)."""
    be = get_backend(name)
    hw = PROJECTIONS[projection]
    spec, params_np, feedback_np, x, y = case(n=10)
    opt = OptimizerSpec("momentum", 5e-2)
    feedback = be.asarray(feedback_np)
    order = np.random.default_rng(1).permutation(10)

    def start():
        params = be.asarray(params_np)
        return params, be.init_rule_state(spec, "dfa", be.make_optimizer(opt, spec.dtype).init(params), feedback, 2, hw)

    params, state = start()
    step = be.train_step(spec, opt, "dfa", "sample", projection=hw)
    losses = []
    for i in range(0, 10, 3):
        idx = order[i : i + 3]
        params, state, loss = step(params, feedback, state, be.asarray(x[idx]), be.asarray(y[idx]))
        losses.append(float(be.to_numpy(loss)))
    epoch = be.train_epoch(spec, opt, "dfa", "sample", batch_size=3, projection=hw)
    params0, state0 = start()
    e_params, e_state, e_losses, angles = epoch(params0, feedback, state0, be.asarray(x), be.asarray(y), order)
    assert angles is None
    np.testing.assert_allclose(be.to_numpy(e_losses), losses, rtol=1e-10)
    assert_trees_close(as_numpy(be, e_params), as_numpy(be, params), rtol=1e-10)
    assert isinstance(e_state, RuleState) == (hw.noise is not None)
    if hw.noise is not None:
        assert int(e_state.rule_step) == int(state.rule_step) == 4


@pytest.mark.parametrize("name", BACKENDS)
def test_a_plug_in_device_trains_inside_the_epoch_as_the_compiled_projection(name):
    """A NumPy device computing q B_l^T (JAX: a pure_callback under lax.scan) gives the epoch of the
    compiled projection, noise included; the device ran once per batch at least."""
    be = get_backend(name)
    spec, params_np, feedback_np, x, y = case(n=10)
    opt = OptimizerSpec("sgd", 5e-2)
    feedback, calls = be.asarray(feedback_np), []
    device = Projection(quantize="ternary", noise="additive", sigma=0.3, device=project_numpy(feedback_np, calls))
    results = []
    for hw in (device, Projection(quantize="ternary", noise="additive", sigma=0.3)):
        params = be.asarray(params_np)
        state = be.init_rule_state(spec, "dfa", be.make_optimizer(opt, spec.dtype).init(params), feedback, 0, hw)
        epoch = be.train_epoch(spec, opt, "dfa", "sample", batch_size=4, projection=hw)
        results.append(epoch(params, feedback, state, be.asarray(x), be.asarray(y), np.arange(10)))
    assert len(calls) >= 3 and calls[0] == (4, 4)
    assert_trees_close(as_numpy(be, results[0][0]), as_numpy(be, results[1][0]), rtol=1e-10)
    np.testing.assert_allclose(be.to_numpy(results[0][2]), be.to_numpy(results[1][2]), rtol=1e-10)


@pytest.mark.parametrize("name", BACKENDS)
def test_no_projection_keeps_todays_steps_and_bad_uses_are_refused(name):
    """None and an identity Projection build the very step of before; a projection with another
    method and a noisy step without a RuleState are refused."""
    be = get_backend(name)
    spec, params_np, feedback_np, x, y = case()
    opt = OptimizerSpec("sgd", 1e-2)
    assert be.train_step(spec, opt) is be.train_step(spec, opt, projection=None)
    assert be.train_step(spec, opt) is be.train_step(spec, opt, projection=Projection())
    assert be.train_epoch(spec, opt, batch_size=3) is be.train_epoch(spec, opt, batch_size=3, projection=Projection())
    plain = be.make_optimizer(opt, spec.dtype).init(be.asarray(params_np))
    assert be.init_rule_state(spec, "dfa", plain, None, 0, projection=Projection(quantize="sign")) is plain
    with pytest.raises(ValueError, match="method 'dfa' only, got 'bp'"):
        be.train_step(spec, opt, "bp", projection=NOISY)
    with pytest.raises(ValueError, match="method 'dfa' only, got 'fa'"):
        be.train_epoch(spec, opt, "fa", projection=NOISY)
    with pytest.raises(ValueError, match="method 'dfa' only, got 'kp'"):
        be.init_rule_state(spec, "kp", plain, feedback_np, 0, projection=NOISY)
    with pytest.raises(TypeError, match="projection must be a dfa_core.hardware.Projection"):
        be.train_step(spec, opt, projection="ternary")
    step = be.train_step(spec, opt, projection=NOISY)
    with pytest.raises(TypeError, match="draws each step's key from a RuleState opt_state"):
        step(be.asarray(params_np), be.asarray(feedback_np), plain, be.asarray(x), be.asarray(y))
    with pytest.raises(ValueError, match="method 'dfa' only, got 'fa'"):
        fit(name, spec, x, y, method="fa", projection=NOISY, epochs=1)


def test_fit_with_a_ternary_error_agrees_across_backends_and_records_it():
    """fit with quantize='ternary' (deterministic: no noise) gives the same history and params on
    torch and JAX (float64, rtol 1e-9), unlike exact DFA; History.config records the projection."""
    spec, _, _, x, y = case(n=40)
    hw = Projection(quantize="ternary", threshold=0.2)
    kw = dict(optimizer=OptimizerSpec("sgd", 5e-2), epochs=3, batch_size=8, seed=2)
    h_torch, h_jax = (fit(name, spec, x, y, projection=hw, **kw) for name in BACKENDS)
    np.testing.assert_allclose(h_torch.loss, h_jax.loss, rtol=1e-9)
    assert_trees_close(h_torch.params, h_jax.params, rtol=1e-9)
    assert h_jax.config["projection"] == {
        "quantize": "ternary",
        "threshold": 0.2,
        "noise": None,
        "sigma": 0.0,
        "mu": 0.0,
    }
    exact = fit("jax", spec, x, y, **kw)
    assert "projection" not in exact.config
    assert not np.allclose(exact.params[0][0], h_jax.params[0][0])
    device = fit("torch", spec, x, y, projection=Projection(device=project_numpy(init_feedback(spec, 1), [])), **kw)
    assert device.config["projection"]["device"].endswith("project_numpy.<locals>.project")


@pytest.mark.parametrize("name", BACKENDS)
def test_fit_with_noise_resumes_exactly_by_steps_and_by_epochs(name):
    """A noisy fit stopped after 2 epochs and resumed (engine 'step') ends where an uninterrupted
    run (engine 'epoch') ends: the noise of step t comes from (seed, t) either way."""
    spec, _, _, x, y = case(n=20)
    kw = dict(optimizer=OptimizerSpec("adam", 1e-2), batch_size=6, seed=4, projection=NOISY)
    straight = fit(name, spec, x, y, epochs=4, **kw)
    ends = []
    fit(name, spec, x, y, epochs=2, on_epoch=ends.append, engine="step", **kw)
    resumed = fit(name, spec, x, y, epochs=4, params=ends[-1].params, resume=ends[-1].resume, engine="step", **kw)
    assert ends[-1].resume.opt_state["rule_step"] == 8
    np.testing.assert_allclose(resumed.loss, straight.loss, rtol=1e-12)
    assert_trees_close(resumed.params, straight.params, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# RunConfig and the dfa command

XOR = ["--dataset", "xor", "--layers", "2,4,3,1", "--batch-size", "2", "--lr", "0.05", "--optimizer", "adam"]
XOR += ["--align-every", "0", "--no-plots", "--dtype", "float64"]


def _params(run_dir):
    with np.load(os.path.join(run_dir, "params.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_noisy_cli_run_resumes_exactly(tmp_path, backend):
    """``dfa train --quantize kbit:4 --noise additive``: 4 epochs straight == 2, then --resume to 4,
    exactly; config.json records the options and the checkpoint the noise's step counter."""
    hw = ["--quantize", "kbit:4", "--noise", "additive", "--noise-sigma", "0.5", "--noise-mu", "0.1"]
    common = ["train", "--backend", backend, *XOR, *hw]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli.main([*common, "--epochs", "4", "--out", str(straight)]) == 0
    assert cli.main([*common, "--epochs", "2", "--out", str(split)]) == 0
    assert load_checkpoint(str(split / "checkpoint.npz")).resume.opt_state["rule_step"] == 4
    assert cli.main(["train", "--resume", str(split), "--epochs", "4"]) == 0
    a, b = _params(straight), _params(split)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    config = json.loads((split / "config.json").read_text())
    assert config["version"] == CONFIG_VERSION
    assert [config[k] for k in ("quantize", "threshold", "noise", "noise_sigma", "noise_mu")] == [
        "kbit:4",
        None,
        "additive",
        0.5,
        0.1,
    ]


def test_config_round_trips_the_projection_and_builds_it():
    config = RunConfig(dataset="xor", quantize="ternary", threshold=0.3, noise="multiplicative", noise_sigma=0.2)
    assert RunConfig.from_json(config.to_json()) == config
    assert config.projection() == Projection(quantize="ternary", threshold=0.3, noise="multiplicative", sigma=0.2)
    assert RunConfig(quantize="ternary").projection() == Projection(quantize="ternary", threshold=0.1)
    assert RunConfig(noise="additive", noise_sigma=0.618).projection() == Projection(noise="additive", sigma=0.618)
    assert RunConfig().projection() is None
    bp = config.with_method("bp")
    assert bp.projection() is None and bp.method == "bp"
    assert config.with_method("dfa") == config


@pytest.mark.parametrize(
    "changes,field,expected",
    [
        (dict(quantize="kbit:1"), "quantize", "integer N of bits in [2, 32]"),
        (dict(quantize=3), "quantize", "got int 3"),
        (dict(threshold=0.2), "threshold", "expected None unless quantize is 'ternary'"),
        (dict(quantize="ternary", threshold=-1.0), "threshold", "expected a finite number >= 0.0"),
        (dict(noise="gaussian", noise_sigma=0.1), "noise", "expected one of ['additive', 'multiplicative']"),
        (dict(noise="additive"), "noise_sigma", "expected a number >= 0 with noise 'additive'"),
        (dict(noise_sigma=0.1), "noise_sigma", "expected None without noise"),
        (dict(noise="additive", noise_sigma=0.1, noise_mu=float("nan")), "noise_mu", "expected a finite number"),
        (dict(method="bp", quantize="sign"), "quantize", "method 'dfa' only"),
        (dict(method="fa", noise="additive", noise_sigma=0.1), "noise", "method 'dfa' only"),
    ],
)
def test_bad_projection_settings_name_their_field(changes, field, expected):
    with pytest.raises(ConfigError) as err:
        RunConfig(**changes)
    assert err.value.field == field and expected in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "options,expected",
    [
        (["--threshold", "0.2"], "argument --threshold: expected None unless quantize is 'ternary'"),
        (["--quantize", "sign", "--threshold", "0.2"], "argument --threshold"),
        (["--quantize", "kbit:1"], "argument --quantize: quantize 'kbit:N' needs an integer N"),
        (["--quantize", "binary"], "argument --quantize: quantize must be None or one of"),
        (["--noise", "gaussian"], "argument --noise: invalid choice"),
        (["--noise", "additive"], "argument --noise-sigma: expected a number >= 0"),
        (["--noise-sigma", "0.3"], "argument --noise-sigma: expected None without noise"),
        (["--noise", "additive", "--noise-sigma", "-1"], "argument --noise-sigma"),
        (["--noise", "additive", "--noise-sigma", "0.1", "--noise-mu", "inf"], "argument --noise-mu"),
        (["--method", "bp", "--quantize", "ternary"], "argument --quantize: expected None with method 'bp'"),
    ],
)
def test_bad_hardware_options_exit_2_naming_the_option(tmp_path, options, expected, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["train", *XOR, *options, "--out", str(tmp_path / "r")])
    assert err.value.code == 2
    assert expected in capsys.readouterr().err
