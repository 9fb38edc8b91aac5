"""The examples run: xor.py and mnist.py as scripts, the tutorial notebook through a Jupyter kernel,
each on a small slice of MNIST."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dfa_test_data import mnist_dir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _env(**extra):
    env = dict(os.environ, DFA_DATA_DIR=str(mnist_dir()), MPLBACKEND="Agg", **extra)
    return env


def test_xor_example_solves_xor():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "xor.py"), "--backend", "torch"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr
    assert "XOR by DFA on torch: 4/4 correct" in out.stdout


def test_mnist_example_compares_dfa_and_bp(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "mnist.py"),
            "--backend",
            "jax",
            "--limit",
            "400",
            "--epochs",
            "1",
            "--hidden",
            "16",
            "--lr",
            "1e-3",
            "--out",
            str(tmp_path / "cmp"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr
    assert "| DFA |" in out.stdout and "| BP |" in out.stdout
    assert (tmp_path / "cmp" / "training_curves.png").is_file()


def test_tutorial_notebook_runs(tmp_path):
    """Every cell of the tutorial runs on 400 samples, 1 epoch, and writes its four figures."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(str(EXAMPLES / "framework_tutorial.ipynb"), as_version=4)
    figures = tmp_path / "figures"
    env = {"DFA_TUTORIAL_LIMIT": "400", "DFA_TUTORIAL_EPOCHS": "1", "DFA_TUTORIAL_OUT": str(figures)}
    old = {k: os.environ.get(k) for k in list(env) + ["DFA_DATA_DIR", "MPLBACKEND"]}
    os.environ.update(_env(**env))
    try:
        client = nbclient.NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert {p.name for p in figures.iterdir()} == {
        "training_curves.png",
        "confusion_dfa.png",
        "precision_recall.png",
        "alignment.png",
    }
