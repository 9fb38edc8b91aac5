"""Layer-parallel DFA through the application: fit(stages=...), `dfa train --stages S` and torchrun launches.

Each case trains the same float64 run on one device and over stages, and asserts the histories and
final params agree (rtol 1e-10): JAX on 4 simulated CPU devices in one subprocess (JAX fixes its
device count when it starts), torch in 2 gloo processes (``dist_helpers.run_ranks``, one spawn for
all its cases; rank 0 alone writes the run folder). The engines themselves are tested in
test_layer_parallel.py.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from dist_helpers import run_on_simulated_devices, run_ranks

from dfa_core import MLPSpec, OptimizerSpec
from dfa_core.hardware import Projection
from dfa_train import cli
from dfa_train.config import ConfigError, RunConfig
from dfa_train.trainer import fit

RTOL = 1e-10
SPEC = MLPSpec((6, 8, 7, 5, 3), activation="tanh", output="softmax", reduction="mean", dtype="float64")
N, BATCH, EPOCHS = 26, 9, 2  # a ragged last batch of 8 rows: 3 micro-batches do not divide it (2 do)
JAX_CASES = ((2, 1, "sample"), (4, 3, "sample"), (2, 3, "class_mean"))  # (stages, microbatches, mode)
TORCH_CASES = ((2, 1, "sample"), (2, 3, "batch_mean"))
XOR = ["train", "--dataset", "xor", "--layers", "2,6,4,1", "--dtype", "float64", "--batch-size", "2"]
XOR += ["--lr", "0.3", "--no-plots", "--progress", "off"]


def _data():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, 6))
    y = np.eye(3)[rng.integers(0, 3, N)]
    return x, y


def _fit(backend, mode="sample", **kwargs):
    x, y = _data()
    return fit(
        backend,
        SPEC,
        x,
        y,
        x_test=x[:7],
        y_test=y[:7],
        method="dfa",
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
        "stages": history.config.get("stages"),
        "microbatches": history.config.get("microbatches"),
    }


def _assert_same(got, want, what):
    for key in ("loss", "train_error", "test_accuracy"):
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, err_msg=f"{what}: {key}")
    assert len(got["params"]) == len(want["params"]) == SPEC.num_layers
    for block_got, block_want in zip(got["params"], want["params"]):
        for a, b in zip(block_got, block_want):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-13, err_msg=f"{what}: params")


def _worst_rel(run_dir, one_dir):
    """The largest relative difference between two run folders' params.npz."""
    with np.load(os.path.join(run_dir, "params.npz")) as got, np.load(os.path.join(one_dir, "params.npz")) as want:
        assert sorted(got.files) == sorted(want.files)
        return max(float(np.max(np.abs(got[k] - want[k]) / (np.abs(want[k]) + 1e-12))) for k in want.files)


def _case(stages, microbatches, mode):
    return f"{stages}x{microbatches}/{mode}"


# ---------------------------------------------------------------------------------------------
# JAX: 4 simulated devices, in one subprocess (this file run as a script)

JAX_DEVICES = 4


def _jax_main(out_root):
    """Every fit case over stages and on one device; `dfa train --stages 2 --microbatches 2` for 2
    epochs, resumed to 3, against 3 epochs on one device."""
    import jax

    assert len(jax.devices()) == JAX_DEVICES
    ones = {mode: _summary(_fit("jax", mode)) for mode in {m for _, _, m in JAX_CASES}}
    cases = {
        _case(s, m, mode): (_summary(_fit("jax", mode, stages=s, microbatches=m)), ones[mode])
        for s, m, mode in JAX_CASES
    }
    argv = [*XOR, "--backend", "jax", "--align-every", "0"]
    run_dir, one = os.path.join(out_root, "run"), os.path.join(out_root, "one")
    assert cli.main([*argv, "--stages", "2", "--microbatches", "2", "--epochs", "2", "--out", run_dir]) == 0
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert cli.main(["train", "--resume", run_dir, "--epochs", "3", "--progress", "off"]) == 0
    assert cli.main([*argv, "--epochs", "3", "--out", one]) == 0
    epochs = [json.loads(line)["epoch"] for line in open(os.path.join(run_dir, "history.jsonl"))]
    return {
        "cases": cases,
        "recorded": [config["stages"], config["microbatches"]],
        "epochs": epochs,
        "resume_worst_rel": _worst_rel(run_dir, one),
    }


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    return run_on_simulated_devices(__file__, JAX_DEVICES, str(tmp_path_factory.mktemp("jaxstages")))


@pytest.mark.parametrize("case", [_case(*c) for c in JAX_CASES])
def test_jax_fit_over_stages_equals_one_device(jax_run, case):
    layered, one = jax_run["cases"][case]
    stages, microbatches = (int(v) for v in case.split("/")[0].split("x"))
    assert (layered["stages"], layered["microbatches"]) == (stages, microbatches)
    assert one["stages"] is None and one["microbatches"] is None
    _assert_same(layered, one, f"jax {case}")


def test_jax_train_stages_is_recorded_and_resumes_exactly(jax_run):
    assert jax_run["recorded"] == [2, 2]
    assert jax_run["epochs"] == [1, 2, 3]
    assert jax_run["resume_worst_rel"] < RTOL


# ---------------------------------------------------------------------------------------------
# torch: 2 gloo processes


def _torch_rank(rank, world, out_root):
    """Every fit case with stages=2, then `dfa train --stages 2` into a folder and a resume of it."""
    fits = {_case(s, m, mode): _summary(_fit("torch", mode, stages=s, microbatches=m)) for s, m, mode in TORCH_CASES}
    run_dir = os.path.join(out_root, "run")
    assert cli.main([*XOR, "--backend", "torch", "--stages", "2", "--epochs", "2", "--out", run_dir]) == 0
    written_after_first = sorted(os.listdir(run_dir)) if rank == 0 else None
    assert cli.main(["train", "--resume", run_dir, "--epochs", "3", "--progress", "off"]) == 0
    return {"fits": fits, "written": written_after_first}


@pytest.fixture(scope="module")
def torch_launch(tmp_path_factory):
    """(each rank's results, the folder the launch wrote into)."""
    out_root = tmp_path_factory.mktemp("torchstages")
    return run_ranks(_torch_rank, 2, str(out_root)), out_root


@pytest.mark.parametrize("case", [_case(*c) for c in TORCH_CASES])
def test_torch_fit_over_two_processes_equals_one(torch_launch, case):
    mode = case.split("/")[1]
    want = _summary(_fit("torch", mode))
    for rank, result in enumerate(torch_launch[0]):
        got = result["fits"][case]
        assert got["stages"] == 2
        _assert_same(got, want, f"rank {rank} {case}")


def test_torchrun_train_stages_writes_one_run_folder_and_resumes_exactly(torch_launch, tmp_path):
    """Rank 0 alone writes; the 2 + 1 epoch run resumed under the launch ends with the params of a
    3-epoch run in one process."""
    ranks, out_root = torch_launch
    assert "checkpoint.npz" in ranks[0]["written"] and ranks[1]["written"] is None
    run_dir = out_root / "run"
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["stages"], config["microbatches"], config["align_every"]) == (2, None, 0)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    one = tmp_path / "one"
    assert cli.main([*XOR, "--backend", "torch", "--epochs", "3", "--out", str(one)]) == 0
    assert _worst_rel(str(run_dir), str(one)) < RTOL


# ---------------------------------------------------------------------------------------------
# Bad setups, refused before any data is touched


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "bp"}, "method 'dfa' only"),
        ({"devices": 2}, "data-parallel training .* together are not supported"),
        ({"engine": "step"}, "use engine='epoch'"),
        ({"align_every": 5}, "use align_every=0"),
        ({"projection": Projection(quantize="sign")}, "projection"),
        ({"microbatches": 2}, "batch_size=9 is not divisible by microbatches=2"),
        ({"stages": None, "microbatches": 3}, "set stages >= 2"),
    ],
)
def test_fit_refuses_what_layer_parallel_cannot_train(kwargs, message):
    x, y = _data()
    options = {"method": "dfa", "stages": 2, "batch_size": BATCH, "epochs": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        fit("jax", SPEC, x, y, **options)


def test_torch_stages_outside_a_launch_names_torchrun():
    with pytest.raises(ValueError, match="torchrun --standalone --nproc-per-node 2"):
        _fit("torch", stages=2)


def test_run_config_checks_stages_and_microbatches():
    assert RunConfig(stages=2, microbatches=4).stages == 2
    for fields, field in (
        ({"microbatches": 2}, "microbatches"),
        ({"stages": 2, "method": "bp"}, "stages"),
        ({"stages": 2, "devices": 2}, "stages"),
        ({"stages": 0}, "stages"),
    ):
        with pytest.raises(ConfigError) as err:
            RunConfig(**fields)
        assert err.value.field == field


def test_cli_parses_stages_and_microbatches_and_a_resume_may_change_them():
    assert "stages" in cli._RESUME_SETTABLE and "microbatches" in cli._RESUME_SETTABLE
    parser = cli.build_parser()
    args = parser.parse_args([*XOR, "--stages", "3", "--microbatches", "2"])
    assert (args.stages, args.microbatches) == (3, 2)


if __name__ == "__main__":  # the JAX subprocess of jax_run
    print(json.dumps(_jax_main(sys.argv[1])))
