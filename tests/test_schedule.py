"""A stepped learning rate (lr_milestones, lr_gamma) through fit, fit_many, RunConfig and the command line."""

import json

import numpy as np
import pytest

from dfa_core import MLPSpec, OptimizerSpec
from dfa_train import cli, fit, fit_many
from dfa_train.config import ConfigError, RunConfig
from dfa_train.schedule import check_milestones, optimizer_at, parse_milestones

SPEC = MLPSpec((6, 9, 3), activation="tanh", output="softmax", reduction="mean", dtype="float64")
RNG = np.random.default_rng(4)
X = RNG.standard_normal((40, 6))
Y = np.eye(3)[RNG.integers(0, 3, 40)]


def test_the_rate_drops_at_each_milestone_passed():
    opt = OptimizerSpec("momentum", 0.1, momentum=0.5)
    rates = [optimizer_at(opt, e, (2, 4), 0.1).learning_rate for e in range(6)]
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert optimizer_at(opt, 3, (2, 4), 0.1).momentum == 0.5 and optimizer_at(opt, 1, (2,), 0.1) is opt


@pytest.mark.parametrize(
    "milestones,gamma,words",
    [((0, 3), 0.1, "epochs >= 1"), ((3, 3), 0.1, "increase strictly"), ("5", 0.1, "sequence"), ((2,), 0.0, "> 0")],
)
def test_bad_schedules_are_named(milestones, gamma, words):
    with pytest.raises((ValueError, TypeError), match=words):
        check_milestones(milestones, gamma)
    with pytest.raises(ValueError, match="epochs separated by commas"):
        parse_milestones("5,x")


def _fit(backend, epochs=3, **kw):
    seen = []
    history = fit(
        backend,
        SPEC,
        X,
        Y,
        optimizer=OptimizerSpec("sgd", 0.5),
        epochs=epochs,
        batch_size=16,
        on_epoch=lambda e: seen.append(e),
        **kw,
    )
    return history, seen


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_fit_trains_at_the_scheduled_rate_and_resumes_exactly(backend):
    """gamma 1e-9 after epoch 1 all but freezes the params; without it they keep moving. A run resumed
    after epoch 1 ends where the uninterrupted one does; both backends give the same history."""
    frozen, ends = _fit(backend, lr_milestones=(1,), lr_gamma=1e-9)
    free, free_ends = _fit(backend)
    w = [e.params[0][0] for e in ends]
    w_free = [e.params[0][0] for e in free_ends]
    assert np.abs(w[2] - w[1]).max() < 1e-8 * np.abs(w[1]).max()
    assert np.abs(w_free[2] - w_free[1]).max() > 1e-4
    np.testing.assert_array_equal(w[0], w_free[0])  # epoch 0 trains at the full rate in both
    assert frozen.config["lr_milestones"] == [1] and "lr_milestones" not in free.config
    first = ends[0]
    resumed, _ = _fit(backend, lr_milestones=(1,), lr_gamma=1e-9, params=first.params, resume=first.resume)
    for a, b in zip(resumed.params, frozen.params):
        np.testing.assert_array_equal(a[0], b[0])
    other = _fit("jax" if backend == "torch" else "torch", lr_milestones=(1,), lr_gamma=1e-9)[0]
    np.testing.assert_allclose(other.loss, frozen.loss, rtol=1e-10)


def test_fit_many_members_follow_the_schedule_as_fit_does():
    members = [{}, {"optimizer": OptimizerSpec("sgd", 0.2)}]
    many = fit_many(
        "jax",
        SPEC,
        X,
        Y,
        members=members,
        optimizer=OptimizerSpec("sgd", 0.5),
        epochs=3,
        batch_size=16,
        lr_milestones=(1, 2),
        lr_gamma=0.3,
    )
    for member, history in zip(members, many):
        opt = member.get("optimizer", OptimizerSpec("sgd", 0.5))
        single = fit("jax", SPEC, X, Y, optimizer=opt, epochs=3, batch_size=16, lr_milestones=(1, 2), lr_gamma=0.3)
        np.testing.assert_allclose(history.loss, single.loss, rtol=1e-10)
        assert history.config["lr_milestones"] == [1, 2]


def test_the_command_line_records_the_schedule(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--dataset", "xor", "--layers", "2,4,1", "--batch-size", "2", "--lr", "0.5", "--epochs", "3"]
    assert cli.main([*argv, "--lr-milestones", "2", "--lr-gamma", "0.5", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["lr_milestones"] == [2] and config["lr_gamma"] == 0.5
    assert RunConfig.from_json(config).lr_milestones == (2,)
    with pytest.raises(ConfigError, match="lr_milestones"):
        RunConfig(lr_milestones=(3, 2))
    with pytest.raises(SystemExit):
        cli.main([*argv, "--lr-milestones", "two"])
