"""Every learning rule through the engine: fit on both backends, KP's trained B, resume, clear refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dfa_core import MLPSpec, OptimizerSpec
from dfa_train import fit
from dfa_train.checkpoint import load_checkpoint
from dfa_train.cli import main

SPEC = MLPSpec((6, 5, 4, 3), activation="tanh", output="softmax", reduction="mean", dtype="float64")
OPT = OptimizerSpec("sgd", 0.1)
DETERMINISTIC = ("fa", "usf", "frsf", "kp", "drtp", "shallow")


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)), np.eye(3)[rng.integers(0, 3, n)]


def _fit(backend, method, **kw):
    x, y = _data()
    kw = {"optimizer": OPT, **kw}
    return fit(backend, SPEC, x, y, x_test=x, y_test=y, method=method, epochs=3, batch_size=8, **kw)


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_every_rule_trains_the_same_on_both_backends(method):
    h_jax, h_torch = _fit("jax", method), _fit("torch", method)
    np.testing.assert_allclose(h_jax.loss, h_torch.loss, rtol=1e-10)
    for pj, pt in zip(h_jax.params, h_torch.params):
        for a, b in zip(pj, pt):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert h_jax.config["method"] == method
    assert h_jax.loss[-1] < h_jax.loss[0]  # it learns


@pytest.mark.parametrize("engine", ["epoch", "step"])
def test_shallow_blocks_stay_frozen_under_any_optimizer_and_weight_decay(engine):
    """A 'shallow' block is never updated: not by SGD, nor by Adam turning weight decay's gradient into
    full-size steps (which had shrunk LeNet-5's frozen blocks to nothing); fit and fit_many, both backends."""
    from dfa_core import init_params
    from dfa_train import fit_many

    start = init_params(SPEC, 0)
    adam_wd = OptimizerSpec("adam", 1e-2, weight_decay=1e-2)
    x, y = _data()
    for backend in ("jax", "torch"):
        for method, frozen in (("shallow", (0, 1)), (("shallow", "dfa", "bp"), (0,))):
            runs = [_fit(backend, method, engine=engine), _fit(backend, method, engine=engine, optimizer=adam_wd)]
            if engine == "epoch":
                runs += fit_many(backend, SPEC, x, y, members=[{}], method=method, optimizer=adam_wd, epochs=2)
            for h in runs:
                for l, (block, block0) in enumerate(zip(h.params, start)):
                    moved = not all(np.array_equal(t, t0) for t, t0 in zip(block, block0))
                    assert moved == (l not in frozen), (backend, method, l)


def test_kp_history_holds_the_trained_feedback():
    """KP (sgd): W - B shrinks by (1 - KP_DECAY) per step, so History.feedback is the trained B."""
    import dfa_torch
    from dfa_core import init_feedback, init_params

    x, y = _data()
    h = fit("torch", SPEC, x, y, method="kp", optimizer=OPT, epochs=3, batch_size=8)  # 15 steps
    b0, p0 = init_feedback(SPEC, 1, method="kp"), init_params(SPEC, 0)
    for l, b in enumerate(h.feedback):  # B_l stands in for W_{l+1}
        w = h.params[l + 1][0]
        assert b.shape == w.shape and not np.allclose(b, b0[l])
        expected = (1 - dfa_torch.KP_DECAY) ** 15 * np.linalg.norm(b0[l] - p0[l + 1][0])
        np.testing.assert_allclose(np.linalg.norm(b - w), expected, rtol=1e-9)


def test_brsf_trains_on_each_backend():
    for backend in ("jax", "torch"):
        h = _fit(backend, "brsf")
        assert np.all(np.isfinite(h.loss)) and h.loss[-1] < h.loss[0]


def test_chain_rules_with_a_grouping_mode_are_refused_by_name():
    with pytest.raises(ValueError, match="grouping mode"):
        _fit("jax", "fa", mode="class_mean")


def test_cli_trains_and_resumes_kp_exactly(tmp_path):
    common = ["--backend", "jax", "--dataset", "xor", "--method", "kp", "--lr", "0.5", "--batch-size", "2"]
    common += ["--dtype", "float64", "--no-plots", "--progress", "off"]
    once, twice = str(tmp_path / "once"), str(tmp_path / "twice")
    assert main(["train", *common, "--epochs", "4", "--out", once]) == 0
    assert main(["train", *common, "--epochs", "2", "--out", twice]) == 0
    assert main(["train", "--resume", twice, "--epochs", "4"]) == 0
    a, b = (load_checkpoint(os.path.join(d, "checkpoint.npz")) for d in (once, twice))
    for pa, pb in zip(a.params, b.params):
        for u, v in zip(pa, pb):
            np.testing.assert_array_equal(u, v)
    assert any(k.startswith("kp_feedback/") for k in a.resume.opt_state)


def _angles(history):
    return np.array([[r.weights, r.deltas] for r in history.alignment], dtype=float)


@pytest.mark.parametrize("method", ["fa", "kp", ("usf", "dfa", "bp")])
def test_every_rule_records_the_same_angles_on_both_backends(method):
    """fit(align_every=3) of a rule other than dfa/bp: the angles of its own update, per block,
    equal on both backends and from the compiled epoch and the per-step engine."""
    h_jax, h_torch = _fit("jax", method, align_every=3), _fit("torch", method, align_every=3)
    h_step = _fit("jax", method, align_every=3, engine="step")
    assert [r.step for r in h_jax.alignment] == [0, 3, 6, 9, 12] and h_jax.alignment[1].epoch == 0
    a = _angles(h_jax)
    assert np.all(np.isfinite(a)) and np.all(a[:, :, :-1] > 1)  # hidden blocks: not BP's direction
    np.testing.assert_allclose(_angles(h_torch), a, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(_angles(h_step), a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_drawn_updates_record_the_angles_of_this_steps_draws(backend):
    """brsf's magnitudes and projection noise are drawn per step: the compiled epoch's angles are
    the per-step engine's (the same draws), and noise moves them off the exact DFA direction's."""
    from dfa_core.hardware import Projection

    noisy = Projection(noise="additive", sigma=1.0)
    for method, kw in (("brsf", {}), ("dfa", {"projection": noisy})):
        epoch = _fit(backend, method, align_every=2, **kw)
        step = _fit(backend, method, align_every=2, engine="step", **kw)
        np.testing.assert_allclose(_angles(epoch), _angles(step), rtol=1e-10, atol=1e-10, err_msg=method)
    exact = _angles(_fit(backend, "dfa", align_every=2))
    assert np.max(np.abs(_angles(epoch)[:, 0, :-1] - exact[:, 0, :-1])) > 1.0


def test_cli_records_and_plots_the_angles_of_any_rule(tmp_path):
    import json

    out = str(tmp_path / "fa")
    args = ["train", "--backend", "torch", "--dataset", "xor", "--method", "fa", "--lr", "0.5", "--batch-size", "2"]
    assert main([*args, "--epochs", "2", "--align-every", "1", "--progress", "off", "--out", out]) == 0
    with open(os.path.join(out, "history.jsonl")) as f:
        records = [json.loads(line) for line in f]
    angles = [a for r in records for a in r["alignment"]]
    assert len(angles) == 4 and all(a["weights"][0] is not None for a in angles)  # xor: 4 samples, 2 steps/epoch
    assert os.path.getsize(os.path.join(out, "alignment.png")) > 1000


@pytest.mark.parametrize("engine", ["epoch", "step"])
def test_kp_decay_is_an_option_of_fit_recorded_in_the_history(engine):
    """fit(kp_decay=0.2): ||W_{l+1} - B_l|| shrinks by exactly (1 - 0.2) per step on both backends."""
    from dfa_core import init_feedback, init_params

    b0, p0 = init_feedback(SPEC, 1, method="kp"), init_params(SPEC, 0)
    for backend in ("jax", "torch"):
        h = _fit(backend, "kp", kp_decay=0.2, engine=engine)  # 15 steps
        assert h.config["kp_decay"] == 0.2
        for l, b in enumerate(h.feedback):
            expected = 0.8**15 * np.linalg.norm(b0[l] - p0[l + 1][0])
            np.testing.assert_allclose(np.linalg.norm(b - h.params[l + 1][0]), expected, rtol=1e-9)
    assert "kp_decay" not in _fit("jax", "fa").config
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match=r"kp_decay must be a number in \[0, 1\)"):
            _fit("jax", "kp", kp_decay=bad)


def test_cli_kp_decay_reaches_the_run(tmp_path):
    out = str(tmp_path / "kp")
    args = ["train", "--backend", "jax", "--dataset", "xor", "--method", "kp", "--kp-decay", "0.05", "--epochs", "1"]
    assert main([*args, "--no-plots", "--progress", "off", "--out", out]) == 0
    from dfa_train.config import RunConfig

    with open(os.path.join(out, "config.json")) as f:
        assert RunConfig.from_json(f.read()).kp_decay == 0.05


def test_cli_trains_a_hybrid_given_as_a_rule_per_block(tmp_path):
    """--method fa,fa,bp is FA (the output block always learns from e'); dfa,fa,bp is neither DFA nor
    FA; a wrong count or a grouping mode with a chain rule is refused before anything runs."""
    from dfa_train.config import RunConfig

    def params_of(method):
        out = str(tmp_path / method.replace(",", "_"))
        args = ["train", "--backend", "torch", "--dataset", "xor", "--layers", "2,8,8,1", "--lr", "0.5"]
        assert main([*args, "--method", method, "--epochs", "3", "--no-plots", "--progress", "off", "--out", out]) == 0
        with open(os.path.join(out, "config.json")) as f:
            assert RunConfig.from_json(f.read()).rule() == (tuple(method.split(",")) if "," in method else method)
        with np.load(os.path.join(out, "params.npz")) as z:
            return [z[k] for k in sorted(z.files)]

    fa, hybrid, dfa = params_of("fa"), params_of("dfa,fa,bp"), params_of("dfa")
    for a, b in zip(params_of("fa,fa,bp"), fa):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(hybrid[0], fa[0]) and not np.allclose(hybrid[0], dfa[0])
    base = ["train", "--dataset", "xor", "--layers", "2,8,8,1", "--epochs", "1", "--out", str(tmp_path / "no")]
    with pytest.raises(SystemExit):
        main([*base, "--method", "fa,dfa"])  # 3 blocks
    with pytest.raises(SystemExit):
        main([*base, "--method", "dfa,fa,bp", "--mode", "class_mean"])
    assert not os.path.exists(tmp_path / "no")
