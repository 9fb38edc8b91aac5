"""Where the tests find MNIST: $DFA_DATA_DIR, else ../shared/datasets/mnist from the repo root.

A missing folder fails the test that needs it, with a message saying where it looked;
nothing is skipped silently and nothing is downloaded.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from dfa_train.data import MNIST_FILES, load_mnist

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST_DIR = REPO_ROOT / ".." / "shared" / "datasets" / "mnist"


def mnist_dir() -> Path:
    """$DFA_DATA_DIR (the MNIST folder itself, or a folder holding ``mnist/``), else the default."""
    root = Path(os.environ.get("DFA_DATA_DIR", DEFAULT_MNIST_DIR))
    first_file = MNIST_FILES["train_images"][0]
    if not (root / first_file).is_file() and (root / "mnist" / first_file).is_file():
        return root / "mnist"
    return root


@functools.lru_cache(maxsize=None)
def _load(path: str, dtype: str):
    return load_mnist(path, dtype)


def mnist(dtype: str = "float32"):
    """MNIST (loaded once per session), or a test failure naming the folder that is missing."""
    path = mnist_dir()
    if not path.is_dir():
        pytest.fail(
            f"MNIST folder not found at {path}: set DFA_DATA_DIR to the folder holding "
            f"{', '.join(name for name, _, _ in MNIST_FILES.values())}",
            pytrace=False,
        )
    return _load(str(path), dtype)
