"""dfa_train.fit_many: M members trained in one program, each equal to its own fit run."""

import numpy as np
import pytest
from history_checks import assert_same_history

import dfa_train.memory as memory
from dfa_core import MLPSpec, OptimizerSpec
from dfa_train import fit, fit_many

SPEC64 = MLPSpec((8, 12, 10, 3), activation="tanh", output="sigmoid", dtype="float64")
SPEC64_MEAN = MLPSpec((8, 12, 10, 3), activation="relu", output="softmax", reduction="mean", dtype="float64")
BACKENDS = ("torch", "jax")


def _data(n, seed=0):
    """Three classes set by the signs of a few input sums: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    label = (x[:, :3].sum(axis=1) > 0).astype(int) + (x[:, 3] > 0.5)
    return x, np.eye(3)[label]


X, Y = _data(130)
X_TRAIN, Y_TRAIN, X_TEST, Y_TEST = X[:100], Y[:100], X[100:], Y[100:]

# name: (spec, shared fit options, members). Batch 32 over 100 samples leaves a ragged last
# batch of 4; members differ in batch order, init, feedback draw and scale, and optimizer
# numbers (one program) or structure (nesterov, adam: a second program).
CASES = {
    "dfa_sample_sgd_ragged_align": (
        SPEC64,
        dict(method="dfa", mode="sample", optimizer=OptimizerSpec("sgd", 0.02), batch_size=32, align_every=3),
        [
            {},
            {"seed": 7, "param_seed": 3, "feedback_seed": 11, "feedback_scale": 0.5},
            {"optimizer": OptimizerSpec("sgd", 0.05)},
        ],
    ),
    "dfa_batch_mean_momentum_nesterov": (
        SPEC64,
        dict(method="dfa", mode="batch_mean", optimizer=OptimizerSpec("momentum", 0.05), batch_size=25),
        [
            {"seed": 1},
            {"seed": 2, "optimizer": OptimizerSpec("momentum", 0.02, momentum=0.5)},
            {"seed": 3, "optimizer": OptimizerSpec("momentum", 0.05, nesterov=True)},
        ],
    ),
    "dfa_class_mean_adam_mean_reduction": (
        SPEC64_MEAN,
        dict(method="dfa", mode="class_mean", optimizer=OptimizerSpec("adam", 1e-2), batch_size=32, align_every=5),
        [
            {"feedback_seed": 4},
            {"optimizer": OptimizerSpec("adam", 3e-2, b1=0.8, b2=0.99, eps=1e-6)},
            {"optimizer": OptimizerSpec("adam", 1e-2, weight_decay=0.05)},  # decay per member
        ],
    ),
    "bp_sample_sgd_and_adam": (
        SPEC64,
        dict(method="bp", mode="sample", batch_size=32),
        [
            {"optimizer": OptimizerSpec("sgd", 0.02), "param_seed": 2},
            {"optimizer": OptimizerSpec("adam", 1e-2), "seed": 5},
            {"optimizer": OptimizerSpec("sgd", 0.04)},
        ],
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_members_equal_single_fit_runs(backend, case):
    """Member m's History equals fit(..., **shared, **member_m) run alone (float64, rtol 1e-10)."""
    spec, shared, members = CASES[case]
    shared = dict(shared, x_test=X_TEST, y_test=Y_TEST, epochs=3)
    histories = fit_many(backend, spec, X_TRAIN, Y_TRAIN, members=members, **shared)
    assert len(histories) == len(members)
    for member, h in zip(members, histories):
        assert_same_history(h, fit(backend, spec, X_TRAIN, Y_TRAIN, **{**shared, **member}))
    # Members differ: the test would pass trivially if they all trained the same network.
    assert not np.allclose(histories[0].params[0][0], histories[-1].params[0][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tol_stops_one_member_and_freezes_it(backend):
    """With tol, a member whose train error stalls stops alone: its history and params are
    those of its stop epoch (as fit's), while the other members train on."""
    shared = dict(method="dfa", optimizer=OptimizerSpec("sgd", 0.05), epochs=5, batch_size=20, tol=0.0)
    members = [{"optimizer": OptimizerSpec("sgd", 1e-9)}, {"seed": 3}]  # a near-zero lr stalls at once
    histories = fit_many(backend, SPEC64, X_TRAIN, Y_TRAIN, members=members, **shared)
    refs = [fit(backend, SPEC64, X_TRAIN, Y_TRAIN, **{**shared, **m}) for m in members]
    for h, ref in zip(histories, refs):
        assert_same_history(h, ref)
    assert histories[0].stopped_early and histories[0].epochs_run == 2
    assert histories[1].epochs_run > 2


def test_jax_members_with_other_numbers_share_one_program():
    """Learning rates and momenta are traced, not constants: three members of different
    numbers trace the epoch once, and a second call with new numbers not at all."""
    from dfa_jax.dfa import TRACE_COUNTS

    shared = dict(method="dfa", mode="sample", epochs=1, batch_size=20)
    before = TRACE_COUNTS["train_epoch_many_dfa"]
    opts = [OptimizerSpec("momentum", lr, momentum=m) for lr, m in ((0.01, 0.9), (0.02, 0.5), (0.03, 0.0))]
    fit_many("jax", SPEC64, X_TRAIN, Y_TRAIN, members=[{"optimizer": o} for o in opts], **shared)
    assert TRACE_COUNTS["train_epoch_many_dfa"] == before + 1
    opts = [OptimizerSpec("momentum", lr, momentum=0.7) for lr in (0.1, 0.2, 0.3)]
    fit_many("jax", SPEC64, X_TRAIN, Y_TRAIN, members=[{"optimizer": o} for o in opts], **shared)
    assert TRACE_COUNTS["train_epoch_many_dfa"] == before + 1


@pytest.mark.parametrize(
    "members, kwargs, error, words",
    [
        ([{"seed": 1}, {"lr": 0.1}], {}, ValueError, ["members[1]", "'lr'", "feedback_scale", "optimizer"]),
        ([], {}, ValueError, ["at least one member"]),
        ({"seed": 1}, {}, TypeError, ["sequence of dicts"]),
        ([{}, 3], {}, TypeError, ["members[1]", "dict"]),
        ([{"seed": -1}], {}, ValueError, ["members[0]", "seed"]),
        ([{"optimizer": "adam"}], {}, TypeError, ["members[0]", "OptimizerSpec"]),
        ([{"feedback_scale": 0.0}], {}, ValueError, ["members[0]", "scale"]),
        ([{}], {"on_epoch": print, "donate": True}, TypeError, ["'donate'", "'on_epoch'"]),
        ([{}], {"feedback": (np.zeros((12, 3)), np.zeros((10, 3)))}, TypeError, ["'feedback'"]),
        ([{}], {"learning_rate": 0.1}, TypeError, ["'learning_rate'", "x_test"]),
        ([{}], {"epochs": 0}, ValueError, ["epochs"]),
        ([{}], {"method": "bp", "mode": "batch_mean"}, ValueError, ["bp", "sample"]),
        ([{}], {"optimizer": "sgd"}, TypeError, ["optimizer", "OptimizerSpec"]),
    ],
    ids=[
        "unknown_key",
        "empty",
        "not_a_sequence",
        "not_a_dict",
        "bad_seed",
        "bad_optimizer",
        "bad_scale",
        "refused_options",
        "refused_feedback",
        "unknown_option",
        "bad_epochs",
        "bp_mode",
        "bad_shared_optimizer",
    ],
)
def test_bad_members_and_options_are_named(members, kwargs, error, words):
    """Bad members and options fail before training with a message naming the culprit."""
    with pytest.raises(error) as info:
        fit_many("torch", SPEC64, X_TRAIN, Y_TRAIN, members=members, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_memory_estimate_counts_every_member():
    """The estimate covers each member's params, feedback and optimizer state plus the data,
    grows by the same amount per member, and doubles (about) from float32 to float64."""
    spec32 = MLPSpec((784, 200, 10))

    def est(members, **kw):
        return memory.estimate_memory(spec32, members, 10000, 2000, batch_size=200, **kw)

    per_member = est(2) - est(1)
    assert est(8) - est(7) == per_member > 0
    floor = 8 * 4 * (3 * spec32.num_params() + 200 * 10) + 12000 * (784 + 10) * 4  # params, adam's mu and nu, B
    assert est(8, optimizer="adam") >= floor
    assert est(1, optimizer="adam") > est(1, optimizer="momentum") > est(1)
    spec64 = MLPSpec((784, 200, 10), dtype="float64")
    ratio = memory.estimate_memory(spec64, 8, 10000, 2000) / est(8)
    assert 1.9 < ratio <= 2.0


def test_memory_refusal_names_estimate_and_limit(monkeypatch):
    """fit_many refuses members whose estimate exceeds the free memory, naming both; at the limit it runs."""
    need = memory.estimate_memory(SPEC64, 4, 100, 0, batch_size=20)
    members = [{"seed": s} for s in range(4)]
    monkeypatch.setattr(memory, "available_memory", lambda backend: (need - 1, "test device"))
    with pytest.raises(MemoryError) as info:
        fit_many("torch", SPEC64, X_TRAIN, Y_TRAIN, members=members, epochs=1, batch_size=20)
    message = str(info.value)
    assert f"{need:,} bytes" in message and f"{need - 1:,} bytes" in message and "test device" in message
    monkeypatch.setattr(memory, "available_memory", lambda backend: (need, "test device"))
    assert len(fit_many("torch", SPEC64, X_TRAIN, Y_TRAIN, members=members, epochs=1, batch_size=20)) == 4


def test_available_memory_reads_meminfo_on_cpu(tmp_path, monkeypatch):
    """On the CPU the limit is the host's MemAvailable (the backends report no device memory)."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    2048 kB\n")
    monkeypatch.setattr(memory, "_MEMINFO", str(meminfo))
    for backend in BACKENDS:
        assert memory.available_memory(backend) == (2048 * 1024, "host memory (MemAvailable)")
    monkeypatch.setattr(memory, "_MEMINFO", str(tmp_path / "missing"))
    assert memory.available_memory("torch") is None


def test_backend_many_modules_mirror_each_other():
    """dfa_jax.many and dfa_torch.many export the same names with the same arguments."""
    import inspect

    import dfa_jax.many as jax_many
    import dfa_torch.many as torch_many

    assert jax_many.__all__ == torch_many.__all__
    for name in jax_many.__all__:
        fn, twin = getattr(jax_many, name), getattr(torch_many, name)
        if inspect.isfunction(fn):
            assert list(inspect.signature(fn).parameters) == list(inspect.signature(twin).parameters), name
        else:
            assert fn._fields == twin._fields, name
