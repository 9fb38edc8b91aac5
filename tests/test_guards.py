"""Divergence and memory guards (issue 9, items 3, 8 and 10): a diverged run stops with exit 3 and
leaves its last finite state; a run that cannot fit is refused before anything is allocated."""

import json

import numpy as np
import pytest

from dfa_core import MLPSpec, OptimizerSpec
from dfa_train import cli, fit, memory
from dfa_train.checkpoint import load_checkpoint
from dfa_train.state import LossExplodedError, NonFiniteLossError

SPEC = MLPSpec((8, 16, 3), dtype="float64")


def _data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    return x, np.eye(3)[rng.integers(0, 3, n)]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_finite_but_exploding_loss_stops_at_the_factor(backend):
    """lr 1e3 keeps the loss finite but far above where it started: diverge_factor stops it, naming
    the loss and the initial loss; without the guard the same run goes on to the end."""
    x, y = _data()
    kwargs = dict(optimizer=OptimizerSpec("sgd", 1e3), epochs=4, batch_size=40, stop_on_nonfinite=True)
    with pytest.raises(LossExplodedError) as info:
        fit(backend, SPEC, x, y, diverge_factor=50.0, **kwargs)
    err = info.value
    assert err.loss > 50 * err.reference and np.isfinite(err.loss)
    assert "over 50 times the initial per-sample loss" in str(err)
    unguarded = fit(backend, SPEC, x, y, **kwargs)
    assert unguarded.epochs_run == 4 and max(unguarded.loss) > 50 * err.reference


def test_the_initial_loss_is_the_first_batch_before_any_update():
    """The guard's yardstick is the per-sample loss of the first batch at the initial params; a resumed
    run keeps it (ResumeState.reference_loss), so resuming does not move the yardstick."""
    x, y = _data()
    seen = []
    fit("jax", SPEC, x, y, epochs=2, batch_size=40, on_epoch=seen.append)
    from dfa_core import get_backend, init_params

    be = get_backend("jax")
    order = np.random.default_rng(0).permutation(120)[:40]
    first = float(be.loss(SPEC, init_params(SPEC, 0), x[order], y[order])) / 40
    assert seen[0].resume.reference_loss == pytest.approx(first, rel=1e-12)
    assert seen[1].resume.reference_loss == seen[0].resume.reference_loss


def test_overflowed_params_stop_even_when_the_loss_was_finite():
    """The loss is measured before each update, so params can overflow while the epoch's loss looks
    finite: stop_on_nonfinite checks the params too."""
    x, y = _data()
    with pytest.raises(NonFiniteLossError, match="params overflowed"):
        fit(
            "torch",
            MLPSpec((8, 16, 3)),
            x,
            y,
            optimizer=OptimizerSpec("sgd", 1e38),
            epochs=2,
            batch_size=120,
            stop_on_nonfinite=True,
        )


@pytest.mark.parametrize("factor", [1.0, 0.5, -3, float("nan"), True])
def test_bad_diverge_factor(factor):
    x, y = _data()
    with pytest.raises(ValueError, match="diverge_factor"):
        fit("torch", SPEC, x, y, epochs=1, diverge_factor=factor)


def test_cli_divergence_exits_3_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    """The issue's reproduction, on XOR: lr 1e38 makes the run diverge. Exit 3, and the
    checkpoint on disk is the finite epoch-0 state, which resumes."""
    out = tmp_path / "dv"
    argv = [
        "train",
        "--dataset",
        "xor",
        "--layers",
        "2,4,1",
        "--batch-size",
        "4",
        "--lr",
        "1e38",
        "--epochs",
        "3",
        "--align-every",
        "0",
        "--no-plots",
        "--progress",
        "off",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 3
    assert "training stopped" in capsys.readouterr().err
    ckpt = load_checkpoint(str(out / "checkpoint.npz"))
    assert all(np.all(np.isfinite(a)) for pair in ckpt.params for a in pair)


def test_cli_guard_can_be_switched_off(tmp_path, capsys):
    base = [
        "train",
        "--dataset",
        "xor",
        "--layers",
        "2,4,1",
        "--batch-size",
        "1",
        "--lr",
        "3e3",
        "--epochs",
        "3",
        "--align-every",
        "0",
        "--no-plots",
        "--progress",
        "off",
        "--dtype",
        "float64",
    ]
    assert cli.main([*base, "--diverge-factor", "2", "--out", str(tmp_path / "a")]) == 3
    assert "divergence guard" in capsys.readouterr().err
    assert cli.main([*base, "--diverge-factor", "0", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["diverge_factor"] == 0.0


def test_a_run_too_large_for_memory_is_refused_before_allocating(tmp_path, monkeypatch, capsys):
    """The estimate is checked against free memory before params are drawn: exit 1, nothing written."""
    monkeypatch.setattr(memory, "available_memory", lambda backend: (10**6, "test host"))
    out = tmp_path / "big"
    argv = ["train", "--dataset", "xor", "--layers", "2,100000,1", "--epochs", "1", "--no-plots", "--out", str(out)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "would need about" in err and "test host has 1,000,000 bytes" in err
    assert not out.exists()
    with pytest.raises(MemoryError, match="would need about"):
        fit("torch", MLPSpec((2, 100000, 1)), np.zeros((4, 2)), np.zeros((4, 1)), epochs=1)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_fit_refuses_non_finite_initial_params(backend):
    from dfa_core import init_params

    params = [list(p) for p in init_params(SPEC)]
    params[1][0][0, 0] = np.nan
    x, y = _data()
    with pytest.raises(ValueError, match="params W_2 has non-finite values"):
        fit(backend, SPEC, x, y, params=tuple(map(tuple, params)), epochs=1)
