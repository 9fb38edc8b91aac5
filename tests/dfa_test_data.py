"""Where the tests find MNIST: the full set if one is at hand, else the slice bundled with the package.

Full MNIST is looked for in $DFA_DATA_DIR (the folder or its ``mnist/``), the user cache
(``dfa_train.data.cache_dir()/mnist``) and ``../shared/datasets/mnist`` beside the repo; nothing is
downloaded. Without it the tests run on the bundled 2,000/500 slice (``dfa_train.data.MNIST_SLICE_DIR``), and tests
marked ``@pytest.mark.full_mnist`` are skipped by conftest.py with ``FULL_MNIST_MISSING`` as reason.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

from dfa_train.data import (
    DATA_DIR_ENV,
    DatasetNotFoundError,
    cache_dir,
    find_mnist,
    find_mnist_slice,
    is_mnist_slice,
    load_mnist,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST_DIR = REPO_ROOT / ".." / "shared" / "datasets" / "mnist"

FULL_MNIST_MISSING = (
    f"needs full MNIST (60,000/10,000), and only the bundled 2,000/500 slice is here: set {DATA_DIR_ENV} "
    "to a folder holding the four MNIST .gz files, or fill the cache with "
    "`python -c 'from dfa_train.data import find_mnist; find_mnist()'` (downloads)"
)


def _candidates() -> list:
    env = os.environ.get(DATA_DIR_ENV)
    return ([env] if env else []) + [os.path.join(cache_dir(), "mnist"), str(DEFAULT_MNIST_DIR)]


def full_mnist_dir() -> Optional[Path]:
    """The first folder of ``_candidates()`` holding full MNIST (not the slice), else None."""
    for candidate in _candidates():
        try:
            folder = find_mnist(candidate, download=False)
        except DatasetNotFoundError:
            continue
        if not is_mnist_slice(folder):
            return Path(folder)
    return None


def mnist_dir() -> Path:
    """The MNIST folder the tests use: ``full_mnist_dir()``, else the bundled slice's folder."""
    full = full_mnist_dir()
    return full if full is not None else Path(find_mnist_slice())


def mnist_is_full() -> bool:
    """Whether ``mnist_dir()`` is full MNIST (60,000/10,000) rather than the 2,000/500 slice."""
    return full_mnist_dir() is not None


@functools.lru_cache(maxsize=None)
def _load(path: str, dtype: str):
    return load_mnist(path, dtype)


def mnist(dtype: str = "float32"):
    """MNIST from ``mnist_dir()``, loaded once per session: N = 60000/10000, or 2000/500 on the slice."""
    return _load(str(mnist_dir()), dtype)
