"""RunConfig (validation, JSON round trip, derived specs) and the checkpoint cadence (fake clocks)."""

import dataclasses
import json

import numpy as np
import pytest

from dfa_core import FEEDBACK_DISTS, MLPSpec, OptimizerSpec, init_feedback
from dfa_core.rules import KP_DECAY
from dfa_train.cadence import AUTO_RATIO, CheckpointEvery, checkpoint_due, parse_checkpoint_every
from dfa_train.config import ADDED_IN, CONFIG_VERSION, ConfigError, RunConfig, field_names
from dfa_train.run import Checkpointer
from dfa_train.state import EpochEnd, ResumeState

CUSTOM = RunConfig(
    backend="jax",
    dataset="xor",
    layers=(2, 8, 1),
    activation="relu",
    output="identity",
    reduction="mean",
    dtype="float64",
    method="dfa",
    mode="batch_mean",
    optimizer="adam",
    lr=3e-3,
    momentum=0.5,
    batch_size=3,
    epochs=7,
    seed=4,
    param_seed=5,
    feedback_seed=6,
    feedback_dist="uniform",
    feedback_scale=0.7,
    device="cpu",
    tol=0.01,
    patience=2,
    limit_train=10,
    limit_test=20,
    align_every=0,
    standardize=True,
    checkpoint_every="30s",
    no_download=True,
    no_plots=True,
)


@pytest.mark.parametrize("config", [RunConfig(), CUSTOM], ids=["defaults", "every_field_set"])
def test_json_round_trip_is_exact(config):
    """from_json(to_json(c)) == c, from the text and from the parsed dict; the JSON carries the version."""
    text = config.to_json()
    data = json.loads(text)
    assert data["version"] == CONFIG_VERSION
    assert set(data) == set(field_names()) | {"version"}
    assert RunConfig.from_json(text) == config
    assert RunConfig.from_json(data) == config


def test_defaults_resolve_layers_per_dataset_and_match_the_report():
    assert RunConfig().layers == (784, 200, 10)
    assert RunConfig(dataset="xor").layers == (2, 4, 1)
    assert RunConfig(layers=[784, 16, 10]).layers == (784, 16, 10)  # lists become tuples
    c = RunConfig()
    assert (c.activation, c.output, c.reduction, c.lr, c.batch_size) == ("tanh", "sigmoid", "sum", 1e-4, 200)
    # No dist and no scale: the normal preset's default, the report's B ~ N(0, 1.9^2).
    assert (c.feedback_dist, c.feedback_scale, c.feedback_options()) == (None, None, {})
    (b,) = init_feedback(c.spec(), c.feedback_seed, c.feedback_dist, c.feedback_scale, **c.feedback_options())
    np.testing.assert_array_equal(b, np.random.default_rng(1).normal(0.0, 1.9, size=(200, 10)).astype(np.float32))


def test_spec_and_optimizer_spec():
    assert CUSTOM.spec() == MLPSpec((2, 8, 1), "relu", "identity", "mean", "float64")
    assert CUSTOM.optimizer_spec() == OptimizerSpec("adam", 3e-3, momentum=0.5)


def test_frozen_and_replace_validates():
    c = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0
    assert c.replace(lr=0.5).lr == 0.5 and c.lr == 1e-4
    with pytest.raises(ConfigError, match="lr"):
        c.replace(lr=0.0)
    with pytest.raises(TypeError, match="no field"):
        c.replace(learning_rate=0.1)


def test_bp_uses_mode_sample_once():
    """method 'bp' with a grouping mode is refused; with_method('bp') sets 'sample', 'dfa' keeps the mode."""
    with pytest.raises(ConfigError) as err:
        RunConfig(method="bp", mode="class_mean")
    assert (
        err.value.field == "mode" and "grouping modes apply to" in str(err.value) and "'class_mean'" in str(err.value)
    )
    grouped = RunConfig(mode="class_mean")
    assert grouped.with_method("bp").mode == "sample"
    assert grouped.with_method("bp").with_method("dfa").mode == "sample"
    assert grouped.with_method("dfa").mode == "class_mean"


def test_for_seed_maps_one_seed_to_batch_order_init_and_feedback():
    """Member s: seed s, param_seed s, feedback_seed s + 1 (member 0 is the default run)."""
    assert RunConfig().for_seed(0) == RunConfig()
    m = RunConfig().for_seed(3)
    assert (m.seed, m.param_seed, m.feedback_seed) == (3, 3, 4)


BAD_FIELDS = {
    "backend": ("backend", "numpy", "['torch', 'jax']"),
    "dataset": ("dataset", "cifar", "'xor'"),
    "layers_str": ("layers", "784,10", "sequence of ints"),
    "layers_short": ("layers", (784,), "at least two"),
    "layers_zero": ("layers", (784, 0, 10), "at least two ints >= 1"),
    "layers_float": ("layers", (784, 2.0, 10), "ints"),
    "activation": ("activation", "gelu", "'tanh'"),
    "lr_zero": ("lr", 0.0, "> 0.0"),
    "lr_str": ("lr", "1e-4", "str '1e-4'"),
    "lr_nan": ("lr", float("nan"), "finite"),
    "momentum": ("momentum", 1.0, "< 1.0"),
    "kp_decay": ("kp_decay", 1.0, ">= 0.0 and < 1.0"),
    "method": ("method", "dfa,sgd", "expected rules among"),
    "method_type": ("method", ("dfa", "bp"), "got tuple"),
    "method_count": ("method", "dfa,bp,bp", "one rule per block (2 for layer_sizes (784, 200, 10)), got 3"),
    "kp_decay_neg": ("kp_decay", -0.1, ">= 0.0 and < 1.0"),
    "epochs_zero": ("epochs", 0, "int >= 1"),
    "epochs_float": ("epochs", 2.0, "got float 2.0"),
    "epochs_bool": ("epochs", True, "got bool"),
    "seed": ("seed", -1, "int >= 0"),
    "limit_train": ("limit_train", 0, ">= 1 or None"),
    "tol": ("tol", -0.1, ">= 0.0"),
    "align_every": ("align_every", -1, ">= 0"),
    "standardize": ("standardize", 1, "bool"),
    "device": ("device", "", "non-empty string"),
    "checkpoint_every_zero": ("checkpoint_every", "0", "'auto'"),
    "checkpoint_every_unit": ("checkpoint_every", "5x", "'5x'"),
    "checkpoint_every_neg": ("checkpoint_every", "-1s", "'-1s'"),
    "feedback_dist": ("feedback_dist", "cauchy", "'shared'"),
    "feedback_scale": ("feedback_scale", 0.0, "> 0.0 or None"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_values_raise_naming_field_expected_and_got(case):
    field, value, expected_text = BAD_FIELDS[case]
    with pytest.raises(ConfigError) as err:
        RunConfig(**{field: value})
    assert err.value.field == field
    assert f"RunConfig.{field}:" in str(err.value) and "expected" in str(err.value)
    assert expected_text in str(err.value)


def test_from_json_refuses_other_versions_missing_unknown_and_mistyped_keys():
    good = RunConfig().to_dict()
    for version in (None, 0, CONFIG_VERSION + 1, "1"):
        bad = dict(good, version=version)
        if version is None:
            del bad["version"]
        with pytest.raises(ValueError, match="'version'"):
            RunConfig.from_json(bad)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['epochs'\]"):
        RunConfig.from_json({k: v for k, v in good.items() if k != "epochs"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]"):
        RunConfig.from_json(dict(good, learning_rate=0.1))
    with pytest.raises(ConfigError, match="RunConfig.batch_size: expected an int >= 1, got str '200'"):
        RunConfig.from_json(dict(good, batch_size="200"))
    with pytest.raises(ValueError, match="not JSON"):
        RunConfig.from_json("{not json")
    with pytest.raises(ValueError, match="JSON object"):
        RunConfig.from_json("[1, 2]")
    assert RunConfig.from_json(dict(good, lr=1)).lr == 1.0  # JSON ints are fine where a float is expected


@pytest.mark.parametrize(
    "changes",
    [
        dict(feedback_dist="sparse", feedback_k=3, feedback_scale=0.2),
        dict(feedback_dist="ternary", feedback_density=0.25),
        dict(feedback_dist="lowrank", feedback_rank=2),
        dict(feedback_dist="shared"),
    ],
    ids=["sparse", "ternary", "lowrank", "shared"],
)
def test_feedback_presets_round_trip_and_draw_what_they_say(changes):
    """A non-default preset survives to_json/from_json and its options reach init_feedback."""
    config = RunConfig(dataset="xor", layers=(2, 8, 4, 5), **changes)
    again = RunConfig.from_json(config.to_json())
    assert again == config and again.feedback_options() == config.feedback_options()
    opts = {k.removeprefix("feedback_"): v for k, v in changes.items() if k not in ("feedback_dist", "feedback_scale")}
    assert config.feedback_options() == opts
    got = init_feedback(again.spec(), again.feedback_seed, again.feedback_dist, again.feedback_scale, **opts)
    want = init_feedback(config.spec(), 1, changes["feedback_dist"], changes.get("feedback_scale"), **opts)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize(
    "changes,field,expected",
    [
        (dict(feedback_dist="sparse"), "feedback_k", "expected an int >= 1 with feedback_dist 'sparse', got None"),
        (dict(feedback_dist="ternary"), "feedback_density", "a number in (0, 1] with feedback_dist 'ternary'"),
        (dict(feedback_k=2), "feedback_k", "expected None with feedback_dist None (only ['sparse'] take it)"),
        (dict(feedback_dist="normal", feedback_rank=2), "feedback_rank", "only ['lowrank'] take it"),
        (dict(feedback_dist="ternary", feedback_density=1.5), "feedback_density", "got float 1.5"),
        (dict(feedback_dist="sparse", feedback_k=2.0), "feedback_k", "got float 2.0"),
        (dict(feedback_dist="sparse", feedback_k=11), "feedback_k", "expected an int <= n_L = 10, got 11"),
        (dict(feedback_dist="lowrank", feedback_rank=4, layers=(784, 3, 10)), "feedback_rank", "min(n_l, n_L) = 3"),
    ],
)
def test_feedback_options_are_set_exactly_when_the_preset_takes_them(changes, field, expected):
    with pytest.raises(ConfigError) as err:
        RunConfig(**changes)
    assert err.value.field == field and expected in str(err.value), str(err.value)


def test_version_1_to_5_configs_still_read_as_the_same_run():
    """Fields added since (arch in 2, the preset options in 3, the hardware projection in 4, devices in 5,
    kp_decay in 6) read as the value meaning "as before": the same run as before."""
    assert set(ADDED_IN) == {2, 3, 4, 5, 6} and CONFIG_VERSION == 6
    v5 = {k: v for k, v in CUSTOM.to_dict().items() if k not in ADDED_IN[6]}
    v5["version"] = 5
    before = CUSTOM.replace(kp_decay=1e-3)  # the KP decay runs had before version 6
    assert RunConfig.from_json(json.dumps(v5)) == before and KP_DECAY == CUSTOM.kp_decay == 1e-4
    v4 = {k: v for k, v in v5.items() if k not in ADDED_IN[5]}
    v4["version"] = 4
    assert RunConfig.from_json(json.dumps(v4)) == before and RunConfig.from_json(v4).devices is None
    v3 = {k: v for k, v in v4.items() if k not in ADDED_IN[4]}
    v3["version"] = 3
    assert RunConfig.from_json(json.dumps(v3)) == before and RunConfig.from_json(v3).projection() is None
    v2 = {k: v for k, v in v3.items() if k not in ADDED_IN[3]}
    v2["version"] = 2
    assert RunConfig.from_json(json.dumps(v2)) == before
    old = dict(v2, version=2, feedback_dist="normal", feedback_scale=1.9)  # what a version-2 default run wrote
    config = RunConfig.from_json(old)
    assert (config.feedback_dist, config.feedback_scale, config.feedback_options()) == ("normal", 1.9, {})
    v1 = {k: v for k, v in v2.items() if k != "arch"}
    v1["version"] = 1
    assert RunConfig.from_json(v1) == before
    assert RunConfig.from_json(dict(v2, feedback_k=None)) == before  # only the missing fields are filled in
    assert set(FEEDBACK_DISTS) >= {"normal", "uniform", "shared", "sparse", "ternary", "lowrank", "orthogonal"}


# ---------------------------------------------------------------------------------------------
# Checkpoint cadence


@pytest.mark.parametrize(
    "text,expected",
    [
        ("auto", CheckpointEvery("auto", AUTO_RATIO)),
        ("1", CheckpointEvery("epochs", 1)),
        ("2", CheckpointEvery("epochs", 2)),
        (2, CheckpointEvery("epochs", 2)),
        ("30s", CheckpointEvery("seconds", 30.0)),
        ("0.5s", CheckpointEvery("seconds", 0.5)),
    ],
)
def test_parse_checkpoint_every(text, expected):
    assert parse_checkpoint_every(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "abc", "5x", "0s", "-3s", "s", "", "1.5", "infs", "nans", True])
def test_parse_checkpoint_every_refuses(text):
    with pytest.raises(ValueError, match="expected 'auto'"):
        parse_checkpoint_every(text)


def test_checkpoint_due_every_n_epochs_and_every_n_seconds():
    every2 = parse_checkpoint_every("2")
    assert [e for e in range(1, 9) if checkpoint_due(every2, e, 0.0, 0.0)] == [2, 4, 6, 8]
    every30s = parse_checkpoint_every("30s")
    assert not checkpoint_due(every30s, 1, 29.9, 0.0) and checkpoint_due(every30s, 1, 30.0, 0.0)


def test_checkpoint_due_auto_keeps_writing_under_5_percent():
    """auto writes once the time since the last write is >= 20x its duration: the writes' share of
    the wall time stays below 1/21 < 5%, whatever the epoch and write times."""
    auto = parse_checkpoint_every("auto")
    assert not checkpoint_due(auto, 1, 1.99, 0.1) and checkpoint_due(auto, 1, 2.0, 0.1)
    for epoch_s, write_s in ((0.001, 0.05), (0.3, 0.05), (10.0, 0.05), (0.01, 0.0)):
        now, last_end, last_write, writing = 0.0, 0.0, write_s, 0.0
        for epoch in range(1, 2001):
            now += epoch_s
            if checkpoint_due(auto, epoch, now - last_end, last_write):
                now += write_s
                writing += write_s
                last_end = now
        assert writing / now < 0.05, (epoch_s, write_s)
        if epoch_s >= 20 * write_s:  # slow epochs: a checkpoint every epoch, never fewer
            assert writing == pytest.approx(2000 * write_s)


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _epoch_end(epoch: int, value: float = 0.5, loss: float = 0.1) -> EpochEnd:
    params = ((np.full((2, 2), value), np.zeros(2)),)
    resume = ResumeState(epoch, 10 * epoch, {}, None, (loss,) * epoch, (0.0,) * epoch, (), (0.1,) * epoch)
    return EpochEnd(epoch, 99, 10 * epoch, loss, 0.0, None, 0.1, 10.0, (), params, (), {}, resume)


def test_checkpointer_with_a_fake_clock_writes_at_its_cadence_and_flushes_the_last_finite_epoch():
    clock, written = _FakeClock(), []

    def save(path, ckpt):
        clock.now += 1.0  # every write takes one fake second
        written.append(ckpt.resume.epoch)

    ck = Checkpointer("unused", parse_checkpoint_every("auto"), {}, clock=clock, save=save)
    ck.write(((np.zeros((2, 2)), np.zeros(2)),), (), ResumeState(0, 0, {}, None))
    for epoch in range(1, 61):
        clock.now += 2.5  # 2.5 s epochs: auto (20 x 1 s) writes every 8th epoch
        ck.offer(_epoch_end(epoch))
    assert written == [0, 8, 16, 24, 32, 40, 48, 56]
    assert ck.flush() and written[-1] == 60 and not ck.flush()  # the end: written once
    ck.offer(_epoch_end(61))
    ck.offer(_epoch_end(62, value=np.inf))  # overflowed params: never offered to disk
    ck.offer(_epoch_end(63, loss=np.nan))
    assert ck.flush() and written[-1] == 61


def test_checkpointer_every_2_epochs():
    written = []
    ck = Checkpointer(
        "unused",
        parse_checkpoint_every("2"),
        {},
        clock=_FakeClock(),
        save=lambda path, c: written.append(c.resume.epoch),
    )
    for epoch in range(1, 6):
        ck.offer(_epoch_end(epoch))
    ck.flush()
    assert written == [2, 4, 5]
