"""Run folders (issue 9, items 4, 5, 7, 10, 12, 13): one run at a time, nothing of the user's
overwritten, no debris after a failed start, clear errors and honest messages."""

import fcntl
import json
import os
import socket
import threading

import pytest

from dfa_train import cli, data
from dfa_train import run as run_module

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
    "--progress",
    "off",
]


def _exit_code(argv):
    try:
        return cli.main(argv)
    except SystemExit as err:  # argparse's parser.error
        return err.code


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, capsys):
    """While a run holds the folder's lock, another is refused (exit 2) and changes nothing; once the
    holder is gone (the OS drops a dead process's lock), the folder is usable again."""
    out = tmp_path / "r"
    assert cli.main(["train", *XOR, "--epochs", "1", "--out", str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in ("config.json", "history.jsonl", "checkpoint.npz")}
    with open(out / ".lock", "a+") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert _exit_code(["train", "--resume", str(out), "--epochs", "3"]) == 2
        assert "in use by another dfa run" in capsys.readouterr().err
        assert {name: (out / name).read_bytes() for name in before} == before
    assert cli.main(["train", "--resume", str(out), "--epochs", "3"]) == 0


def test_two_runs_started_together_do_not_mix(tmp_path):
    """Two threads racing into one folder: exactly one trains, the other is refused."""
    out = tmp_path / "r"
    codes = []

    def start():
        codes.append(_exit_code(["train", *XOR, "--epochs", "30", "--out", str(out)]))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [0, 2]
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 31))


@pytest.mark.parametrize("names", [["config.json"], ["history.jsonl", "metrics.json"], ["notes.txt"]])
def test_a_folder_holding_the_users_files_is_never_written(tmp_path, capsys, names):
    out = tmp_path / "r"
    out.mkdir()
    for name in names:
        (out / name).write_text("mine")
    assert _exit_code(["train", *XOR, "--epochs", "1", "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == sorted(names)
    assert all((out / name).read_text() == "mine" for name in names)


def test_compare_refuses_a_train_run_folder(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["train", *XOR, "--epochs", "1", "--out", str(out)]) == 0
    before = sorted(os.listdir(out))
    assert _exit_code(["compare", *XOR, "--epochs", "1", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before


def test_out_that_is_a_file_or_unwritable(tmp_path, monkeypatch, capsys):
    (tmp_path / "f").write_text("x")
    assert _exit_code(["train", *XOR, "--epochs", "1", "--out", str(tmp_path / "f")]) == 2
    assert "is a file, expected a folder" in capsys.readouterr().err
    # The machine's root ignores folder permissions, so the OS's refusal is simulated.
    import errno

    def refuse(path, exist_ok=False):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "makedirs", refuse)
    assert _exit_code(["train", *XOR, "--epochs", "1", "--out", str(tmp_path / "ro" / "r")]) == 1
    assert "cannot create the run folder" in capsys.readouterr().err


def test_a_failed_start_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """A run that fails before its first epoch (here: the trainer raises) removes the folder it made,
    and in a folder the user made empty it removes only its own files; the rerun then works."""

    def broken(*args, **kwargs):
        raise ValueError("simulated failure before the first epoch")

    monkeypatch.setattr(run_module, "_train", broken)
    out = tmp_path / "new" / "r"
    assert _exit_code(["train", *XOR, "--epochs", "1", "--out", str(out)]) == 1
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _exit_code(["train", *XOR, "--epochs", "1", "--out", str(empty)]) == 1
    assert os.listdir(empty) == []
    assert "simulated failure" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli.main(["train", *XOR, "--epochs", "1", "--out", str(out)]) == 0


@pytest.mark.parametrize(
    "device,backend,named",
    [
        ("tpu", "torch", "torch device 'tpu' is not available"),
        ("cuda", "torch", "torch device 'cuda' is not available"),
        ("gpu", "jax", "JAX platform 'gpu' is not available"),
    ],
)
def test_unavailable_devices_exit_2_before_any_folder(tmp_path, capsys, device, backend, named):
    pytest.importorskip("torch")
    import torch

    if backend == "torch" and device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "r"
    assert _exit_code(["train", *XOR, "--backend", backend, "--device", device, "--out", str(out)]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_class_mean_on_xor_is_a_bad_input_before_any_folder(tmp_path, capsys):
    out = tmp_path / "r"
    assert _exit_code(["train", *XOR, "--mode", "class_mean", "--out", str(out)]) == 2
    assert "needs one-hot targets" in capsys.readouterr().err
    assert not out.exists()


def test_ctrl_c_before_anything_is_saved_says_so(tmp_path, monkeypatch, capsys):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "load_data", interrupted)
    out = tmp_path / "r"
    assert cli.main(["train", *XOR, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "nothing was kept" in err and "--resume" not in err
    assert not out.exists()


def test_an_interrupted_comparison_resumes(tmp_path, monkeypatch, capsys):
    """Ctrl-C during BP: the message names 'dfa compare --resume OUT'; resuming keeps the finished DFA
    run, finishes BP and writes the summary, equal to an uninterrupted comparison."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert cli.main(["compare", *XOR, "--epochs", "3", "--out", str(straight)]) == 0
    real_train = run_module._train

    def stop_during_bp(config, data, params, feedback, state, on_epoch, bar):
        if config.method == "bp":

            def on_epoch_then_stop(e):
                on_epoch(e)
                raise KeyboardInterrupt

            return real_train(config, data, params, feedback, state, on_epoch_then_stop, bar)
        return real_train(config, data, params, feedback, state, on_epoch, bar)

    monkeypatch.setattr(run_module, "_train", stop_during_bp)
    assert cli.main(["compare", *XOR, "--epochs", "3", "--out", str(cut)]) == 130
    assert f"dfa compare --resume {cut}" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli.main(["compare", "--resume", str(cut)]) == 0
    a = json.loads((straight / "summary.json").read_text())["results"]
    b = json.loads((cut / "summary.json").read_text())["results"]
    for label in ("DFA", "BP"):
        assert a[label]["loss"] == b[label]["loss"] and a[label]["epochs_run"] == b[label]["epochs_run"] == 3


def test_stray_temporaries_are_removed_when_the_folder_is_opened(tmp_path):
    out = tmp_path / "r"
    assert cli.main(["train", *XOR, "--epochs", "1", "--out", str(out)]) == 0
    (out / ".tmp-x1y2checkpoint.npz").write_bytes(b"half a checkpoint")
    assert cli.main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_a_silent_mirror_is_announced_and_times_out(tmp_path, monkeypatch, capsys):
    """A server that accepts and never answers: the command says what it is trying, with the wait,
    and gives up after --timeout seconds (then falls back to the bundled slice)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    monkeypatch.delenv("DFA_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    monkeypatch.setenv(data.MIRROR_ENV, f"http://127.0.0.1:{port}/")
    try:
        argv = ["train", "--timeout", "0.3", "--layers", "784,4,10", "--epochs", "1", "--batch-size", "1000"]
        rc = cli.main([*argv, "--align-every", "0", "--no-plots", "--progress", "off", "--out", str(tmp_path / "r")])
    finally:
        server.close()
    assert rc == 0
    err = capsys.readouterr().err
    assert f"dfa: downloading http://127.0.0.1:{port}/" in err and "waits up to 0.3 s" in err
    assert "dfa: warning: " in err and "bundled slice" in err


@pytest.mark.parametrize("damage", ["cut_last_line", "missing", "garbage"])
def test_a_damaged_history_is_rebuilt_from_the_checkpoint_on_resume(tmp_path, damage):
    """history.jsonl cut mid-line by a crash, deleted, or overwritten: resume still works, and the
    history again has one record per epoch, with the losses the checkpoint kept."""
    straight, out = tmp_path / "straight", tmp_path / "r"
    assert cli.main(["train", *XOR, "--epochs", "4", "--out", str(straight)]) == 0
    assert cli.main(["train", *XOR, "--epochs", "2", "--out", str(out)]) == 0
    path = out / "history.jsonl"
    if damage == "cut_last_line":
        path.write_text(path.read_text()[:-15])
    elif damage == "missing":
        path.unlink()
    else:
        path.write_text("not json at all\n")
    assert cli.main(["train", "--resume", str(out), "--epochs", "4"]) == 0
    records = [json.loads(line) for line in path.read_text().splitlines()]
    expected = [json.loads(line) for line in (straight / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == [r["loss"] for r in expected]


@pytest.mark.parametrize(
    "text,named",
    [
        ("{not json", "config.json"),
        ('{"version": 1}', "config.json"),
    ],
)
def test_a_damaged_config_names_the_file(tmp_path, capsys, text, named):
    out = tmp_path / "r"
    assert cli.main(["train", *XOR, "--epochs", "1", "--out", str(out)]) == 0
    (out / "config.json").write_text(text)
    assert _exit_code(["train", "--resume", str(out), "--epochs", "2"]) == 1
    assert named in capsys.readouterr().err
