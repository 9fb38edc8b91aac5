"""The ``dfa`` command: run folders, exact resume, Ctrl-C, non-finite loss, compare, summary, exit codes."""

import json
import os

import numpy as np
import pytest
from dfa_test_data import mnist_dir

from dfa_core import MLPSpec, init_feedback
from dfa_train import cli
from dfa_train import run as run_module
from dfa_train.checkpoint import load_checkpoint
from dfa_train.config import CONFIG_VERSION

SMALL_MNIST = [
    "--dataset",
    "mnist",
    "--layers",
    "784,16,10",
    "--limit-train",
    "300",
    "--limit-test",
    "100",
    "--batch-size",
    "50",
    "--lr",
    "1e-3",
    "--align-every",
    "3",
]
XOR = [
    "--dataset",
    "xor",
    "--layers",
    "2,4,1",
    "--batch-size",
    "2",
    "--lr",
    "0.5",
    "--align-every",
    "0",
    "--no-plots",
    "--dtype",
    "float64",
]


def _params(run_dir):
    with np.load(os.path.join(run_dir, "params.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_train_writes_a_complete_run_folder(tmp_path, backend):
    """config.json, one history record per epoch, metrics with the promised keys, checkpoint and PNGs."""
    out = tmp_path / "run"
    rc = cli.main(
        [
            "train",
            "--backend",
            backend,
            "--data-dir",
            str(mnist_dir()),
            "--epochs",
            "2",
            "--out",
            str(out),
            *SMALL_MNIST,
        ]
    )
    assert rc == 0
    files = set(os.listdir(out))
    assert {
        "config.json",
        "history.jsonl",
        "metrics.json",
        "checkpoint.npz",
        "training_curves.png",
        "confusion.png",
        "precision_recall.png",
        "alignment.png",
    } <= files
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
        m.setattr(run_module.Progress, "batch", interrupt)
        assert cli.main([*common, "--out", str(cut)]) == 130
    assert load_checkpoint(str(cut / "checkpoint.npz")).resume.epoch == 2
    assert cli.main(["train", "--resume", str(cut)]) == 0
    a, b = _params(straight), _params(cut)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    rc = cli.main(
        [
            "train",
            *XOR,
            "--dtype",
            "float32",
            "--output",
            "identity",
            "--lr",
            "1e30",
            "--epochs",
            "5",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == cli.EXIT_NONFINITE
    assert "training loss is" in capsys.readouterr().err
    ckpt = load_checkpoint(str(out / "checkpoint.npz"))
    assert ckpt.resume.epoch >= 1 and all(np.isfinite(ckpt.resume.loss))


def test_compare_runs_dfa_and_bp_from_the_same_weights(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = cli.main(["compare", "--data-dir", str(mnist_dir()), "--epochs", "1", "--out", str(out), *SMALL_MNIST])
    assert rc == 0
    assert "| DFA |" in capsys.readouterr().out
    assert {
        "summary.md",
        "summary.json",
        "training_curves.png",
        "confusion_dfa.png",
        "confusion_bp.png",
        "precision_recall.png",
        "dfa",
        "bp",
    } <= set(os.listdir(out))
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
    "method": (["train", "--method", "hebb"], "argument --method: expected rules among dfa, bp, fa"),
    "optimizer": (["train", "--optimizer", "rmsprop"], "'sgd', 'momentum', 'adam'"),
    "lr": (["train", "--lr", "-1"], "--lr"),
    "epochs": (["train", "--epochs", "0"], "--epochs"),
    # issue 9, item 11: these used to exit 1
    "momentum": (["train", "--dataset", "xor", "--momentum", "1.5"], "argument --momentum"),
    "tol_negative": (["train", "--dataset", "xor", "--tol", "-1"], "argument --tol"),
    "tol_nan": (["train", "--dataset", "xor", "--tol", "nan"], "argument --tol"),
    "diverge_factor": (["train", "--dataset", "xor", "--diverge-factor", "0.5"], "argument --diverge-factor"),
    "timeout": (["train", "--dataset", "xor", "--timeout", "0"], "argument --timeout"),
    "feedback_dist": (["train", "--feedback-dist", "cauchy"], "argument --feedback-dist: invalid choice"),
    "feedback_k_missing": (
        ["train", "--dataset", "xor", "--feedback-dist", "sparse"],
        "argument --feedback-k: expected an int >= 1 with feedback_dist 'sparse', got None",
    ),
    "feedback_k_too_big": (
        ["train", "--dataset", "xor", "--feedback-dist", "sparse", "--feedback-k", "2"],
        "argument --feedback-k: expected an int <= n_L = 1, got 2",
    ),
    "feedback_density_unused": (
        ["train", "--dataset", "xor", "--feedback-density", "0.5"],
        "argument --feedback-density: expected None with feedback_dist None (only ['ternary'] take it)",
    ),
    "feedback_density_range": (
        ["train", "--dataset", "xor", "--feedback-dist", "ternary", "--feedback-density", "2"],
        "argument --feedback-density: expected a number in (0, 1], got float 2.0",
    ),
    "feedback_rank": (["train", "--feedback-rank", "0"], "argument --feedback-rank: must be >= 1"),
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
    assert err.value.code == 2 and "grouping modes apply to ['dfa', 'drtp'] only" in capsys.readouterr().err


def test_train_with_a_feedback_preset_records_it_and_resumes(tmp_path):
    """--feedback-dist ternary with its density: config.json holds the preset and its options,
    the checkpoint holds init_feedback's matrices for them, and a resume keeps them."""
    out = tmp_path / "ternary"
    preset = ["--feedback-dist", "ternary", "--feedback-density", "0.5", "--feedback-scale", "0.3"]
    assert cli.main(["train", *XOR, "--layers", "2,6,4,1", *preset, "--epochs", "1", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["version"] == CONFIG_VERSION
    assert (config["feedback_dist"], config["feedback_density"], config["feedback_scale"]) == ("ternary", 0.5, 0.3)
    assert config["feedback_k"] is None and config["feedback_rank"] is None
    feedback = load_checkpoint(str(out / "checkpoint.npz")).feedback
    want = init_feedback(MLPSpec((2, 6, 4, 1), dtype="float64"), 1, "ternary", 0.3, density=0.5)
    assert len(feedback) == 2 and all(np.array_equal(f, w) for f, w in zip(feedback, want))
    assert set(np.unique(feedback[0])) == {-0.3, 0.0, 0.3} and (feedback[0] != 0).sum() == 3
    assert cli.main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    assert all(np.array_equal(f, w) for f, w in zip(load_checkpoint(str(out / "checkpoint.npz")).feedback, want))


def test_missing_data_fails_with_a_clear_message(tmp_path, capsys):
    rc = cli.main(["train", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    assert rc == 1 and "MNIST not found in" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Checkpoint cadence and signals


def _saved_epochs(monkeypatch):
    """Replaces run's save_checkpoint by one that also records the epoch of each write."""
    from dfa_train.checkpoint import save_checkpoint

    written = []

    def save(path, ckpt):
        written.append(ckpt.resume.epoch)
        save_checkpoint(path, ckpt)

    monkeypatch.setattr(run_module, "save_checkpoint", save)
    return written


@pytest.mark.parametrize(
    "every,epochs,expected",
    [
        ("2", 5, [0, 2, 4, 5]),  # every 2 epochs, and the end
        ("2", 4, [0, 2, 4]),  # the end is epoch 4: written once
        ("1", 3, [0, 1, 2, 3]),
        ("3600s", 4, [0, 4]),  # never due: the start and the end only
    ],
)
def test_checkpoint_every_writes_at_its_cadence_and_at_the_end(tmp_path, monkeypatch, every, epochs, expected):
    import signal

    written = _saved_epochs(monkeypatch)
    out = tmp_path / "run"
    assert cli.main(["train", *XOR, "--epochs", str(epochs), "--checkpoint-every", every, "--out", str(out)]) == 0
    assert written == expected
    assert load_checkpoint(str(out / "checkpoint.npz")).resume.epoch == epochs
    assert len((out / "history.jsonl").read_text().splitlines()) == epochs  # one line per epoch regardless
    assert json.loads((out / "config.json").read_text())["checkpoint_every"] == every
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handler is gone


@pytest.mark.parametrize("every", ["auto", "1000"])
def test_divergence_writes_the_last_finite_epoch_whatever_the_cadence(tmp_path, monkeypatch, every):
    """With writes due only at the start, a NaN loss still leaves the last finite epoch on disk."""
    written = _saved_epochs(monkeypatch)
    out = tmp_path / "nan"
    rc = cli.main(
        [
            "train",
            *XOR,
            "--dtype",
            "float32",
            "--output",
            "identity",
            "--lr",
            "1e30",
            "--epochs",
            "5",
            "--batch-size",
            "4",
            "--checkpoint-every",
            every,
            "--out",
            str(out),
        ]
    )
    assert rc == cli.EXIT_NONFINITE
    ckpt = load_checkpoint(str(out / "checkpoint.npz"))
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert ckpt.resume.epoch == len(history) >= 1 and written[-1] == ckpt.resume.epoch
    assert all(np.all(np.isfinite(a)) for pair in ckpt.params for a in pair)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "5x", "0s"])
def test_bad_checkpoint_every_exits_2_naming_the_option(value, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["train", *XOR, "--checkpoint-every", value])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "--checkpoint-every" in message and repr(value) in message


def test_a_signal_during_a_write_is_held_until_the_write_ends():
    import signal

    with run_module.Interrupts() as interrupts:
        with pytest.raises(KeyboardInterrupt):
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                finished_the_write = True
        assert finished_the_write
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            import time

            time.sleep(1)  # the handler runs between bytecodes; it never gets here
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_leaves_a_checkpoint_that_resumes_exactly(tmp_path):
    """SIGTERM to a running ``dfa train`` exits 130 with the last finished epoch checkpointed (history
    truncated to it); resuming to k + 3 epochs ends with the params of an uninterrupted k + 3 run."""
    import signal
    import subprocess
    import sys
    import time

    cut, straight = tmp_path / "cut", tmp_path / "straight"
    common = ["train", "--optimizer", "adam", "--lr", "0.05", *XOR]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dfa_train.cli", *common, "--epochs", "1000000", "--out", str(cut)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    history = cut / "history.jsonl"
    deadline = time.monotonic() + 120
    try:
        while not (history.is_file() and len(history.read_text().splitlines()) >= 30):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the run did not reach 30 epochs in 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == cli.EXIT_INTERRUPTED, err
    assert "dfa train --resume" in err
    k = load_checkpoint(str(cut / "checkpoint.npz")).resume.epoch
    assert k >= 30 and len(history.read_text().splitlines()) == k
    assert cli.main(["train", "--resume", str(cut), "--epochs", str(k + 3)]) == 0
    assert cli.main([*common, "--epochs", str(k + 3), "--out", str(straight)]) == 0
    a, b = _params(straight), _params(cut)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert (
        json.loads((cut / "metrics.json").read_text())["loss"]
        == json.loads((straight / "metrics.json").read_text())["loss"]
    )


def test_resume_refuses_a_changed_setting(tmp_path):
    from dfa_train.config import RunConfig
    from dfa_train.run import run

    config = RunConfig(
        dataset="xor", layers=(2, 4, 1), batch_size=2, lr=0.5, epochs=2, align_every=0, no_plots=True, dtype="float64"
    )
    run(config, str(tmp_path / "r"))
    with pytest.raises(ValueError, match="cannot resume with a different lr"):
        run(config.replace(lr=0.1, epochs=3), str(tmp_path / "r"), resume=True)
    result = run(config.replace(epochs=3, checkpoint_every="1"), str(tmp_path / "r"), resume=True)
    assert result.metrics["epochs_run"] == 3 and len(result.history.loss) == 3
    with pytest.raises(ValueError, match="already holds a run"):
        run(config, str(tmp_path / "r"))


# ---------------------------------------------------------------------------------------------
# Resume options and the offline fallback (issue 9, items 1 and 6)


@pytest.mark.parametrize("spelling", [["--epochs", "4"], ["--epochs=4"], ["--epoch", "4"], ["--epo=4"]])
def test_resume_reads_every_spelling_of_epochs_and_keeps_config_true(tmp_path, spelling):
    out = tmp_path / "r"
    assert cli.main(["train", *XOR, "--epochs", "2", "--out", str(out)]) == 0
    assert cli.main(["train", "--resume", str(out), *spelling]) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 4
    assert json.loads((out / "config.json").read_text())["epochs"] == 4


@pytest.mark.parametrize(
    "options,named",
    [
        (["--layers", "2,5,1"], "--layers"),
        (["--lr", "0.1", "--batch-size", "4"], "--batch-size, --lr"),
        (["--optimizer", "adam"], "--optimizer"),
    ],
)
def test_resume_refuses_options_that_would_change_the_run(tmp_path, capsys, options, named):
    out = tmp_path / "r"
    assert cli.main(["train", *XOR, "--epochs", "2", "--out", str(out)]) == 0
    before = (out / "config.json").read_text()
    with pytest.raises(SystemExit) as err:
        cli.main(["train", "--resume", str(out), "--epochs", "3", *options])
    assert err.value.code == 2 and f"cannot change on resume: {named}" in capsys.readouterr().err
    assert (out / "config.json").read_text() == before


@pytest.mark.parametrize(
    "files,says",
    [
        ((), "no config.json and checkpoint.npz in"),
        (("config.json",), "has config.json but no checkpoint.npz: a sweep member"),
        (("summary.json",), "holds a finished sweep (summary.json)"),
        (("sweep.json",), "holds an unfinished sweep; continue it with dfa sweep --resume"),
    ],
)
def test_resume_says_what_the_folder_holds_instead_of_a_checkpoint(tmp_path, capsys, files, says):
    for name in files:
        (tmp_path / name).write_text("{}")
    with pytest.raises(SystemExit) as err:
        cli.main(["train", "--resume", str(tmp_path)])
    assert err.value.code == 2 and says in capsys.readouterr().err


def test_resume_accepts_repeating_the_runs_own_options(tmp_path):
    out = tmp_path / "r"
    assert cli.main(["train", *XOR, "--epochs", "2", "--out", str(out)]) == 0
    assert cli.main(["train", "--resume", str(out), "--epochs", "3", "--lr", "0.5", "--layers", "2,4,1"]) == 0


def test_offline_without_mnist_trains_on_the_bundled_slice_and_says_so(tmp_path, monkeypatch, capsys):
    """No $DFA_DATA_DIR, an empty cache and no network: README's command still runs, on the slice,
    with a warning, and config.json records dataset 'mnist-slice' (a resume reads the same data)."""
    monkeypatch.delenv("DFA_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    out = tmp_path / "r"
    argv = ["train", "--no-download", "--layers", "784,8,10", "--epochs", "1", "--batch-size", "500"]
    rc = cli.main([*argv, "--align-every", "0", "--no-plots", "--out", str(out)])
    assert rc == 0
    assert "dfa: warning: " in capsys.readouterr().err  # said on stderr, once, without a traceback line
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "mnist-slice"
    assert json.loads((out / "metrics.json").read_text())["n_train"] == 2000


def test_weight_decay_reaches_the_optimizer_and_the_records(tmp_path):
    """--weight-decay is stored in config.json, shrinks the weights against the same run without it,
    and a resume keeps it."""
    runs = {}
    for label, extra in (("plain", []), ("decay", ["--weight-decay", "0.5"])):
        out = tmp_path / label
        argv = ["train", *XOR, "--layers", "2,6,4,1", "--epochs", "3", "--out", str(out), *extra]
        assert cli.main(argv) == 0
        runs[label] = out
    assert json.loads((runs["decay"] / "config.json").read_text())["weight_decay"] == 0.5
    assert json.loads((runs["plain"] / "config.json").read_text())["weight_decay"] == 0.0
    with np.load(runs["plain"] / "params.npz") as plain, np.load(runs["decay"] / "params.npz") as decay:
        assert np.linalg.norm(decay["W0"]) < np.linalg.norm(plain["W0"])
    assert cli.main(["train", "--resume", str(runs["decay"]), "--epochs", "4"]) == 0
    assert json.loads((runs["decay"] / "config.json").read_text())["weight_decay"] == 0.5
