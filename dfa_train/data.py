"""Small datasets for tests and experiments: MNIST (or any IDX dataset) from gzip IDX files, and XOR.

NumPy and the standard library only. ``load_mnist`` reads a local folder and checks the
SHA-256 of every decompressed file before using it. ``find_mnist`` decides which folder:
an explicit path, else $DFA_DATA_DIR, else the user cache (``cache_dir()``), else it
downloads the four files from a public mirror into the cache, verifying each before it
is moved in place (a temporary file and ``os.replace``: a bad or partial download never
lands under the real name).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np

MNIST_FILES = {
    # split/part: (file name, SHA-256 of the decompressed IDX bytes, IDX magic number)
    "train_images": (
        "train-images-idx3-ubyte.gz",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        2051,
    ),
    "train_labels": (
        "train-labels-idx1-ubyte.gz",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        2049,
    ),
    "test_images": (
        "t10k-images-idx3-ubyte.gz",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        2051,
    ),
    "test_labels": (
        "t10k-labels-idx1-ubyte.gz",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        2049,
    ),
}
"""The four MNIST files; the hashes are those of /work/shared/datasets/README.md."""

MNIST_NUM_CLASSES = 10

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's mirror
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TensorFlow's mirror
)
"""Public mirrors of the original .gz files, tried in order; override with $DFA_MNIST_MIRROR
(one base URL, or several separated by spaces) or ``find_mnist(base_urls=...)``."""

DATA_DIR_ENV = "DFA_DATA_DIR"
MIRROR_ENV = "DFA_MNIST_MIRROR"
CACHE_NAME = "dfa-framework"


class DatasetNotFoundError(FileNotFoundError):
    """No local copy of a dataset and no download possible; the message says where it looked."""


class MNIST(NamedTuple):
    """MNIST as flat inputs in [0, 1] and one-hot labels."""

    x_train: np.ndarray  # (60000, 784), dtype, pixel / 255
    y_train: np.ndarray  # (60000, 10), dtype, one-hot
    x_test: np.ndarray  # (10000, 784), dtype, pixel / 255
    y_test: np.ndarray  # (10000, 10), dtype, one-hot


def read_idx(path: str, expected_sha256: Optional[str] = None, expected_magic: Optional[int] = None) -> np.ndarray:
    """Reads one gzip-compressed IDX file of unsigned bytes.

    Args:
      path: the ``.gz`` file.
      expected_sha256: hex SHA-256 the decompressed bytes must have; None skips the check.
      expected_magic: 2051 for an image file, 2049 for a label file; None accepts both.

    Returns:
      uint8 array of shape (N,) for labels or (N, rows, cols) for images.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: checksum mismatch, or a header that is not an unsigned-byte IDX file
        (of the expected kind) or that disagrees with the file's length.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if expected_sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != expected_sha256.lower():
            raise ValueError(
                f"{path}: SHA-256 of the decompressed bytes is {got}, expected {expected_sha256}; "
                "the file is corrupt or not the expected MNIST file"
            )
    if len(raw) < 8:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    # magic = 0x0000 | type 0x08 (unsigned byte) | number of dimensions
    if magic >> 8 != 0x08 or not 1 <= (magic & 0xFF) <= 3:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic number {magic})")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: IDX magic number {magic}, expected {expected_magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise ValueError(
            f"{path}: header announces shape {dims} ({int(np.prod(dims))} bytes of data), "
            f"but the file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def one_hot(labels: np.ndarray, num_classes: int, dtype: str = "float32") -> np.ndarray:
    """Integer labels (N,) -> one-hot rows (N, num_classes) of ``dtype``."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be a 1-D array of ints in [0, {num_classes}), got shape {labels.shape}")
    return np.eye(num_classes, dtype=dtype)[labels]


def load_mnist(path: str, dtype: str = "float32") -> MNIST:
    """Loads MNIST from the four gzip IDX files in ``path``, checking their SHA-256.

    Args:
      path: folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
        t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz.
      dtype: 'float32' or 'float64', the dtype of inputs and labels.

    Returns:
      MNIST(x_train (60000, 784), y_train (60000, 10), x_test (10000, 784), y_test (10000, 10)),
      inputs scaled to [0, 1], labels one-hot.

    Raises:
      FileNotFoundError: ``path`` or one of the files is missing (the message names it).
      ValueError: bad dtype, a checksum mismatch, or inconsistent image/label counts.
    """
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"MNIST folder not found: {path!r}; it must hold "
            f"{', '.join(name for name, _, _ in MNIST_FILES.values())}"
        )
    arrays = {
        part: read_idx(os.path.join(path, name), sha, magic) for part, (name, sha, magic) in MNIST_FILES.items()
    }
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
        x = images.reshape(images.shape[0], -1).astype(dtype) / np.asarray(255, dtype=dtype)
        out += [x, one_hot(labels, MNIST_NUM_CLASSES, dtype)]
    return MNIST(*out)


def load_idx_dataset(path: str, dtype: str = "float32", num_classes: int = 10) -> MNIST:
    """Any dataset in MNIST's layout and file names (Fashion-MNIST, KMNIST, ...), unverified.

    Args:
      path: folder with the four files named as in ``MNIST_FILES``.
      dtype: 'float32' or 'float64'.
      num_classes: number of label values.

    Returns:
      MNIST-shaped tuple: inputs (N, rows * cols) in [0, 1], labels one-hot (N, num_classes).
    """
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"IDX dataset folder not found: {path!r}")
    out = []
    for split in ("train", "test"):
        images = read_idx(os.path.join(path, MNIST_FILES[f"{split}_images"][0]), None, 2051)
        labels = read_idx(os.path.join(path, MNIST_FILES[f"{split}_labels"][0]), None, 2049)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{path} {split}: {images.shape[0]} images but {labels.shape[0]} labels")
        x = images.reshape(images.shape[0], -1).astype(dtype) / np.asarray(255, dtype=dtype)
        out += [x, one_hot(labels, num_classes, dtype)]
    return MNIST(*out)


def standardize(x_train: np.ndarray, *others: np.ndarray, eps: float = 1e-8) -> Tuple[np.ndarray, ...]:
    """Per-feature (x - mean) / (std + eps), mean and std of ``x_train`` (N, D), applied to all arrays."""
    mean = x_train.mean(axis=0, keepdims=True)
    std = x_train.std(axis=0, keepdims=True) + eps
    return tuple(((x - mean) / std).astype(x.dtype) for x in (x_train,) + others)


def cache_dir() -> str:
    """The user cache of this package: $XDG_CACHE_HOME/dfa-framework, else ~/.cache/dfa-framework."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, CACHE_NAME)


def _has_mnist(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name)) for name, _, _ in MNIST_FILES.values())


def _mirrors(base_urls: Optional[Sequence[str]]) -> Tuple[str, ...]:
    if base_urls is None:
        env = os.environ.get(MIRROR_ENV, "").split()
        base_urls = env or MNIST_MIRRORS
    if isinstance(base_urls, str):
        base_urls = [base_urls]
    return tuple(u if u.endswith("/") else u + "/" for u in base_urls)


def download_idx(url: str, dest: str, sha256: Optional[str], timeout: float = 30.0) -> str:
    """Downloads one gzip IDX file to ``dest``, verified before it is moved in place.

    The bytes go to a temporary file in ``dest``'s folder; the decompressed content must
    hash to ``sha256`` (if given); only then ``os.replace`` puts it at ``dest``.

    Raises:
      OSError (urllib.error.URLError): the download failed.
      ValueError: the file is truncated, not gzip, or has the wrong checksum; nothing is kept.
    """
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=".gz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
        try:
            with gzip.open(tmp, "rb") as f:
                raw = f.read()
        except (OSError, EOFError) as err:
            raise ValueError(f"{url}: the download is not a complete gzip file ({err})") from None
        if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256.lower():
            raise ValueError(
                f"{url}: SHA-256 of the decompressed bytes is {hashlib.sha256(raw).hexdigest()}, "
                f"expected {sha256}; the download is corrupt and was not kept"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def find_mnist(
    path: Optional[str] = None,
    *,
    download: bool = True,
    base_urls: Optional[Sequence[str]] = None,
    timeout: float = 30.0,
) -> str:
    """The folder holding MNIST's four files, downloading them into the cache if needed.

    Looks, in order, at ``path`` (only there, if given), $DFA_DATA_DIR (the folder itself
    or its ``mnist/`` subfolder), ``cache_dir()/mnist``; then downloads into
    ``cache_dir()/mnist`` from ``base_urls`` (default $DFA_MNIST_MIRROR, else
    ``MNIST_MIRRORS``), trying each mirror per file.

    Returns:
      The folder; pass it to ``load_mnist`` (which checks every file's SHA-256).

    Raises:
      DatasetNotFoundError: nothing found and no download succeeded (or ``download`` is
        False); the message lists the places and mirrors tried.
    """
    if path is not None:
        for candidate in (path, os.path.join(path, "mnist")):
            if _has_mnist(candidate):
                return candidate
        raise DatasetNotFoundError(
            f"MNIST not found in {path!r} (nor in {os.path.join(path, 'mnist')!r}): that folder must hold "
            f"{', '.join(name for name, _, _ in MNIST_FILES.values())}"
        )
    looked = []
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        for candidate in (env, os.path.join(env, "mnist")):
            if _has_mnist(candidate):
                return candidate
        looked.append(f"${DATA_DIR_ENV}={env}")
    cache = os.path.join(cache_dir(), "mnist")
    if _has_mnist(cache):
        return cache
    looked.append(f"the cache {cache}")
    errors = []
    if download:
        for part, (name, sha, _) in MNIST_FILES.items():
            dest = os.path.join(cache, name)
            if os.path.isfile(dest):
                continue
            for base in _mirrors(base_urls):
                try:
                    download_idx(base + name, dest, sha, timeout)
                    break
                except (OSError, ValueError) as err:
                    errors.append(f"{base + name}: {err}")
            else:
                break
        if _has_mnist(cache):
            return cache
    tried = f"; downloads failed: {'; '.join(errors)}" if errors else ("; downloads disabled" if not download else "")
    raise DatasetNotFoundError(
        f"MNIST not found: looked in {', '.join(looked)}{tried}. Point at local files with --data-dir PATH "
        f"or ${DATA_DIR_ENV}=PATH (a folder holding {', '.join(n for n, _, _ in MNIST_FILES.values())}), "
        f"or set ${MIRROR_ENV} to a reachable mirror"
    )


def xor_dataset(dtype: str = "float32") -> Tuple[np.ndarray, np.ndarray]:
    """The four XOR points.

    Returns:
      x of shape (4, 2) with rows (0,0), (0,1), (1,0), (1,1), and y of shape (4, 1)
      with targets 0, 1, 1, 0, both of ``dtype``.
    """
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=dtype)
    y = np.array([[0], [1], [1], [0]], dtype=dtype)
    return x, y
