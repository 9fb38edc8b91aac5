"""fit_many's checkpoints: a call that crashes mid-run, repeated with the same checkpoint folder,
resumes and gives each member the History of an uninterrupted call (float64), on both backends;
a finished group is not rerun; another run's files are refused; bad cadences are errors."""

import numpy as np
import pytest
from history_checks import assert_same_history

import dfa_train.many as many
from dfa_core import MLPSpec, OptimizerSpec
from dfa_train import fit_many
from dfa_train.many_checkpoint import group_path

SPEC = MLPSpec((6, 5, 4, 3), activation="tanh", output="sigmoid", dtype="float64")
MEMBERS = [
    {"seed": 0},
    {"seed": 1, "feedback_seed": 5, "optimizer": OptimizerSpec("adam", 1e-2)},  # a second group
    {"seed": 2, "param_seed": 3},
]
SHARED = dict(method="brsf", epochs=4, batch_size=8, align_every=3, optimizer=OptimizerSpec("sgd", 0.05))


def _data(n=30, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    labels = (x[:, :3].sum(axis=1) > 0).astype(int) + (x[:, 3:].sum(axis=1) > 0)
    return x, np.eye(3)[labels], x[:10], np.eye(3)[labels[:10]]


class Crash(Exception):
    pass


def _crash_at(monkeypatch, group, epoch):
    """The next call raises while recording ``epoch`` (0-based) of its ``group``-th group."""
    record, calls = many._record_epoch, {"groups": -1}
    run_group = many._run_group

    def counting_run_group(*args, **kwargs):
        calls["groups"] += 1
        return run_group(*args, **kwargs)

    def crashing_record(spec, rec, m, e, *args):
        if calls["groups"] == group and e == epoch:
            raise Crash
        return record(spec, rec, m, e, *args)

    monkeypatch.setattr(many, "_run_group", counting_run_group)
    monkeypatch.setattr(many, "_record_epoch", crashing_record)


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("group,epoch", [(0, 2), (1, 1)], ids=["first-group", "second-group"])
def test_a_crashed_call_repeated_resumes_and_equals_an_uninterrupted_one(tmp_path, monkeypatch, backend, group, epoch):
    x, y, xt, yt = _data()
    straight = fit_many(backend, SPEC, x, y, members=MEMBERS, x_test=xt, y_test=yt, **SHARED)
    ckpt = dict(x_test=xt, y_test=yt, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every="1", **SHARED)
    with monkeypatch.context() as patch:
        _crash_at(patch, group, epoch)
        with pytest.raises(Crash):
            fit_many(backend, SPEC, x, y, members=MEMBERS, **ckpt)
    assert (tmp_path / "ckpt" / "group-0.npz").exists()
    resumed = fit_many(backend, SPEC, x, y, members=MEMBERS, **ckpt)
    for h, ref in zip(resumed, straight, strict=True):
        assert_same_history(h, ref)
        assert len(h.time_s) == len(ref.time_s)


def test_finished_groups_are_read_back_not_rerun(tmp_path, monkeypatch):
    x, y, xt, yt = _data()
    folder = str(tmp_path / "ckpt")
    first = fit_many("jax", SPEC, x, y, members=MEMBERS, x_test=xt, y_test=yt, checkpoint_dir=folder, **SHARED)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished group trained again")

    monkeypatch.setattr(many, "_record_epoch", no_training)
    again = fit_many("jax", SPEC, x, y, members=MEMBERS, x_test=xt, y_test=yt, checkpoint_dir=folder, **SHARED)
    for h, ref in zip(again, first, strict=True):
        assert_same_history(h, ref)
        assert h.time_s == ref.time_s


def test_another_runs_checkpoint_is_refused_and_left_alone(tmp_path):
    x, y, _, _ = _data()
    folder = str(tmp_path / "ckpt")
    fit_many("torch", SPEC, x, y, members=MEMBERS, checkpoint_dir=folder, **{**SHARED, "epochs": 1})
    before = open(group_path(folder, 0), "rb").read()
    with pytest.raises(ValueError, match="written by another fit_many run"):
        fit_many("torch", SPEC, x, y, members=MEMBERS, checkpoint_dir=folder, **{**SHARED, "epochs": 2})
    assert open(group_path(folder, 0), "rb").read() == before


@pytest.mark.parametrize("every", ["0", "soon", -1, 1.5])
def test_bad_checkpoint_every_is_an_error_before_training(tmp_path, every):
    x, y, _, _ = _data()
    with pytest.raises(ValueError, match="expected 'auto'"):
        fit_many("torch", SPEC, x, y, members=MEMBERS, checkpoint_dir=str(tmp_path), checkpoint_every=every, **SHARED)
    assert not any(tmp_path.iterdir())


def test_checkpoint_dir_must_be_a_path(tmp_path):
    x, y, _, _ = _data()
    with pytest.raises(TypeError, match="checkpoint_dir must be a folder path or None, got int"):
        fit_many("torch", SPEC, x, y, members=MEMBERS, checkpoint_dir=3, **SHARED)


def test_progress_reports_each_epoch_of_each_group_and_a_resume_starts_where_it_stopped(tmp_path, monkeypatch):
    x, y, _, _ = _data()
    calls = []
    fit_many("torch", SPEC, x, y, members=MEMBERS, progress=lambda *a: calls.append(a), **SHARED)
    assert calls == [(g, 2, e, 4) for g in (0, 1) for e in (1, 2, 3, 4)]
    ckpt = dict(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every="1", **SHARED)
    with monkeypatch.context() as patch:
        _crash_at(patch, 1, 2)
        with pytest.raises(Crash):
            fit_many("torch", SPEC, x, y, members=MEMBERS, **ckpt)
    calls.clear()
    fit_many("torch", SPEC, x, y, members=MEMBERS, progress=lambda *a: calls.append(a), **ckpt)
    assert calls == [(1, 2, 3, 4), (1, 2, 4, 4)]  # group 0 was done; group 1 had run 2 epochs
