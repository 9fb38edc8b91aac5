"""fit_many for every learning rule and for hardware projections: each member equals its own fit run.

Members differ in batch order, initial weights, feedback draw and optimizer numbers; the stateful
rules (kp's trained B, brsf's fresh magnitudes) and the noisy projections draw from each member's
own seed, so a member's History equals ``fit(..., **shared, **member)`` run alone (float64, rtol
1e-10), on both backends.
"""

import json

import numpy as np
import pytest
from history_checks import assert_same_history

import dfa_train.memory as memory
from dfa_core import MLPSpec, OptimizerSpec
from dfa_core.hardware import Projection
from dfa_core.init import init_feedback
from dfa_core.model import Conv2d, Dense, Flatten, MaxPool2d, ModelSpec
from dfa_train import fit, fit_many
from dfa_train.config import RunConfig
from dfa_train.run import run
from dfa_train.sweep import sweep

MLP = MLPSpec((6, 5, 4, 3), activation="tanh", output="sigmoid", dtype="float64")
MLP_MEAN = MLPSpec((6, 5, 4, 3), activation="relu", output="softmax", reduction="mean", dtype="float64")
CONV = ModelSpec(
    (1, 6, 6),
    (Conv2d(2, 3, padding=1), MaxPool2d(2), Flatten(), Dense(5), Dense(3)),
    activation="tanh",
    output="softmax",
    reduction="mean",
    dtype="float64",
)
BACKENDS = ("torch", "jax")
SGD = OptimizerSpec("sgd", 0.05)


def _data(n=40, seed=0):
    """Three classes set by the signs of input sums (learnable, not trivial), one-hot targets."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    label = (x[:, :3].sum(axis=1) > 0).astype(int) + (x[:, 3] > 0.5)
    return x, np.eye(3)[label]


X, Y = _data()
X_IMG = np.random.default_rng(1).normal(size=(40, 1, 6, 6))
# Members: batch order, initial weights and feedback draw differ (one program, one fit compile each).
SEEDS = [{}, {"seed": 3, "param_seed": 2, "feedback_seed": 5}, {"seed": 1, "feedback_seed": 9}]
NOISY = Projection(quantize="ternary", noise="additive", sigma=0.3)

# name: (spec, inputs, shared fit options, members). Batch 16 over 40 samples leaves a ragged last
# batch of 8; every case runs 2 epochs.
CASES = {
    # fa and shallow alone; kp, brsf, usf, frsf and drtp in the cases and hybrids below.
    **{rule: (MLP, X, dict(method=rule, optimizer=SGD), SEEDS) for rule in ("fa", "shallow")},
    "mixed_usf_frsf_bp": (MLP, X, dict(method=("usf", "frsf", "bp"), optimizer=SGD), SEEDS[:2]),
    "fa_scaled_feedback_momentum": (
        MLP,
        X,
        dict(method="fa", optimizer=OptimizerSpec("momentum", 0.02)),
        [
            {"feedback_scale": 0.5},
            {"seed": 4, "optimizer": OptimizerSpec("momentum", 0.05, momentum=0.5)},
        ],
    ),
    "kp_adam_decay": (
        MLP,
        X,
        dict(method="kp", optimizer=OptimizerSpec("adam", 1e-2), kp_decay=0.01),
        [{}, {"seed": 2, "feedback_seed": 7, "optimizer": OptimizerSpec("adam", 3e-2, b1=0.8)}],
    ),
    "drtp_class_mean": (MLP_MEAN, X, dict(method="drtp", mode="class_mean", optimizer=SGD), SEEDS[:2]),
    "mixed_kp_brsf_bp": (MLP, X, dict(method=("kp", "brsf", "bp"), optimizer=SGD, align_every=2), SEEDS),
    "mixed_dfa_under_bp": (MLP, X, dict(method=("dfa", "bp", "bp"), optimizer=SGD), SEEDS[:2]),
    "noise_additive_ternary_align": (MLP, X, dict(method="dfa", optimizer=SGD, projection=NOISY, align_every=2), SEEDS),
    "noise_multiplicative_kbit_class_mean": (
        MLP_MEAN,
        X,
        dict(
            method="dfa",
            mode="class_mean",
            optimizer=SGD,
            projection=Projection(quantize="kbit:4", noise="multiplicative", sigma=0.1, mu=0.05),
        ),
        SEEDS[:2],
    ),
    "sign_quantized_batch_mean": (
        MLP,
        X,
        dict(method="dfa", mode="batch_mean", optimizer=SGD, projection=Projection(quantize="sign")),
        SEEDS[:2],
    ),
    "conv_kp_brsf_bp_align": (
        CONV,
        X_IMG,
        dict(method=("kp", "brsf", "bp"), optimizer=OptimizerSpec("sgd", 0.1), align_every=3),
        SEEDS[:2],
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_members_equal_single_fit_runs(backend, case):
    """Member m's History equals fit(..., **shared, **member_m) run alone (float64, rtol 1e-10)."""
    spec, x, shared, members = CASES[case]
    shared = dict(shared, epochs=2, batch_size=16)
    histories = fit_many(backend, spec, x, Y, members=members, **shared)
    assert len(histories) == len(members)
    for member, h in zip(members, histories):
        assert_same_history(h, fit(backend, spec, x, Y, **{**shared, **member}))
    if shared.get("align_every"):
        assert histories[0].alignment and np.isfinite(histories[0].alignment[0].weights[-1])
    # Members differ: the test would pass trivially if they all trained the same network.
    assert not np.allclose(histories[0].params[0][0], histories[1].params[0][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kp_members_train_their_own_feedback(backend):
    """KP's B is trained state: each member's History holds its own trained B, moved away from its
    initial draw (equal to fit's: the cases above)."""
    members = [{}, {"feedback_seed": 7}]
    histories = fit_many(backend, MLP, X, Y, members=members, method="kp", optimizer=SGD, epochs=1, batch_size=16)
    for h, seed in zip(histories, (1, 7)):  # fit's default feedback_seed is 1
        for trained, start in zip(h.feedback, init_feedback(MLP, seed, method="kp"), strict=True):
            assert trained.shape == start.shape and not np.allclose(trained, start)


def _device(q):  # a plug-in projection device: a host call per member
    return (q @ np.ones((3, 5)).T, q @ np.ones((3, 4)).T)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(projection=Projection(device=_device)), ValueError, ["plug-in device", "fit(..., projection=...)"]),
        (dict(method="fa", projection=NOISY), ValueError, ["method 'dfa' only", "'fa'"]),
        (dict(projection="ternary"), TypeError, ["Projection"]),
        (dict(method="kp", mode="batch_mean"), ValueError, ["'kp'", "sample"]),
        (dict(method=("fa", "shallow", "bp")), ValueError, ["shallow"]),
        (dict(method="sgd"), ValueError, ["method must be one of"]),
        (dict(method="kp", kp_decay=1.0), ValueError, ["kp_decay", "[0, 1)"]),
    ],
    ids=[
        "device",
        "projection_with_fa",
        "projection_not_a_projection",
        "kp_grouped",
        "fa_below_shallow",
        "unknown",
        "kp_decay",
    ],
)
def test_what_cannot_run_is_refused_by_name(kwargs, error, words):
    """What one program cannot run (a plug-in device: a host call) or what fit refuses is refused
    before training, naming the culprit."""
    with pytest.raises(error) as info:
        fit_many("torch", MLP, X, Y, members=[{}], **kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_refuses_a_device_projection(backend):
    """The backends' train_epoch_many refuses a plug-in device too (it would run outside the program)."""
    from dfa_core import get_backend

    with pytest.raises(ValueError, match="plug-in device"):
        get_backend(backend).train_epoch_many(MLP, projection=Projection(device=_device))


def test_memory_estimate_counts_each_rules_state():
    """FA's W-shaped feedback, KP's trained B (state and its update), brsf's draws and projection
    noise each add to the estimate; BP's none."""
    spec = MLPSpec((784, 200, 50, 10))

    def est(method, **kw):  # a small evaluation chunk: the training step is the peak
        return memory.estimate_memory(spec, 8, 10000, 0, batch_size=200, eval_batch_size=100, method=method, **kw)

    w_above = 8 * 4 * (50 * 200 + 10 * 50)  # W_2 and W_3, float32, 8 members
    assert est("fa") - est("bp") == w_above
    assert est("kp") - est("fa") == 2 * w_above  # B in the state, and the step's new B
    assert est("brsf") - est("bp") == 2 * w_above  # |R| and its signed copy
    assert est("usf") == est("shallow") == est("bp")
    assert est(("fa", "dfa", "bp")) - est("bp") == 8 * 4 * (50 * 200 + 50 * 10)  # W_2-shaped, then B_2
    noise = 8 * 4 * 200 * (200 + 50)  # z_l (batch, n_l) per member
    assert est("dfa", projection=NOISY) - est("dfa") == noise
    assert est("dfa", projection=Projection(quantize="sign")) == est("dfa")


XOR = RunConfig(
    dataset="xor", layers=(2, 4, 1), batch_size=2, align_every=0, dtype="float64", epochs=4, lr=0.5, no_plots=True
)


@pytest.mark.parametrize(
    "config",
    [
        XOR.replace(method="fa"),
        XOR.replace(method="kp", optimizer="momentum", lr=0.1, kp_decay=0.01),
        XOR.replace(quantize="ternary", noise="additive", noise_sigma=0.3),
    ],
    ids=["fa", "kp_momentum", "noisy_dfa"],
)
def test_sweep_member_of_any_rule_equals_its_single_run(tmp_path, config):
    """``sweep`` trains every rule and hardware projection through fit_many; member s equals
    ``dfa train`` of its config (same losses, errors and params, float64)."""
    summary = sweep(config, (0, 2), str(tmp_path / "sweep"))
    assert [m["seed"] for m in summary["settings"][0]["members"]] == [0, 2]
    member = tmp_path / "sweep" / f"lr={config.lr!r}" / "seed=2"
    single = run(RunConfig.from_json((member / "config.json").read_text()), str(tmp_path / "single"))
    assert single.history.config["method"] == config.method
    metrics = json.loads((member / "metrics.json").read_text())
    np.testing.assert_allclose(metrics["loss"], single.metrics["loss"], rtol=1e-10)
    assert metrics["train_error"] == single.metrics["train_error"]
    with np.load(member / "params.npz") as p, np.load(tmp_path / "single" / "params.npz") as q:
        for key in p.files:
            np.testing.assert_allclose(p[key], q[key], rtol=1e-10, atol=1e-13)
