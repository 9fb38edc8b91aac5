"""Dataset files: where Fashion-MNIST and CIFAR-10 come from, their SHA-256, verified downloads, CIFAR-10's reader.

NumPy and the standard library only, and nothing else of this package: ``dfa_train.data``
builds on it (``load_dataset``), never the other way round.

Every file is checked against the SHA-256 of the file *as published* (for Fashion-MNIST the
compressed ``.gz`` files, for CIFAR-10 the ``cifar-10-binary.tar.gz`` archive), as listed by
TensorFlow Datasets (``tensorflow_datasets/url_checksums/fashion_mnist.txt`` and ``cifar10.txt``)
and matched by other loaders (Keras's, for example). These hashes pin the exact bytes, so a
copy recompressed elsewhere is refused even if its content is the same. (MNIST's table in
``dfa_train.data`` hashes the decompressed bytes instead, because its shared copy was recompressed.)

``find_dataset`` looks for the files in an explicit folder, else in the cache, else downloads them
there: each into a temporary file beside its destination, verified, then moved in place with
``os.replace``, so a failed or damaged download never lies under the real name. The CIFAR-10
archive is never unpacked to disk: ``read_cifar10_archive`` reads its six batch files by name
into memory, so no member name can write outside a folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np


class DatasetNotFoundError(FileNotFoundError):
    """No local copy of a dataset and no download possible; the message says where it looked."""


class RemoteFile(NamedTuple):
    """One published file of a dataset."""

    name: str  # file name, both in the local folder and under each mirror's base URL
    size: int  # bytes, as published
    sha256: str  # hex SHA-256 of the file's bytes as published (compressed, for .gz / .tar.gz)


class Source(NamedTuple):
    """Where a dataset's files come from."""

    title: str  # the dataset's name in messages, e.g. "Fashion-MNIST"
    files: Tuple[RemoteFile, ...]  # every file the loader needs
    mirrors: Tuple[str, ...]  # base URLs, tried in order, each followed by a file name
    mirror_env: str  # environment variable overriding ``mirrors`` (base URLs separated by spaces)
    homepage: str  # where a person can get the files by hand


FASHION_MNIST = Source(
    title="Fashion-MNIST",
    files=(
        # MNIST's file names and IDX layout; sizes and SHA-256 of the .gz files from TFDS's url_checksums.
        RemoteFile(
            "train-images-idx3-ubyte.gz", 26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
        ),
        RemoteFile(
            "train-labels-idx1-ubyte.gz", 29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz", 4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
        ),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz", 5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
        ),
    ),
    mirrors=(
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",  # the authors'
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # TFDS's and torchvision's (verified anyway)
    ),
    mirror_env="DFA_FASHION_MNIST_MIRROR",
    homepage="https://github.com/zalandoresearch/fashion-mnist",
)
"""Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017; MIT licence): 60,000/10,000 28x28 grey images, 10 classes."""

CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"

CIFAR10 = Source(
    title="CIFAR-10",
    files=(
        # The binary version (no pickle); size and SHA-256 of the archive from TFDS's url_checksums.
        RemoteFile(CIFAR10_ARCHIVE, 170052171, "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
    ),
    mirrors=("https://www.cs.toronto.edu/~kriz/",),
    mirror_env="DFA_CIFAR10_MIRROR",
    homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
)
"""CIFAR-10 (Krizhevsky, 2009): 50,000/10,000 32x32 colour images, 10 classes."""

SOURCES: Dict[str, Source] = {"fashion-mnist": FASHION_MNIST, "cifar10": CIFAR10}
"""Dataset name (``load_dataset``'s, the CLI's) -> its source; read at call time, so tests can swap entries."""

CIFAR10_TRAIN_MEMBERS = tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_MEMBER = "cifar-10-batches-bin/test_batch.bin"
CIFAR10_IMAGE_SHAPE = (3, 32, 32)
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32
"""One record: a label byte, then 3,072 pixel bytes: the red plane, then green, then blue, each row by row."""
CIFAR10_NUM_CLASSES = 10


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _mismatch(path: str, expected: RemoteFile) -> Optional[str]:
    """How the file at ``path`` differs from ``expected``, in words; None if it is the published file."""
    size = os.path.getsize(path)
    if size != expected.size:
        short = " (cut short?)" if size < expected.size else ""
        return f"{size} bytes, expected {expected.size}{short}"
    got = sha256_file(path)
    if got != expected.sha256.lower():
        return f"SHA-256 is {got}, expected {expected.sha256}"
    return None


def verify_file(path: str, expected: RemoteFile, title: str = "dataset") -> None:
    """Checks that ``path`` is the published file ``expected``: its size, then its SHA-256.

    Args:
      path: the local file.
      expected: its name, size and SHA-256 as published.
      title: the dataset's name, for messages.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: a wrong size or SHA-256; the message names ``path``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{title} file not found: {path}")
    problem = _mismatch(path, expected)
    if problem is not None:
        raise ValueError(
            f"{path}: {problem}; the file is damaged or not the original {title} file {expected.name}. Replace it "
            "with a fresh copy (in the cache, deleting it is enough: the next run downloads it again)"
        )


def download_verified(url: str, dest: str, check: Callable[[str], None], timeout: float = 30.0) -> str:
    """Downloads ``url`` to ``dest``, moved in place only once ``check`` accepts it.

    The bytes go to a temporary file (``.part-*``) in ``dest``'s folder; ``check(temporary path)``
    raises ValueError if they are wrong; otherwise ``os.replace`` puts the file at ``dest``. The
    temporary file is removed whatever happens.

    Args:
      url: what to fetch.
      dest: where the verified file goes (its folder is created).
      check: raises ValueError, with a message about the content, to refuse the file.
      timeout: seconds to wait for each piece of data.

    Returns:
      ``dest``.

    Raises:
      OSError (urllib.error.URLError): the download failed.
      ValueError: ``check`` refused the file; the message starts with ``url``.
    """
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    suffix = ".tar.gz" if dest.endswith(".tar.gz") else os.path.splitext(dest)[1]
    fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, f, 1 << 20)
        try:
            check(tmp)
        except ValueError as err:
            raise ValueError(f"{url}: {err}") from None
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def download_file(url: str, dest: str, expected: RemoteFile, timeout: float = 30.0) -> str:
    """Downloads one published file to ``dest``, moved in place only if its size and SHA-256 match ``expected``.

    Raises:
      OSError (urllib.error.URLError): the download failed.
      ValueError: the file is cut short or has the wrong SHA-256; nothing is kept.
    """

    def check(tmp: str) -> None:
        problem = _mismatch(tmp, expected)
        if problem is not None:
            raise ValueError(f"the download is {problem}; it is damaged and was not kept")

    return download_verified(url, dest, check, timeout)


def mirrors(source: Source, base_urls: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    """Base URLs to try, each ending in '/': ``base_urls``, else ${source.mirror_env}, else ``source.mirrors``."""
    if base_urls is None:
        base_urls = os.environ.get(source.mirror_env, "").split() or source.mirrors
    if isinstance(base_urls, str):
        base_urls = [base_urls]
    return tuple(u if u.endswith("/") else u + "/" for u in base_urls)


def _missing(source: Source, folder: str) -> str:
    """Which of ``source``'s files ``folder`` lacks, in words, for error messages."""
    if not os.path.isdir(folder):
        return "no such folder"
    return "missing " + ", ".join(f.name for f in source.files if not os.path.isfile(os.path.join(folder, f.name)))


def _has_all(source: Source, folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f.name)) for f in source.files)


def _in_words(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size:,} bytes"


def _download_into(source: Source, folder: str, base_urls: Optional[Sequence[str]], timeout: float) -> List[str]:
    """Downloads the files ``folder`` lacks, each from the first mirror that serves it verified.

    Returns:
      One message per failed attempt (empty if every file arrived); stops at the first file
      that no mirror could serve.
    """
    errors = []
    for file in source.files:
        dest = os.path.join(folder, file.name)
        if os.path.isfile(dest):
            continue
        for base in mirrors(source, base_urls):
            # Said before the wait: a mirror that accepts and never answers is otherwise silence.
            print(
                f"dfa: downloading {base + file.name} ({_in_words(file.size)}; waits up to {timeout:g} s for "
                "data, --timeout to change)",
                file=sys.stderr,
                flush=True,
            )
            try:
                download_file(base + file.name, dest, file, timeout)
                break
            except ValueError as err:  # its message starts with the URL
                errors.append(str(err))
            except OSError as err:
                errors.append(f"{base + file.name}: {err}")
        else:
            break
    return errors


def find_dataset(
    name: str,
    data_dir: Optional[str] = None,
    *,
    cache_root: str,
    download: bool = True,
    base_urls: Optional[Sequence[str]] = None,
    timeout: float = 30.0,
) -> str:
    """The folder holding the files of dataset ``name``, downloading them into the cache if needed.

    Looks at ``data_dir`` and ``data_dir/<name>`` (only there, if given); else at
    ``cache_root/<name>``; else downloads the missing files there from ``base_urls`` (default
    ${mirror_env}, else the source's mirrors), trying each mirror per file. Files found are not
    verified here: the loaders check each one's SHA-256 before reading it.

    Args:
      name: a key of ``SOURCES`` ('fashion-mnist', 'cifar10').
      data_dir: a folder holding the files, or None to use the cache.
      cache_root: the package's user cache (``dfa_train.data.cache_dir()``).
      download: whether to download missing files into the cache.
      base_urls: mirrors to use instead of ${mirror_env} or the defaults.
      timeout: seconds to wait for each piece of data.

    Returns:
      The folder.

    Raises:
      ValueError: ``name`` is not a key of ``SOURCES``.
      DatasetNotFoundError: nothing found and no download succeeded (or ``download`` is False);
        the message lists the places looked at and the mirrors tried, and how to get the files.
    """
    if name not in SOURCES:
        raise ValueError(f"no downloadable dataset {name!r}; expected one of {', '.join(map(repr, SOURCES))}")
    source = SOURCES[name]
    names = ", ".join(f.name for f in source.files)
    if data_dir is not None:
        for candidate in (data_dir, os.path.join(data_dir, name)):
            if _has_all(source, candidate):
                return candidate
        raise DatasetNotFoundError(
            f"{source.title} not found in {data_dir!r} ({_missing(source, data_dir)}) nor in "
            f"{os.path.join(data_dir, name)!r}: that folder must hold {names} (from {source.homepage}). "
            "Put them there, or drop --data-dir to use the cache or a download"
        )
    cache = os.path.join(cache_root, name)
    if _has_all(source, cache):
        return cache
    looked = f"the cache {cache} ({_missing(source, cache)})"
    errors = _download_into(source, cache, base_urls, timeout) if download else []
    if download and _has_all(source, cache):
        return cache
    tried = f"; downloads failed: {'; '.join(errors)}" if errors else ("; downloads disabled" if not download else "")
    raise DatasetNotFoundError(
        f"{source.title} not found: looked in {looked}{tried}. Get {names} from {source.homepage} and point at "
        f"their folder with --data-dir PATH, put them in {cache}, or set ${source.mirror_env} to a reachable "
        "mirror (base URLs separated by spaces)"
    )


def _read_members(path: str, wanted: Sequence[str]) -> Dict[str, bytes]:
    """The bytes of the regular files named ``wanted`` inside the gzip tar archive ``path``.

    Members are matched by their exact names and read into memory; nothing is written to disk,
    and links or other names are ignored.

    Raises:
      ValueError: naming ``path``: not a gzip tar archive, cut short, a wanted member missing,
        present twice, or not a regular file.
    """
    found: Dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name not in wanted:
                    continue
                if member.name in found:
                    raise ValueError(f"{path}: holds {member.name} twice")
                stream = tar.extractfile(member) if member.isfile() else None
                if stream is None:
                    raise ValueError(f"{path}: {member.name} is not a regular file")
                found[member.name] = stream.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise ValueError(f"{path}: not a complete gzip tar archive ({type(err).__name__}: {err})") from None
    absent = [name for name in wanted if name not in found]
    if absent:
        raise ValueError(f"{path}: the archive lacks {', '.join(absent)}; is it the binary version of CIFAR-10?")
    return found


def _parse_cifar_batch(path: str, member: str, raw: bytes) -> Tuple[np.ndarray, np.ndarray]:
    """One batch file's bytes -> (images (N, 3072) uint8 in (C, H, W) order, labels (N,) uint8)."""
    if not raw or len(raw) % CIFAR10_RECORD_BYTES:
        raise ValueError(
            f"{path}: {member} holds {len(raw)} bytes, not a positive multiple of the {CIFAR10_RECORD_BYTES}-byte "
            "record (1 label byte + 3072 pixel bytes)"
        )
    records_Nx3073 = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR10_RECORD_BYTES)
    labels_N = records_Nx3073[:, 0]
    if labels_N.max() >= CIFAR10_NUM_CLASSES:
        raise ValueError(
            f"{path}: {member} has label {int(labels_N.max())}, expected values in [0, {CIFAR10_NUM_CLASSES})"
        )
    return records_Nx3073[:, 1:], labels_N


def read_cifar10_archive(
    path: str, expected: Optional[RemoteFile] = None
) -> Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]:
    """Reads CIFAR-10's binary archive (``cifar-10-binary.tar.gz``) without unpacking it to disk.

    Args:
      path: the archive.
      expected: its published size and SHA-256, checked before anything is read; None skips the check.

    Returns:
      ((images_train (N_train, 3072), labels_train (N_train,)), (images_test (N_test, 3072),
      labels_test (N_test,))), all uint8: data_batch_1..5 in order, then test_batch; each image
      row is the red, green and blue 32x32 planes one after the other ((C, H, W) order).
      N_train = 50,000 and N_test = 10,000 for the published archive.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: naming ``path`` (and the member): a wrong size or SHA-256, not a gzip tar
        archive, a batch file missing or not a whole number of records, or a label above 9.
    """
    if expected is not None:
        verify_file(path, expected, CIFAR10.title)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"{CIFAR10.title} file not found: {path}")
    members = _read_members(path, CIFAR10_TRAIN_MEMBERS + (CIFAR10_TEST_MEMBER,))
    train = [_parse_cifar_batch(path, name, members[name]) for name in CIFAR10_TRAIN_MEMBERS]
    images_test, labels_test = _parse_cifar_batch(path, CIFAR10_TEST_MEMBER, members[CIFAR10_TEST_MEMBER])
    images_train = np.concatenate([images for images, _ in train])
    labels_train = np.concatenate([labels for _, labels in train])
    return (images_train, labels_train), (images_test.copy(), labels_test.copy())  # writable, like the train arrays
