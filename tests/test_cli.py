"""The ``dfa`` command: run folders, exact resume, Ctrl-C, non-finite loss, compare, summary, exit codes."""

import json
import os

import numpy as np
import pytest

from dfa_train import cli
from dfa_train.checkpoint import load_checkpoint

from dfa_test_data import mnist_dir

SMALL_MNIST = ["--dataset", "mnist", "--layers", "784,16,10", "--limit-train", "300", "--limit-test", "100",
               "--batch-size", "50", "--lr", "1e-3", "--align-every", "3"]
XOR = ["--dataset", "xor", "--layers", "2,4,1", "--batch-size", "2", "--lr", "0.5", "--align-every", "0",
       "--no-plots", "--dtype", "float64"]


def _params(run_dir):
    with np.load(os.path.join(run_dir, "params.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_train_writes_a_complete_run_folder(tmp_path, backend):
    """config.json, one history record per epoch, metrics with the promised keys, checkpoint and PNGs."""
    out = tmp_path / "run"
    rc = cli.main(["train", "--backend", backend, "--data-dir", str(mnist_dir()), "--epochs", "2", "--out", str(out),
                   *SMALL_MNIST])
    assert rc == 0
    files = set(os.listdir(out))
    assert {"config.json", "history.jsonl", "metrics.json", "checkpoint.npz", "training_curves.png",
            "confusion.png", "precision_recall.png", "alignment.png"} <= files
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and len(metrics["train_error"]) == len(metrics["loss"]) == 2
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["wall_s"] > 0 and metrics["samples_per_s"] > 0
    assert np.asarray(metrics["confusion"]).sum() == 100
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2] and history[0]["alignment"]
    config = json.loads((out / "config.json").read_text())
    assert config["backend"] == backend and config["layers"] == [784, 16, 10] and config["limit_train"] == 300


def test_resume_ends_with_the_params_of_an_uninterrupted_run(tmp_path):
    """4 epochs straight == 2 epochs, then ``--resume --epochs 4``: params equal exactly."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["train", "--optimizer", "adam", "--lr", "0.05", *XOR]
    assert cli.main([*common, "--epochs", "4", "--out", str(straight)]) == 0
    assert cli.main([*common, "--epochs", "2", "--out", str(split)]) == 0
    assert cli.main(["train", "--resume", str(split), "--epochs", "4"]) == 0
    a, b = _params(straight), _params(split)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    metrics = json.loads((split / "metrics.json").read_text())
    assert metrics["epochs_run"] == 4
    assert metrics["loss"] == json.loads((straight / "metrics.json").read_text())["loss"]


def test_ctrl_c_keeps_a_checkpoint_and_resume_finishes_the_run(tmp_path, monkeypatch):
    """KeyboardInterrupt in epoch 3 exits 130 with the epoch-2 checkpoint; resuming ends where
    an uninterrupted run ends."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    common = ["train", "--optimizer", "momentum", "--epochs", "4", *XOR]
    assert cli.main([*common, "--out", str(straight)]) == 0

    def interrupt(self, epoch, index, num_batches):
        if epoch == 2 and index == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(cli._Progress, "batch", interrupt)
        assert cli.main([*common, "--out", str(cut)]) == 130
    assert load_checkpoint(str(cut / "checkpoint.npz")).resume.epoch == 2
    assert cli.main(["train", "--resume", str(cut)]) == 0
    a, b = _params(straight), _params(cut)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    rc = cli.main(["train", *XOR, "--dtype", "float32", "--output", "identity", "--lr", "1e30", "--epochs", "5", "--batch-size", "4",
                   "--out", str(out)])
    assert rc == cli.EXIT_NONFINITE
    assert "training loss is" in capsys.readouterr().err
    ckpt = load_checkpoint(str(out / "checkpoint.npz"))
    assert ckpt.resume.epoch >= 1 and all(np.isfinite(ckpt.resume.loss))


def test_compare_runs_dfa_and_bp_from_the_same_weights(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = cli.main(["compare", "--data-dir", str(mnist_dir()), "--epochs", "1", "--out", str(out), *SMALL_MNIST])
    assert rc == 0
    assert "| DFA |" in capsys.readouterr().out
    assert {"summary.md", "summary.json", "training_curves.png", "confusion_dfa.png", "confusion_bp.png",
            "precision_recall.png", "dfa", "bp"} <= set(os.listdir(out))
    first = [load_checkpoint(str(out / m / "checkpoint.npz")) for m in ("dfa", "bp")]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"DFA", "BP"}
    assert json.loads((out / "bp" / "config.json").read_text())["mode"] == "sample"
    # Both runs start from param_seed's weights: their configs agree on it.
    assert all(c.meta["config"]["param_seed"] == 0 for c in first)


def test_summary_prints_the_model_table(capsys):
    assert cli.main(["summary", "--layers", "784,200,10"]) == 0
    out = capsys.readouterr().out
    assert "(200, 784)" in out and "159010" in out


BAD_ARGS = {
    "zero_width": (["summary", "--layers", "784,0,10"], "784,0,10"),
    "not_ints": (["train", "--layers", "784,a,10"], "784,a,10"),
    "one_width": (["summary", "--layers", "784"], "'784'"),
    "backend": (["train", "--backend", "numpy"], "choose from 'torch', 'jax'"),
    "method": (["train", "--method", "hebb"], "choose from 'dfa', 'bp'"),
    "optimizer": (["train", "--optimizer", "rmsprop"], "'sgd', 'momentum', 'adam'"),
    "lr": (["train", "--lr", "-1"], "--lr"),
    "epochs": (["train", "--epochs", "0"], "--epochs"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_exit_2_naming_the_value(case, capsys):
    argv, expected = BAD_ARGS[case]
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2
    assert expected in capsys.readouterr().err


def test_bad_combinations_exit_2(tmp_path, capsys):
    """Widths that do not fit the data, and a grouping mode with BP, exit 2 with a message."""
    with pytest.raises(SystemExit) as err:
        cli.main(["train", *XOR, "--layers", "3,4,1", "--out", str(tmp_path / "a")])
    assert err.value.code == 2 and "first width must be 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        cli.main(["train", *XOR, "--method", "bp", "--mode", "class_mean", "--out", str(tmp_path / "b")])
    assert err.value.code == 2 and "DFA only" in capsys.readouterr().err


def test_missing_data_fails_with_a_clear_message(tmp_path, capsys):
    rc = cli.main(["train", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    assert rc == 1 and "MNIST not found in" in capsys.readouterr().err
