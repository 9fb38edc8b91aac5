"""``dfa sweep``: seeds parsing, one run folder per (lr, seed) member, summary statistics, the plot,
and members equal to single runs (through a loop of ``fit`` and through the real ``fit_many``)."""

import json
import os
import signal

import numpy as np
import pytest
from dfa_test_data import mnist_dir

import dfa_train
from dfa_train import cli
from dfa_train.config import RunConfig
from dfa_train.run import run
from dfa_train.sweep import members_of, parse_floats, parse_seeds, per_epoch_mean_std, setting_name
from dfa_train.trainer import fit

XOR = [
    "--dataset",
    "xor",
    "--layers",
    "2,4,1",
    "--batch-size",
    "2",
    "--align-every",
    "0",
    "--dtype",
    "float64",
    "--epochs",
    "6",
]
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
    "--align-every",
    "3",
    "--epochs",
    "2",
]


def _loop_fit_many(backend, spec, x_train, y_train, *, members, checkpoint_dir=None, progress=None, **fit_kwargs):
    """fit_many's contract, the slow way: one fit per member (not checkpointed)."""
    return tuple(fit(backend, spec, x_train, y_train, **{**fit_kwargs, **m}) for m in members)


@pytest.fixture
def loop_fit_many(monkeypatch):
    calls = []

    def fake(*args, **kwargs):
        calls.append(kwargs["members"])
        return _loop_fit_many(*args, **kwargs)

    monkeypatch.setattr(dfa_train, "fit_many", fake, raising=False)
    return calls


@pytest.mark.parametrize(
    "text,seeds",
    [
        ("0-7", tuple(range(8))),
        ("0,3,5", (0, 3, 5)),
        ("4", (4,)),
        ("2-4,9", (2, 3, 4, 9)),
        (" 1 , 2 ", (1, 2)),
        ("5-5", (5,)),
    ],
)
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "-1", "1-", "3-1", "1.5", "0-2-4", "1,,2", "1,1", "0-3,2"])
def test_parse_seeds_refuses(text):
    with pytest.raises(ValueError, match="invalid seeds"):
        parse_seeds(text)


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--seeds", "3-1"], "--seeds"),
        (["--seeds", "x"], "--seeds"),
        (["--seeds", "-2"], "--seeds"),
        (["--seeds", "1,1"], "--seeds"),
        (["--seeds", "0", "--lr", "1e-4,abc"], "--lr"),
        (["--seeds", "0", "--lr", "0"], "--lr"),
        (["--seeds", "0", "--lr", "1e-3,1e-3"], "--lr"),
        ([], "--seeds (or --resume DIR)"),  # required
    ],
)
def test_bad_sweep_arguments_exit_2_naming_the_option(argv, expected, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["sweep", *XOR, *argv])
    assert err.value.code == 2 and expected in capsys.readouterr().err


def test_parse_floats():
    assert parse_floats("1e-4,3e-4") == (1e-4, 3e-4)
    assert parse_floats("0.5") == (0.5,)


def test_members_map_one_seed_to_order_init_and_feedback(tmp_path):
    members = members_of(RunConfig(dataset="xor"), (0, 3), (1e-4, 0.5), str(tmp_path))
    assert [(m.setting, m.seed) for m in members] == [("lr=0.0001", 0), ("lr=0.0001", 3), ("lr=0.5", 0), ("lr=0.5", 3)]
    m = members[1]
    assert (m.config.seed, m.config.param_seed, m.config.feedback_seed, m.config.lr) == (3, 3, 4, 1e-4)
    assert m.run_dir == os.path.join(str(tmp_path), "lr=0.0001", "seed=3")
    assert setting_name(3e-05) == "lr=3e-05"


def test_per_epoch_mean_std_of_ragged_curves():
    """Members stopped early are shorter: each epoch's statistics use the members that reached it."""
    mean, std = per_epoch_mean_std([[0.1, 0.2, 0.3], [0.3, 0.4], [0.5, None, None]])
    np.testing.assert_allclose(mean, [0.3, 0.3, 0.3])
    np.testing.assert_allclose(std, [0.2, np.std([0.2, 0.4], ddof=1), 0.0])


def _read(path):
    return json.loads(path.read_text())


def test_sweep_writes_member_folders_summary_and_plot(tmp_path, capsys, loop_fit_many):
    """Two lrs x three seeds on XOR: six run folders, one fit_many call with six members, and a
    summary whose mean/std are those of the members' metrics."""
    out = tmp_path / "sweep"
    rc = cli.main(["sweep", *XOR, "--seeds", "0-2", "--lr", "0.5,0.1", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| lr=0.5 | 3 |" in printed and "| lr=0.1 | 3 |" in printed
    assert len(loop_fit_many) == 1 and len(loop_fit_many[0]) == 6
    assert {"summary.json", "sweep.png", "lr=0.5", "lr=0.1"} <= set(os.listdir(out))
    summary = _read(out / "summary.json")
    assert summary["seeds"] == [0, 1, 2] and summary["lrs"] == [0.5, 0.1]
    for setting in summary["settings"]:
        finals = []
        for member in setting["members"]:
            folder = out / member["dir"]
            assert {"config.json", "history.jsonl", "metrics.json", "params.npz"} <= set(os.listdir(folder))
            config = RunConfig.from_json((folder / "config.json").read_text())
            assert (config.seed, config.param_seed, config.feedback_seed) == (
                member["seed"],
                member["seed"],
                member["seed"] + 1,
            )
            assert config.lr == setting["lr"]
            metrics = _read(folder / "metrics.json")
            assert len((folder / "history.jsonl").read_text().splitlines()) == metrics["epochs_run"] == 6
            assert member["test_accuracy"] == metrics["test_accuracy"]
            finals.append(metrics["test_accuracy"])
        acc = setting["test_accuracy"]
        assert acc["mean"] == pytest.approx(np.mean(finals))
        assert acc["std"] == pytest.approx(np.std(finals, ddof=1))
        assert (acc["min"], acc["max"]) == (min(finals), max(finals))


def test_a_sweep_member_equals_the_single_run_of_its_config(tmp_path, loop_fit_many):
    """Member (lr, s) == ``dfa train --lr lr --seed s --param-seed s --feedback-seed s+1``: same per-epoch
    losses and errors, same final params (float64, through fit, exactly)."""
    out = tmp_path / "sweep"
    assert cli.main(["sweep", *XOR, "--seeds", "1,4", "--lr", "0.5", "--out", str(out)]) == 0
    member = out / "lr=0.5" / "seed=4"
    single = run(RunConfig.from_json((member / "config.json").read_text()), str(tmp_path / "single"))
    a = _read(member / "metrics.json")
    for key in ("loss", "train_error", "test_accuracy_per_epoch", "confusion"):
        assert a[key] == single.metrics[key], key
    with np.load(member / "params.npz") as p, np.load(tmp_path / "single" / "params.npz") as q:
        for key in p.files:
            np.testing.assert_array_equal(p[key], q[key])


def test_sweep_refuses_a_folder_that_holds_one(tmp_path, capsys, loop_fit_many):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", *XOR, "--seeds", "0", "--lr", "0.5", "--out", str(out), "--no-plots"]) == 0
    assert not (out / "sweep.png").exists()
    with pytest.raises(SystemExit) as err:
        cli.main(["sweep", *XOR, "--seeds", "0", "--out", str(out)])
    assert err.value.code == 2 and "already holds a sweep" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_sweep_through_the_real_fit_many_matches_the_loop_of_fits(tmp_path, backend, monkeypatch):
    """The same sweep (MNIST slice of 300, DFA with alignment) through dfa_train.fit_many and through a
    loop of fit: same member metrics (float64, rtol 1e-9) and params."""
    args = [
        "sweep",
        "--backend",
        backend,
        "--data-dir",
        str(mnist_dir()),
        *SMALL_MNIST,
        "--dtype",
        "float64",
        "--seeds",
        "0,1",
        "--lr",
        "1e-3,3e-3",
        "--no-plots",
    ]
    assert cli.main([*args, "--out", str(tmp_path / "many")]) == 0
    monkeypatch.setattr(dfa_train, "fit_many", _loop_fit_many)
    assert cli.main([*args, "--out", str(tmp_path / "loop")]) == 0
    for setting in ("lr=0.001", "lr=0.003"):
        for seed in (0, 1):
            a = _read(tmp_path / "many" / setting / f"seed={seed}" / "metrics.json")
            b = _read(tmp_path / "loop" / setting / f"seed={seed}" / "metrics.json")
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-9)
            assert a["train_error"] == b["train_error"] and a["confusion"] == b["confusion"]
            with (
                np.load(tmp_path / "many" / setting / f"seed={seed}" / "params.npz") as p,
                np.load(tmp_path / "loop" / setting / f"seed={seed}" / "params.npz") as q,
            ):
                for key in p.files:
                    np.testing.assert_allclose(p[key], q[key], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [["--method", "kp", "--kp-decay", "0.1"], ["--method", "dfa", "--noise", "additive", "--noise-sigma", "0.3"]],
    ids=["kp", "noisy-dfa"],
)
def test_a_sweep_of_another_rule_or_a_projection_equals_its_single_runs(tmp_path, options):
    """dfa sweep --method kp (with --kp-decay) and DFA with projection noise, through the real fit_many:
    member (lr, s) equals ``run`` of its config (float64, rtol 1e-9), which records the option."""
    out = tmp_path / "sweep"
    argv = ["sweep", *XOR, "--backend", "jax", "--dtype", "float64", "--seeds", "0,3", "--lr", "0.5", *options]
    assert cli.main([*argv, "--no-plots", "--out", str(out)]) == 0
    member = out / "lr=0.5" / "seed=3"
    config = RunConfig.from_json((member / "config.json").read_text())
    assert config.method == options[1] and (config.kp_decay == 0.1 or config.projection() is not None)
    single = run(config, str(tmp_path / "single"))
    a = _read(member / "metrics.json")
    np.testing.assert_allclose(a["loss"], single.metrics["loss"], rtol=1e-9)
    assert a["train_error"] == single.metrics["train_error"]
    with np.load(member / "params.npz") as p, np.load(tmp_path / "single" / "params.npz") as q:
        for key in p.files:
            np.testing.assert_allclose(p[key], q[key], rtol=1e-9, atol=1e-12)


def test_an_interrupted_sweep_resumes_to_the_summary_of_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    """SIGTERM in the third of six epochs leaves sweep.json and the checkpoint; `dfa sweep --resume`
    finishes the sweep, its summary and member metrics equal an uninterrupted sweep's (the real
    fit_many, float64), and removes the checkpoints; a finished sweep is not resumed."""
    import dfa_train.many as many

    argv = [*XOR, "--seeds", "0-1", "--lr", "0.5,0.1", "--no-plots", "--backend", "jax"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert cli.main(["sweep", *argv, "--out", str(straight)]) == 0
    record, seen = many._record_epoch, []

    def interrupt(spec, rec, m, epoch, *args):
        seen.append(epoch)
        if len(seen) == 9:  # 4 members a epoch: the first member's third epoch
            # the sweep's handler turns SIGTERM into KeyboardInterrupt (checked first: a default
            # handler would end the test process)
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster's scheduler stops a job
        return record(spec, rec, m, epoch, *args)

    monkeypatch.setattr(many, "_record_epoch", interrupt)
    rc = cli.main(["sweep", *argv, "--out", str(cut)])
    assert rc == cli.EXIT_INTERRUPTED
    assert f"continue with dfa sweep --resume {cut}" in capsys.readouterr().err
    assert (cut / "sweep.json").exists() and (cut / "checkpoints").is_dir() and not (cut / "summary.json").exists()
    resumed = []

    def counting(spec, rec, m, epoch, *args):
        resumed.append(epoch)
        return record(spec, rec, m, epoch, *args)

    monkeypatch.setattr(many, "_record_epoch", counting)
    with pytest.raises(SystemExit) as err:
        cli.main(["sweep", "--resume", str(cut), "--epochs", "3"])
    assert err.value.code == 2 and "takes no other option, got --epochs" in capsys.readouterr().err
    assert cli.main(["sweep", "--resume", str(cut), "--progress", "on"]) == 0
    assert "sweep dfa x4" in capsys.readouterr().err  # the bar
    assert not (cut / "checkpoints").exists()
    # it resumed (the first epoch is always checkpointed; 'auto' may have written later ones too)
    assert 0 < len(resumed) <= 4 * 5 and 0 not in resumed
    a, b = (json.loads((out / "summary.json").read_text()) for out in (cut, straight))
    assert json.dumps(a["settings"], sort_keys=True) == json.dumps(b["settings"], sort_keys=True)
    for setting in ("lr=0.5", "lr=0.1"):
        for seed in (0, 1):
            m_cut = json.loads((cut / setting / f"seed={seed}" / "metrics.json").read_text())
            m_ref = json.loads((straight / setting / f"seed={seed}" / "metrics.json").read_text())
            for key in ("loss", "train_error", "test_accuracy_per_epoch", "confusion", "epochs_run"):
                assert m_cut[key] == m_ref[key], key
    assert cli.main(["sweep", "--resume", str(cut)]) == cli.EXIT_FAILURE
    assert "holds a finished sweep (summary.json): nothing to resume" in capsys.readouterr().err
