"""Datasets for tests and experiments: MNIST (or any IDX dataset) from gzip IDX files, Fashion-MNIST, CIFAR-10, XOR.

NumPy and the standard library only. ``load_mnist`` reads a local folder and checks the
SHA-256 of every decompressed file before using it. ``find_mnist`` decides which folder:
an explicit path, else $DFA_DATA_DIR, else the user cache (``cache_dir()``), else it
downloads the four files from a public mirror into the cache, verifying each before it
is moved in place (a temporary file and ``os.replace``: a bad or partial download never
lands under the real name).

A small real slice of MNIST (the first 2,000 training and 500 test images, same file
names and layout) ships inside the package (``MNIST_SLICE_DIR``) so that tests and a first
run work offline: ``load_mnist_slice``, or ``find_mnist_or_slice``, which falls back to it
with a ``MnistSliceWarning`` when no full copy can be found or downloaded.

Damaged files (not gzip, cut short, wrong IDX header, counts or image sizes that disagree)
raise ValueError naming the file and what is wrong.

``load_dataset(name, ...)`` is the one entry point for every named dataset ('mnist',
'mnist-slice', 'fashion-mnist', 'cifar10'; their image shapes in ``IMAGE_SHAPES``). Fashion-MNIST
and CIFAR-10 are found, downloaded and checked by ``dfa_train.dataset_files`` (SHA-256 of the
files as published) and loaded here by ``load_fashion_mnist`` and ``load_cifar10``.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import sys
import warnings
import zlib
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from dfa_train.dataset_files import (
    CIFAR10_ARCHIVE,
    CIFAR10_IMAGE_SHAPE,
    CIFAR10_NUM_CLASSES,
    SOURCES,
    DatasetNotFoundError,
    download_verified,
    find_dataset,
    read_cifar10_archive,
    verify_file,
)

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

MNIST_SLICE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets", "mnist_slice")
"""The bundled slice of MNIST (package data): the first 2,000 training and 500 test images."""

MNIST_SLICE_SIZES = (2000, 500)
"""(training, test) images in the bundled slice."""

MNIST_SLICE_NAME = "mnist-slice"
"""The CLI's name for the bundled slice (``--dataset mnist-slice``), used in error messages."""

MNIST_SLICE_FILES = {
    # split/part: (file name, SHA-256 of the decompressed IDX bytes, IDX magic number); the
    # SHA-256 of the .gz files themselves are in MNIST_SLICE_DIR/SHA256SUMS.
    "train_images": (
        "train-images-idx3-ubyte.gz",
        "729d340c0177402770b27c04f817dfb40ed8844459b35a9f11ae21067b05cf19",
        2051,
    ),
    "train_labels": (
        "train-labels-idx1-ubyte.gz",
        "90795ea2219655a7281c0d6756d0ae8a33bebac7ec84bac89bbdcc5e3baa9f8c",
        2049,
    ),
    "test_images": (
        "t10k-images-idx3-ubyte.gz",
        "de0a55d8eb2a23fce4f596c5234b08b9c8ee685583a2b0e52f3a78eca48f9d89",
        2051,
    ),
    "test_labels": (
        "t10k-labels-idx1-ubyte.gz",
        "60e902e82445d902e245e1b039469f36936d63cb28e81527a7bbba247c240af3",
        2049,
    ),
}
"""The slice's four files: MNIST's names and layout, the first ``MNIST_SLICE_SIZES`` records."""


class MnistSliceWarning(UserWarning):
    """``find_mnist_or_slice`` fell back to the bundled 2,000/500 slice of MNIST."""


class MNIST(NamedTuple):
    """MNIST as flat inputs in [0, 1] and one-hot labels; ``load_dataset`` returns every dataset in this form,
    images flattened in (C, H, W) order (shapes in ``IMAGE_SHAPES``)."""

    x_train: np.ndarray  # (60000, 784), dtype, pixel / 255
    y_train: np.ndarray  # (60000, 10), dtype, one-hot
    x_test: np.ndarray  # (10000, 784), dtype, pixel / 255
    y_test: np.ndarray  # (10000, 10), dtype, one-hot


def _decompress(path: str) -> bytes:
    """The decompressed bytes of one ``.gz`` file; a damaged file is a ValueError naming it."""
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"IDX file not found: {path}")
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except gzip.BadGzipFile as err:
        with open(path, "rb") as f:
            head = f.read(3)
        if head[:2] == b"\x1f\x8b":  # a gzip header, then a bad checksum or length
            raise ValueError(f"{path}: the gzip data is corrupt ({err})") from None
        hint = " (it looks like an uncompressed IDX file: gzip it)" if head == b"\x00\x00\x08" else ""
        raise ValueError(f"{path}: not a gzip file{hint} ({err})") from None
    except EOFError as err:
        raise ValueError(f"{path}: the gzip data ends early, the file is truncated ({err})") from None
    except zlib.error as err:
        raise ValueError(f"{path}: the gzip data is corrupt ({err})") from None


def _parse_idx(path: str, raw: bytes, expected_magic: Optional[int]) -> np.ndarray:
    """Decompressed IDX bytes -> uint8 array (N,) or (N, rows, cols); ``path`` only names the file in errors."""
    if len(raw) < 8:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    # magic = 0x0000 | type 0x08 (unsigned byte) | number of dimensions
    if magic >> 8 != 0x08 or not 1 <= (magic & 0xFF) <= 3:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic number {magic})")
    if expected_magic is not None and magic != expected_magic:
        kind = {2049: "a label file (1-D)", 2051: "an image file (3-D)"}.get(expected_magic, "another kind")
        raise ValueError(f"{path}: IDX magic number {magic}, expected {expected_magic} ({kind})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for a {ndim}-D IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(dims)  # Python ints: a garbage header cannot overflow
    if len(raw) != header + size:
        raise ValueError(
            f"{path}: header announces shape {dims} ({size} bytes of data), but the file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


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
      ValueError: not gzip, truncated or corrupt gzip data, a header that is not an
        unsigned-byte IDX file (of the expected kind) or that disagrees with the file's
        length, or a checksum mismatch; the message names ``path``.
    """
    raw = _decompress(path)
    array = _parse_idx(path, raw, expected_magic)
    if expected_sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != expected_sha256.lower():
            raise ValueError(
                f"{path}: SHA-256 of the decompressed bytes is {got}, expected {expected_sha256}; "
                "the file is corrupt or not the expected MNIST file"
            )
    return array


def write_idx(path: str, array: np.ndarray) -> str:
    """Writes a uint8 array (N,) or (N, rows, cols) as a gzip IDX file, reproducibly.

    The gzip header carries no file name and mtime 0, so the same array gives the same
    bytes (for a given zlib).

    Returns:
      ``path``.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 3:
        raise ValueError(f"write_idx needs a uint8 array of 1 to 3 dims, got {array.dtype} of shape {array.shape}")
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
        gz.write(header + np.ascontiguousarray(array).tobytes())
    return path


def one_hot(labels: np.ndarray, num_classes: int, dtype: str = "float32") -> np.ndarray:
    """Integer labels (N,) -> one-hot rows (N, num_classes) of ``dtype``."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be a 1-D array of ints in [0, {num_classes}), got shape {labels.shape}")
    return np.eye(num_classes, dtype=dtype)[labels]


def _check_dtype(dtype: str) -> None:
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")


def _assemble(files: dict, arrays: dict, dtype: str, num_classes: int) -> MNIST:
    """The four IDX arrays -> MNIST tuple, after checking they fit together.

    Args:
      files: part name ('train_images', ...) -> path, for error messages.
      arrays: part name -> uint8 images (N, rows, cols) or labels (N,).

    Raises:
      ValueError: naming the file: image and label counts differ, train and test images
        differ in size, or a label is outside [0, num_classes).
    """
    train_shape = arrays["train_images"].shape[1:]
    if arrays["test_images"].shape[1:] != train_shape:
        raise ValueError(
            f"{files['test_images']}: images of {arrays['test_images'].shape[1:]} pixels, but "
            f"{files['train_images']} holds images of {train_shape}; train and test images must have one size"
        )
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{files[f'{split}_labels']}: {labels.shape[0]} labels, but {files[f'{split}_images']} holds "
                f"{images.shape[0]} images; every image needs one label"
            )
        if labels.size and labels.max() >= num_classes:
            raise ValueError(
                f"{files[f'{split}_labels']}: label {int(labels.max())} found, expected values in [0, {num_classes})"
            )
        x = images.reshape(images.shape[0], -1).astype(dtype) / np.asarray(255, dtype=dtype)
        out += [x, one_hot(labels, num_classes, dtype)]
    return MNIST(*out)


def _known_sets() -> Tuple[Tuple[str, dict], ...]:
    # Read at call time, so that the tables can be swapped in tests.
    return (("MNIST", MNIST_FILES), ("the bundled MNIST slice", MNIST_SLICE_FILES))


def _read_verified(path: str, part: str) -> Tuple[np.ndarray, str]:
    """One MNIST file, checked against every known set -> (array, name of the set it belongs to)."""
    name, _, magic = MNIST_FILES[part]
    file = os.path.join(path, name)
    raw = _decompress(file)
    array = _parse_idx(file, raw, magic)
    got = hashlib.sha256(raw).hexdigest()
    for set_name, table in _known_sets():
        if got == table[part][1]:
            return array, set_name
    expected = " or ".join(f"{table[part][1]} ({set_name})" for set_name, table in _known_sets())
    raise ValueError(
        f"{file}: SHA-256 of the decompressed bytes is {got}, expected {expected}; "
        "the file is corrupt or not the expected MNIST file"
    )


def load_mnist(path: str, dtype: str = "float32") -> MNIST:
    """Loads MNIST from the four gzip IDX files in ``path``, checking their SHA-256.

    The files must all be those of MNIST, or all those of the bundled slice
    (``MNIST_SLICE_FILES``, e.g. ``MNIST_SLICE_DIR``); the slice loads as N = 2000 / 500.

    Args:
      path: folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
        t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz.
      dtype: 'float32' or 'float64', the dtype of inputs and labels.

    Returns:
      MNIST(x_train (60000, 784), y_train (60000, 10), x_test (10000, 784), y_test (10000, 10)),
      or (2000, ...) / (500, ...) for the slice; inputs scaled to [0, 1], labels one-hot.

    Raises:
      FileNotFoundError: ``path`` or one of the files is missing (the message names it).
      ValueError: bad dtype, or a damaged file (the message names it): not gzip, truncated,
        a wrong IDX header, a checksum mismatch, files of MNIST mixed with files of the
        slice, or inconsistent image/label counts.
    """
    _check_dtype(dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"MNIST folder not found: {path!r}; it must hold {', '.join(name for name, _, _ in MNIST_FILES.values())}"
        )
    files = {part: os.path.join(path, name) for part, (name, _, _) in MNIST_FILES.items()}
    arrays, sets = {}, {}
    for part in MNIST_FILES:
        arrays[part], sets[part] = _read_verified(path, part)
    if len(set(sets.values())) > 1:
        mix = ", ".join(f"{os.path.basename(files[p])} is from {s}" for p, s in sets.items())
        raise ValueError(f"{path}: the four files must come from one set, but {mix}")
    return _assemble(files, arrays, dtype, MNIST_NUM_CLASSES)


def load_idx_dataset(path: str, dtype: str = "float32", num_classes: int = 10) -> MNIST:
    """Any dataset in MNIST's layout and file names (Fashion-MNIST, KMNIST, ...), unverified.

    Args:
      path: folder with the four files named as in ``MNIST_FILES``.
      dtype: 'float32' or 'float64'.
      num_classes: number of label values.

    Returns:
      MNIST-shaped tuple: inputs (N, rows * cols) in [0, 1], labels one-hot (N, num_classes).

    Raises:
      FileNotFoundError: ``path`` or one of the files is missing.
      ValueError: a damaged file, inconsistent counts or image sizes (the message names the file).
    """
    _check_dtype(dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"IDX dataset folder not found: {path!r}")
    files = {part: os.path.join(path, name) for part, (name, _, _) in MNIST_FILES.items()}
    arrays = {part: read_idx(files[part], None, magic) for part, (_, _, magic) in MNIST_FILES.items()}
    return _assemble(files, arrays, dtype, num_classes)


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
    hash to ``sha256`` (if given); only then ``os.replace`` puts it at ``dest``
    (``dataset_files.download_verified``).

    Raises:
      OSError (urllib.error.URLError): the download failed.
      ValueError: the file is truncated, not gzip, or has the wrong checksum; nothing is kept.
    """

    def check(tmp: str) -> None:
        try:
            with gzip.open(tmp, "rb") as f:
                raw = f.read()
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"the download is not a complete gzip file ({err})") from None
        got = hashlib.sha256(raw).hexdigest()
        if sha256 is not None and got != sha256.lower():
            raise ValueError(
                f"SHA-256 of the decompressed bytes is {got}, expected {sha256}; "
                "the download is corrupt and was not kept"
            )

    return download_verified(url, dest, check, timeout)


def _missing(folder: str) -> str:
    """Which of MNIST's files ``folder`` lacks, in words, for error messages."""
    if not os.path.isdir(folder):
        return "no such folder"
    absent = [name for name, _, _ in MNIST_FILES.values() if not os.path.isfile(os.path.join(folder, name))]
    return "missing " + ", ".join(absent)


def _slice_hint() -> str:
    return (
        f"or train on the bundled slice of MNIST ({MNIST_SLICE_SIZES[0]:,} training / "
        f"{MNIST_SLICE_SIZES[1]:,} test images) with --dataset {MNIST_SLICE_NAME}"
    )


def _download_into(cache: str, base_urls: Optional[Sequence[str]], timeout: float) -> list:
    """Downloads the files ``cache`` lacks, each from the first mirror that serves it verified.

    Returns:
      One message per failed attempt (empty if every file arrived); stops at the first
      file that no mirror could serve.
    """
    errors = []
    for name, sha, _ in MNIST_FILES.values():
        dest = os.path.join(cache, name)
        if os.path.isfile(dest):
            continue
        for base in _mirrors(base_urls):
            # Said before the wait: a mirror that accepts and never answers is otherwise silence.
            print(
                f"dfa: downloading {base + name} (waits up to {timeout:g} s for data; --timeout to change)",
                file=sys.stderr,
                flush=True,
            )
            try:
                download_idx(base + name, dest, sha, timeout)
                break
            except ValueError as err:  # its message starts with the URL
                errors.append(str(err))
            except OSError as err:
                errors.append(f"{base + name}: {err}")
        else:
            break
    return errors


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
        False); the message lists every place looked at and the mirrors tried, and
        suggests the bundled slice (``--dataset mnist-slice``).
    """
    names = ", ".join(n for n, _, _ in MNIST_FILES.values())
    if path is not None:
        for candidate in (path, os.path.join(path, "mnist")):
            if _has_mnist(candidate):
                return candidate
        raise DatasetNotFoundError(
            f"MNIST not found in {path!r} ({_missing(path)}) nor in {os.path.join(path, 'mnist')!r}: that folder "
            f"must hold {names}. Download them there, drop --data-dir to use $DFA_DATA_DIR, the cache or a "
            f"download, {_slice_hint()}"
        )
    looked = []
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        for candidate in (env, os.path.join(env, "mnist")):
            if _has_mnist(candidate):
                return candidate
        looked.append(f"${DATA_DIR_ENV}={env} ({_missing(env)}) and {os.path.join(env, 'mnist')}")
    else:
        looked.append(f"${DATA_DIR_ENV} (not set)")
    cache = os.path.join(cache_dir(), "mnist")
    if _has_mnist(cache):
        return cache
    looked.append(f"the cache {cache} ({_missing(cache)})")
    errors = _download_into(cache, base_urls, timeout) if download else []
    if download and _has_mnist(cache):
        return cache
    tried = f"; downloads failed: {'; '.join(errors)}" if errors else ("; downloads disabled" if not download else "")
    raise DatasetNotFoundError(
        f"MNIST not found: looked in {', '.join(looked)}{tried}. Point at local files with --data-dir PATH "
        f"or ${DATA_DIR_ENV}=PATH (a folder holding {names}), set ${MIRROR_ENV} to a reachable mirror, "
        f"{_slice_hint()}"
    )


def is_mnist_slice(folder: str) -> bool:
    """Whether ``folder``'s MNIST files are the bundled slice (by the training labels' SHA-256), not full MNIST."""
    if os.path.isdir(MNIST_SLICE_DIR) and os.path.isdir(folder) and os.path.samefile(folder, MNIST_SLICE_DIR):
        return True
    name, sha, _ = MNIST_SLICE_FILES["train_labels"]
    try:
        return hashlib.sha256(_decompress(os.path.join(folder, name))).hexdigest() == sha
    except (OSError, ValueError):
        return False


def find_mnist_slice() -> str:
    """The folder of the bundled slice of MNIST (``MNIST_SLICE_DIR``); pass it to ``load_mnist``.

    Raises:
      DatasetNotFoundError: the package was installed without its data files.
    """
    if not _has_mnist(MNIST_SLICE_DIR):
        raise DatasetNotFoundError(
            f"the bundled MNIST slice is missing from {MNIST_SLICE_DIR} ({_missing(MNIST_SLICE_DIR)}); "
            "reinstall the package with its data files (package-data dfa_train/datasets/mnist_slice)"
        )
    return MNIST_SLICE_DIR


def load_mnist_slice(dtype: str = "float32") -> MNIST:
    """The bundled slice of MNIST, every file checked against ``MNIST_SLICE_FILES``.

    Returns:
      MNIST(x_train (2000, 784), y_train (2000, 10), x_test (500, 784), y_test (500, 10)):
      the first 2,000 training and 500 test images of MNIST, inputs in [0, 1], labels one-hot.
    """
    folder = find_mnist_slice()
    data = load_mnist(folder, dtype)
    if (data.x_train.shape[0], data.x_test.shape[0]) != MNIST_SLICE_SIZES:
        # load_mnist accepts full MNIST too: someone replaced the bundled files with it.
        raise ValueError(f"{folder}: expected the {MNIST_SLICE_SIZES} slice, got full MNIST")
    return data


def find_mnist_or_slice(
    path: Optional[str] = None,
    *,
    download: bool = True,
    base_urls: Optional[Sequence[str]] = None,
    timeout: float = 30.0,
) -> Tuple[str, bool]:
    """``find_mnist``, falling back to the bundled slice when no full copy is found or downloaded.

    An explicit ``path`` is never replaced by the slice: if it lacks MNIST, this raises as
    ``find_mnist`` does. Without ``path``, a failed lookup (nothing local, downloads off or
    failing, e.g. offline) warns with ``MnistSliceWarning`` (shown on stderr), whose message
    says where it looked, and returns the slice.

    Returns:
      (folder, is_slice): the folder to pass to ``load_mnist``, and whether it holds the
      2,000/500 slice rather than full MNIST.

    Raises:
      DatasetNotFoundError: ``path`` given and it lacks MNIST, or the slice is missing too.
    """
    try:
        folder = find_mnist(path, download=download, base_urls=base_urls, timeout=timeout)
    except DatasetNotFoundError as err:
        if path is not None:
            raise
        folder = find_mnist_slice()
        warnings.warn(
            f"{err}\nUsing the bundled slice of MNIST instead: the first {MNIST_SLICE_SIZES[0]:,} training and "
            f"{MNIST_SLICE_SIZES[1]:,} test images ({folder}); accuracies are not comparable with full MNIST.",
            MnistSliceWarning,
            stacklevel=2,
        )
        return folder, True
    return folder, is_mnist_slice(folder)


def make_mnist_slice(source: str, dest: str, n_train: int = 2000, n_test: int = 500) -> str:
    """Writes the first ``n_train`` / ``n_test`` records of the verified MNIST in ``source`` to ``dest``.

    How ``MNIST_SLICE_DIR`` was made (with the defaults); ``write_idx`` makes it reproducible.

    Returns:
      ``dest``.
    """
    os.makedirs(dest, exist_ok=True)
    for part, (name, sha, magic) in MNIST_FILES.items():
        array = read_idx(os.path.join(source, name), sha, magic)
        write_idx(os.path.join(dest, name), array[: n_train if part.startswith("train") else n_test])
    return dest


def load_fashion_mnist(path: str, dtype: str = "float32") -> MNIST:
    """Loads Fashion-MNIST from its four gzip IDX files in ``path``, each checked first.

    Each ``.gz`` file must have the size and SHA-256 of the file as published
    (``dataset_files.FASHION_MNIST``; TFDS's checksums, which hash the *compressed* files, so a
    recompressed copy is refused: load such a copy with ``load_idx_dataset``, unverified).

    Args:
      path: folder holding MNIST's four file names (``MNIST_FILES``) with Fashion-MNIST's content.
      dtype: 'float32' or 'float64', the dtype of inputs and labels.

    Returns:
      MNIST(x_train (60000, 784), y_train (60000, 10), x_test (10000, 784), y_test (10000, 10)):
      28x28 grey images flattened in (1, 28, 28) order, scaled to [0, 1]; labels one-hot.

    Raises:
      FileNotFoundError: ``path`` or one of the files is missing.
      ValueError: bad dtype, or a damaged file (the message names it): a wrong size or SHA-256,
        a damaged gzip or IDX header, or inconsistent counts.
    """
    _check_dtype(dtype)
    source = SOURCES["fashion-mnist"]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{source.title} folder not found: {path!r}")
    for file in source.files:
        verify_file(os.path.join(path, file.name), file, source.title)
    return load_idx_dataset(path, dtype, num_classes=10)


def load_cifar10(path: str, dtype: str = "float32") -> MNIST:
    """Loads CIFAR-10 from its binary archive ``cifar-10-binary.tar.gz`` in ``path``, checked first.

    The archive must have the published size and SHA-256 (``dataset_files.CIFAR10``); its six
    batch files are read from it in memory (``dataset_files.read_cifar10_archive``), never unpacked.

    Args:
      path: folder holding ``cifar-10-binary.tar.gz``.
      dtype: 'float32' or 'float64', the dtype of inputs and labels.

    Returns:
      MNIST(x_train (50000, 3072), y_train (50000, 10), x_test (10000, 3072), y_test (10000, 10)):
      32x32 colour images flattened in (3, 32, 32) order (the red plane, then green, then blue),
      scaled to [0, 1]; labels one-hot. float32 inputs take 0.6 GB, float64 1.2 GB.

    Raises:
      FileNotFoundError: ``path`` or the archive is missing.
      ValueError: bad dtype, or a damaged archive (the message names it and the member): a wrong
        size or SHA-256, a batch file missing or not a whole number of records, a label above 9.
    """
    _check_dtype(dtype)
    (images_train, labels_train), (images_test, labels_test) = read_cifar10_archive(
        os.path.join(path, CIFAR10_ARCHIVE), SOURCES["cifar10"].files[0]
    )
    out = []
    for images, labels in ((images_train, labels_train), (images_test, labels_test)):
        x = images.astype(dtype)
        x /= np.asarray(255, dtype=dtype)  # in place: one copy of the inputs, not two
        out += [x, one_hot(labels, CIFAR10_NUM_CLASSES, dtype)]
    return MNIST(*out)


IMAGE_SHAPES: Dict[str, Tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    MNIST_SLICE_NAME: (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": CIFAR10_IMAGE_SHAPE,
}
"""Dataset name -> (C, H, W) of one image; ``load_dataset`` flattens images in this order."""


def load_dataset(
    name: str,
    data_dir: Optional[str] = None,
    *,
    dtype: str = "float32",
    download: bool = True,
    timeout: float = 30.0,
) -> MNIST:
    """Loads the dataset ``name``, finding or downloading its files, every file checked.

    Where the files come from:
      'mnist': ``find_mnist`` (``data_dir`` or its ``mnist/``, else $DFA_DATA_DIR, the cache
        ``cache_dir()/mnist``, a download); no fallback to the slice here.
      'mnist-slice': the bundled 2,000/500 slice (``data_dir``, ``download``, ``timeout`` unused).
      'fashion-mnist', 'cifar10': ``data_dir`` or ``data_dir/<name>`` if given (only there), else
        the cache ``cache_dir()/<name>``, else a download into the cache from the mirrors of
        ``dataset_files.SOURCES[name]`` ($DFA_FASHION_MNIST_MIRROR, $DFA_CIFAR10_MIRROR override them).

    Args:
      name: a key of ``IMAGE_SHAPES``: 'mnist', 'mnist-slice', 'fashion-mnist' or 'cifar10'.
      data_dir: a folder holding the dataset's files, or None to look in the usual places.
      dtype: 'float32' or 'float64', the dtype of inputs and labels.
      download: whether missing files may be downloaded into the cache.
      timeout: seconds a download waits for each piece of data.

    Returns:
      MNIST(x_train (N_train, C*H*W), y_train (N_train, 10), x_test (N_test, C*H*W),
      y_test (N_test, 10)), with (C, H, W) = ``IMAGE_SHAPES[name]`` and images flattened in that
      order; inputs in [0, 1], labels one-hot, both of ``dtype``.

    Raises:
      ValueError: an unknown ``name`` or ``dtype``, or a damaged file (the message names it).
      DatasetNotFoundError: no copy found and none could be downloaded; the message says where
        it looked and how to get the files.
    """
    if name not in IMAGE_SHAPES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(map(repr, IMAGE_SHAPES))}")
    _check_dtype(dtype)
    if name == "mnist":
        return load_mnist(find_mnist(data_dir, download=download, timeout=timeout), dtype)
    if name == MNIST_SLICE_NAME:
        return load_mnist_slice(dtype)
    folder = find_dataset(name, data_dir, cache_root=cache_dir(), download=download, timeout=timeout)
    return load_cifar10(folder, dtype) if name == "cifar10" else load_fashion_mnist(folder, dtype)


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
