"""Several devices through the application: fit(devices=...), `dfa train --devices N` and torchrun launches.

Each case trains the same float64 run on one device and on several, and asserts the histories
and final params agree (rtol 1e-10): torch in 2 gloo processes (``dist_helpers.run_ranks``, one
spawn for all its cases; rank 0 alone writes the run folder), JAX on 4 simulated CPU devices in
one subprocess (JAX fixes its device count when it starts). The engines themselves are tested in
test_parallel_torch.py and test_parallel_jax.py.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from dist_helpers import run_on_simulated_devices, run_ranks

from dfa_core import MLPSpec, OptimizerSpec
from dfa_train import cli
from dfa_train.trainer import fit

RTOL = 1e-10
SPEC = MLPSpec((6, 8, 5, 3), activation="tanh", output="softmax", reduction="mean", dtype="float64")
FIT_CASES = (("dfa", "class_mean"), ("bp", "sample"), ("kp", "sample"))
N, BATCH, EPOCHS = 26, 8, 2  # a ragged last batch of 2 rows


def _data():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, 6))
    y = np.eye(3)[rng.integers(0, 3, N)]
    return x, y


def _fit(backend, method, mode, **kwargs):
    x, y = _data()
    return fit(
        backend,
        SPEC,
        x,
        y,
        x_test=x[:7],
        y_test=y[:7],
        method=method,
        mode=mode,
        optimizer=OptimizerSpec("momentum", 0.1),
        epochs=EPOCHS,
        batch_size=BATCH,
        **kwargs,
    )


def _summary(history):
    return {
        "loss": list(history.loss),
        "train_error": list(history.train_error),
        "test_accuracy": list(history.test_accuracy),
        "params": [[np.asarray(t).tolist() for t in block] for block in history.params],
        "feedback": [np.asarray(b).tolist() for b in history.feedback],
        "devices": history.config.get("devices"),
    }


def _assert_same(got, want, what):
    for key in ("loss", "train_error", "test_accuracy"):
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, err_msg=f"{what}: {key}")
    assert len(got["params"]) == len(want["params"]) and len(got["feedback"]) == len(want["feedback"])
    for block_got, block_want in zip(got["params"], want["params"]):
        for a, b in zip(block_got, block_want):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-13, err_msg=f"{what}: params")
    for a, b in zip(got["feedback"], want["feedback"]):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-13, err_msg=f"{what}: feedback (KP trains it)")


# ---------------------------------------------------------------------------------------------
# torch: 2 gloo processes


def _torch_rank(rank, world, out_root):
    """Every fit case, then `dfa train` into a folder and a resume of it, as a torchrun rank would."""
    fits = {f"{m}/{d}": _summary(_fit("torch", m, d)) for m, d in FIT_CASES}
    run_dir = os.path.join(out_root, "run")
    argv = ["train", "--dataset", "xor", "--layers", "2,6,4,1", "--backend", "torch", "--dtype", "float64"]
    argv += ["--batch-size", "2", "--lr", "0.3", "--no-plots", "--progress", "off", "--out", run_dir]
    assert cli.main([*argv, "--epochs", "2"]) == 0
    written_after_first = sorted(os.listdir(run_dir)) if rank == 0 else None
    assert cli.main(["train", "--resume", run_dir, "--epochs", "3", "--progress", "off"]) == 0
    return {"fits": fits, "written": written_after_first}


@pytest.fixture(scope="module")
def torch_launch(tmp_path_factory):
    """(each rank's results, the folder the launch wrote into)."""
    out_root = tmp_path_factory.mktemp("torchrun")
    return run_ranks(_torch_rank, 2, str(out_root)), out_root


@pytest.mark.parametrize("case", [f"{m}/{d}" for m, d in FIT_CASES])
def test_torch_fit_in_two_processes_equals_one(torch_launch, case):
    method, mode = case.split("/")
    want = _summary(_fit("torch", method, mode))
    assert want["devices"] is None
    for rank, result in enumerate(torch_launch[0]):
        got = result["fits"][case]
        assert got["devices"] == 2
        _assert_same(got, want, f"rank {rank} {case}")


def test_torchrun_train_writes_one_run_folder_and_resumes_exactly(torch_launch, tmp_path):
    """Rank 0 alone writes (config, history, checkpoint, metrics); the 2 + 1 epoch run resumed under
    the launch ends with the params of a 3-epoch run on one process."""
    ranks, out_root = torch_launch
    assert "checkpoint.npz" in ranks[0]["written"] and ranks[1]["written"] is None
    run_dir = out_root / "run"
    assert json.loads((run_dir / "config.json").read_text())["devices"] is None  # the launch's world
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    one = tmp_path / "one"
    argv = ["train", "--dataset", "xor", "--layers", "2,6,4,1", "--backend", "torch", "--dtype", "float64"]
    argv += ["--batch-size", "2", "--lr", "0.3", "--no-plots", "--progress", "off", "--epochs", "3"]
    assert cli.main([*argv, "--out", str(one)]) == 0
    with np.load(run_dir / "params.npz") as got, np.load(one / "params.npz") as want:
        assert sorted(got.files) == sorted(want.files)
        for key in want.files:
            np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=1e-13, err_msg=key)


# ---------------------------------------------------------------------------------------------
# JAX: 4 simulated devices, in one subprocess (this file run as a script)

JAX_DEVICES = 4


def _jax_main(out_root):
    """Every fit case on 4 devices and on 1 (and DFA with alignment angles); `dfa train --devices 4`
    for 2 epochs, resumed with --devices 2 to 3, against 3 epochs on one device."""
    import jax

    assert len(jax.devices()) == JAX_DEVICES
    cases = {}
    for method, mode in FIT_CASES:
        cases[f"{method}/{mode}"] = (
            _summary(_fit("jax", method, mode, devices=JAX_DEVICES)),
            _summary(_fit("jax", method, mode)),
        )
    angled = (
        _fit("jax", "dfa", "sample", align_every=2, devices=JAX_DEVICES),
        _fit("jax", "dfa", "sample", align_every=2),
    )
    angles = [[r.weights + r.deltas for r in h.alignment] for h in angled]
    argv = ["train", "--dataset", "xor", "--layers", "2,6,4,1", "--backend", "jax", "--dtype", "float64"]
    argv += ["--batch-size", "4", "--lr", "0.3", "--no-plots", "--progress", "off"]
    run_dir, one = os.path.join(out_root, "run"), os.path.join(out_root, "one")
    assert cli.main([*argv, "--devices", str(JAX_DEVICES), "--epochs", "2", "--out", run_dir]) == 0
    devices_recorded = json.load(open(os.path.join(run_dir, "config.json")))["devices"]
    assert cli.main(["train", "--resume", run_dir, "--epochs", "3", "--devices", "2", "--progress", "off"]) == 0
    assert cli.main([*argv, "--epochs", "3", "--out", one]) == 0
    with np.load(os.path.join(run_dir, "params.npz")) as got, np.load(os.path.join(one, "params.npz")) as want:
        worst = max(float(np.max(np.abs(got[k] - want[k]) / (np.abs(want[k]) + 1e-12))) for k in want.files)

    return {
        "cases": cases,
        "angles": angles,
        "devices_recorded": devices_recorded,
        "resume_worst_rel": worst,
    }


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    return run_on_simulated_devices(__file__, JAX_DEVICES, str(tmp_path_factory.mktemp("jaxdevices")))


@pytest.mark.parametrize("case", [f"{m}/{d}" for m, d in FIT_CASES])
def test_jax_fit_on_four_devices_equals_one(jax_run, case):
    many, one = jax_run["cases"][case]
    assert many["devices"] == JAX_DEVICES and one["devices"] is None
    _assert_same(many, one, f"jax {case}")


def test_jax_alignment_angles_on_four_devices_equal_one(jax_run):
    many, one = jax_run["angles"]
    assert len(many) == len(one) > 0
    np.testing.assert_allclose(many, one, rtol=1e-8, atol=1e-9)


def test_jax_train_devices_is_recorded_and_a_resume_may_change_it(jax_run):
    assert jax_run["devices_recorded"] == JAX_DEVICES
    assert jax_run["resume_worst_rel"] < 1e-10


# ---------------------------------------------------------------------------------------------
# Bad setups, refused before any data is touched


def test_torch_devices_outside_a_launch_names_torchrun():
    with pytest.raises(ValueError, match="torchrun --standalone --nproc-per-node 2"):
        _fit("torch", "dfa", "sample", devices=2)


def test_devices_must_be_a_positive_int():
    with pytest.raises(ValueError, match="devices"):
        _fit("jax", "dfa", "sample", devices=0)


def test_sweep_and_compare_refuse_a_torchrun_launch(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for command in ("sweep", "compare"):
        extra = ["--seeds", "0-1"] if command == "sweep" else []
        with pytest.raises(SystemExit):
            cli.main([command, "--dataset", "xor", "--layers", "2,4,1", "--epochs", "1", *extra])
        assert f"dfa {command} does not run under torchrun (WORLD_SIZE=2)" in capsys.readouterr().err


if __name__ == "__main__":  # the JAX subprocess of jax_run
    print(json.dumps(_jax_main(sys.argv[1])))
