"""Fashion-MNIST and CIFAR-10 (dfa_train.dataset_files, dfa_train.data.load_dataset): download, cache, load, damage.

Small files in the real formats (gzip IDX for Fashion-MNIST, ``cifar-10-binary.tar.gz`` with its
six batch files of 3,073-byte records for CIFAR-10) are generated per test and served by an HTTP
server on 127.0.0.1; the table of published sizes and SHA-256 is patched to the generated files'.
Every mirror variable points at a dead local port unless a test serves files, so nothing can
reach the real mirrors.
"""

import ast
import functools
import gzip
import hashlib
import http.server
import io
import math
import os
import re
import tarfile
import threading

import numpy as np
import pytest

from dfa_train import data, dataset_files
from dfa_train.data import IMAGE_SHAPES, MNIST_FILES, MNIST_SLICE_DIR, DatasetNotFoundError, load_dataset
from dfa_train.dataset_files import CIFAR10_ARCHIVE, CIFAR10_TEST_MEMBER, CIFAR10_TRAIN_MEMBERS, RemoteFile

DEAD = "http://127.0.0.1:9/"  # nothing listens on the discard port: connection refused at once
MIRROR_ENV = {"fashion-mnist": "DFA_FASHION_MNIST_MIRROR", "cifar10": "DFA_CIFAR10_MIRROR"}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(folder) -> base URL of an HTTP server on 127.0.0.1 serving ``folder``."""
    servers = []

    def start(folder):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    """An empty user cache (XDG_CACHE_HOME), no $DFA_DATA_DIR, every mirror variable on a dead local port."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DFA_DATA_DIR", raising=False)
    for env in [*MIRROR_ENV.values(), "DFA_MNIST_MIRROR"]:
        monkeypatch.setenv(env, DEAD)
    return tmp_path / "xdg" / "dfa-framework"


def _publish(monkeypatch, name, folder):
    """Patches SOURCES[name] so that the files in ``folder`` are the published ones (sizes, SHA-256)."""
    source = dataset_files.SOURCES[name]
    files = tuple(
        RemoteFile(f.name, os.path.getsize(folder / f.name), hashlib.sha256((folder / f.name).read_bytes()).hexdigest())
        for f in source.files
    )
    monkeypatch.setitem(dataset_files.SOURCES, name, source._replace(files=files))


def _write_fashion(folder, n_train=6, n_test=3, seed=0):
    """Four gzip IDX files of 28x28 images in ``folder`` -> (images_train, labels_train, images_test, labels_test)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for part, (file_name, _, _) in MNIST_FILES.items():
        data.write_idx(str(folder / file_name), arrays[part])
    return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]


def _tar_add(tar, name, payload, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(payload) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)


def _cifar_batches(n_per_batch=(2, 3, 1, 2, 2), n_test=3, seed=0):
    """Random batches: member name -> (images (N, 3, 32, 32) uint8, labels (N,) uint8)."""
    rng = np.random.default_rng(seed)
    sizes = dict(zip(CIFAR10_TRAIN_MEMBERS, n_per_batch)) | {CIFAR10_TEST_MEMBER: n_test}
    return {
        member: (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
        for member, n in sizes.items()
    }


def _records(images, labels):
    """The binary version's records: a label byte, then the image's bytes in (C, H, W) order."""
    return b"".join(bytes([label]) + image.tobytes() for image, label in zip(images, labels))


def _write_cifar(path, batches, extra=(), skip=()):
    """A gzip tar archive laid out like cifar-10-binary.tar.gz; ``extra``: (name, payload, type, link) more members."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        _tar_add(tar, "cifar-10-batches-bin/batches.meta.txt", b"airplane\nautomobile\n")
        for member, (images, labels) in batches.items():
            if member not in skip:
                _tar_add(tar, member, _records(images, labels))
        for member in extra:
            _tar_add(tar, *member)


def _expected(name, folder, seed=0):
    """Writes dataset ``name``'s files into ``folder`` -> (images_train, labels_train, images_test, labels_test),
    images as (N, C, H, W) uint8."""
    if name == "fashion-mnist":
        train_images, train_labels, test_images, test_labels = _write_fashion(folder, seed=seed)
        return train_images[:, None], train_labels, test_images[:, None], test_labels
    batches = _cifar_batches(seed=seed)
    _write_cifar(folder / CIFAR10_ARCHIVE, batches)
    train = [batches[m] for m in CIFAR10_TRAIN_MEMBERS]
    test_images, test_labels = batches[CIFAR10_TEST_MEMBER]
    return np.concatenate([i for i, _ in train]), np.concatenate([lab for _, lab in train]), test_images, test_labels


def _check_loaded(loaded, expected, name, dtype):
    """Shapes, dtype, (C, H, W) order and one-hot labels of ``loaded`` against the generated arrays."""
    shape = IMAGE_SHAPES[name]
    for x, y, images, labels in (
        (loaded.x_train, loaded.y_train, *expected[:2]),
        (loaded.x_test, loaded.y_test, *expected[2:]),
    ):
        assert x.shape == (images.shape[0], math.prod(shape)) and y.shape == (images.shape[0], 10)
        assert x.dtype == y.dtype == np.dtype(dtype)
        assert images.shape[1:] == shape
        np.testing.assert_array_equal(np.rint(x.reshape(-1, *shape) * 255).astype(np.uint8), images)
        np.testing.assert_array_equal(y, np.eye(10)[labels])


NAMES = ["fashion-mnist", "cifar10"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_download_into_the_cache_then_load_from_it(name, dtype, cache_root, serve, monkeypatch, tmp_path):
    """With nothing local, the files come from the second mirror (the first is dead) into the cache,
    verified; they load with the generated pixels in (C, H, W) order and one-hot labels; the next
    load reads the cache with every mirror dead."""
    expected = _expected(name, tmp_path / "mirror")
    _publish(monkeypatch, name, tmp_path / "mirror")
    monkeypatch.setenv(MIRROR_ENV[name], f"{DEAD} {serve(tmp_path / 'mirror')}")
    _check_loaded(load_dataset(name, dtype=dtype, timeout=5), expected, name, dtype)
    cached = cache_root / name
    assert sorted(os.listdir(cached)) == sorted(f.name for f in dataset_files.SOURCES[name].files)
    monkeypatch.setenv(MIRROR_ENV[name], DEAD)
    _check_loaded(load_dataset(name, dtype=dtype, timeout=1), expected, name, dtype)


def test_cifar_pixels_are_read_as_channel_planes(tmp_path, monkeypatch):
    """A record's 3,072 pixel bytes are the red, green and blue 32x32 planes: a red-only image
    has its non-zero values in the first 1,024 inputs, and pixel (c, h, w) at c*1024 + h*32 + w."""
    batches = _cifar_batches(n_per_batch=(1, 1, 1, 1, 1), n_test=1)
    images, labels = batches[CIFAR10_TEST_MEMBER]
    images[:] = 0
    images[0, 0] = 255  # all red
    images[0, 2, 5, 7] = 51  # one blue pixel at row 5, column 7
    _write_cifar(tmp_path / CIFAR10_ARCHIVE, batches)
    _publish(monkeypatch, "cifar10", tmp_path)
    x = load_dataset("cifar10", str(tmp_path), download=False).x_test[0]
    assert np.all(x[:1024] == 1.0) and np.count_nonzero(x[1024:]) == 1
    assert x[2 * 1024 + 5 * 32 + 7] == np.float32(0.2)


@pytest.mark.parametrize("name", NAMES)
def test_an_explicit_folder_is_the_only_place_looked_at(name, cache_root, monkeypatch, tmp_path):
    """data_dir or data_dir/<name> holds the files; a folder without them is an error naming both
    places, with no download and nothing written to the cache."""
    expected = _expected(name, tmp_path / "data" / name)
    _publish(monkeypatch, name, tmp_path / "data" / name)
    _check_loaded(load_dataset(name, str(tmp_path / "data")), expected, name, "float32")
    with pytest.raises(DatasetNotFoundError, match="not found in") as err:
        load_dataset(name, str(tmp_path / "nowhere"))
    for part in (str(tmp_path / "nowhere"), "no such folder", str(tmp_path / "nowhere" / name), "--data-dir"):
        assert part in str(err.value)
    assert not cache_root.exists()


@pytest.mark.parametrize("name", NAMES)
def test_offline_with_nothing_local_says_where_it_looked_and_how_to_get_the_files(name, cache_root):
    source = dataset_files.SOURCES[name]
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, timeout=1)
    message = str(err.value)
    for part in (str(cache_root / name), DEAD, source.mirror_env, source.homepage, "--data-dir", source.files[0].name):
        assert part in message
    with pytest.raises(DatasetNotFoundError, match="downloads disabled"):
        load_dataset(name, download=False)
    assert [n for n in os.listdir(cache_root / name) if n.startswith(".")] == []


def _flip_last_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def _cut_in_half(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


DAMAGE = {
    # case: (damage to the served file, what the error says)
    "corrupt": (_flip_last_byte, "SHA-256 is [0-9a-f]{64}, expected"),
    "truncated": (_cut_in_half, r"\d+ bytes, expected \d+ \(cut short\?\)"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
@pytest.mark.parametrize("name", NAMES)
def test_a_bad_download_is_refused_and_never_kept(name, case, cache_root, serve, monkeypatch, tmp_path):
    """A served file with other bytes or cut short: the error names its URL and the fault; neither
    it nor a temporary file is left in the cache, and files that arrived whole are kept."""
    mirror = tmp_path / "mirror"
    _expected(name, mirror)
    _publish(monkeypatch, name, mirror)
    bad = dataset_files.SOURCES[name].files[-1].name
    damage, expected = DAMAGE[case]
    damage(mirror / bad)
    url = serve(mirror)
    monkeypatch.setenv(MIRROR_ENV[name], url)
    with pytest.raises(DatasetNotFoundError, match=f"{re.escape(url + bad)}: the download is {expected}"):
        load_dataset(name, timeout=5)
    assert [n for n in os.listdir(cache_root / name) if n.startswith(".")] == []
    cached = sorted(os.listdir(cache_root / name))
    assert cached == sorted(f.name for f in dataset_files.SOURCES[name].files if f.name != bad)


@pytest.mark.parametrize("case", list(DAMAGE))
@pytest.mark.parametrize("name", NAMES)
def test_a_damaged_local_file_is_a_value_error_naming_it(name, case, cache_root, monkeypatch, tmp_path):
    """A file in the folder that is not the published one (checked by size, then SHA-256) is
    refused before it is read, with its path in the message."""
    _expected(name, tmp_path)
    _publish(monkeypatch, name, tmp_path)
    path = tmp_path / dataset_files.SOURCES[name].files[0].name
    damage, expected = DAMAGE[case]
    damage(path)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: {expected}.*not the original"):
        load_dataset(name, str(tmp_path))


def _missing_member(path, batches):
    _write_cifar(path, batches, skip=[CIFAR10_TRAIN_MEMBERS[2]])


def _python_version(path, batches):
    """The pickle version's layout (cifar-10-batches-py/...): not what the reader accepts."""
    _write_cifar(path, {m.replace("-bin/", "-py/").replace(".bin", ""): b for m, b in batches.items()})


def _partial_record(path, batches):
    images, labels = batches[CIFAR10_TEST_MEMBER]
    _write_cifar(
        path, batches, skip=[CIFAR10_TEST_MEMBER], extra=[(CIFAR10_TEST_MEMBER, _records(images, labels)[:-5])]
    )


def _label_out_of_range(path, batches):
    batches[CIFAR10_TRAIN_MEMBERS[1]][1][0] = 10
    _write_cifar(path, batches)


def _symlinked_member(path, batches):
    _write_cifar(
        path, batches, skip=[CIFAR10_TEST_MEMBER], extra=[(CIFAR10_TEST_MEMBER, b"", tarfile.SYMTYPE, "/etc/passwd")]
    )


def _twice(path, batches):
    _write_cifar(path, batches, extra=[(CIFAR10_TEST_MEMBER, _records(*batches[CIFAR10_TEST_MEMBER]))])


def _not_gzip(path, batches):
    path.write_bytes(b"\x80\x04not a tar archive" * 10)


ARCHIVE_DAMAGE = {
    # case: (writes a bad archive (its SHA-256 then counts as published), what the error says)
    "missing_member": (_missing_member, f"the archive lacks {CIFAR10_TRAIN_MEMBERS[2]}"),
    "pickle_version": (_python_version, "lacks cifar-10-batches-bin/data_batch_1.bin.*binary version"),
    "partial_record": (_partial_record, f"{CIFAR10_TEST_MEMBER} holds \\d+ bytes, not a positive multiple"),
    "label_out_of_range": (_label_out_of_range, f"{CIFAR10_TRAIN_MEMBERS[1]} has label 10"),
    "symlinked_member": (_symlinked_member, f"{CIFAR10_TEST_MEMBER} is not a regular file"),
    "member_twice": (_twice, f"holds {CIFAR10_TEST_MEMBER} twice"),
    "not_gzip": (_not_gzip, "not a complete gzip tar archive"),
}


@pytest.mark.parametrize("case", list(ARCHIVE_DAMAGE))
def test_a_malformed_cifar_archive_is_a_value_error_naming_it(case, monkeypatch, tmp_path):
    """Archives that pass the checksum (patched) but are not CIFAR-10's binary layout are refused
    with the archive's path and the member at fault."""
    write, expected = ARCHIVE_DAMAGE[case]
    write(tmp_path / CIFAR10_ARCHIVE, _cifar_batches())
    _publish(monkeypatch, "cifar10", tmp_path)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / CIFAR10_ARCHIVE))}: .*{expected}"):
        load_dataset("cifar10", str(tmp_path), download=False)


def test_members_outside_the_batch_folder_are_never_written(monkeypatch, tmp_path):
    """An archive with members named '../escape' and '/tmp/...' beside the real ones loads, and
    nothing is written anywhere: members are read into memory by exact name."""
    folder = tmp_path / "data"
    batches = _cifar_batches()
    evil = [
        ("../escape.bin", b"x"),
        (str(tmp_path / "absolute.bin"), b"x"),
        ("cifar-10-batches-bin/../../up.bin", b"x"),
    ]
    _write_cifar(folder / CIFAR10_ARCHIVE, batches, extra=evil)
    _publish(monkeypatch, "cifar10", folder)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert load_dataset("cifar10", str(folder), download=False).x_train.shape == (10, 3072)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_recompressed_fashion_copy_is_refused_but_loads_unverified(monkeypatch, tmp_path):
    """The published SHA-256 hashes the .gz bytes: the same images gzipped again differ, are
    refused by load_dataset, and still load through load_idx_dataset (unverified)."""
    _write_fashion(tmp_path)
    _publish(monkeypatch, "fashion-mnist", tmp_path)
    name = MNIST_FILES["test_labels"][0]
    raw = gzip.decompress((tmp_path / name).read_bytes())
    (tmp_path / name).write_bytes(gzip.compress(raw, compresslevel=1, mtime=1))
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / name))}: .*not the original Fashion-MNIST"):
        load_dataset("fashion-mnist", str(tmp_path))
    assert data.load_idx_dataset(str(tmp_path)).y_test.shape == (3, 10)


def test_mnist_names_keep_their_loaders(cache_root):
    """'mnist' goes through find_mnist (an explicit folder holding the slice loads as the slice);
    'mnist-slice' is the bundled slice; image sizes agree with IMAGE_SHAPES."""
    slice_ = load_dataset("mnist-slice", dtype="float64")
    assert slice_.x_train.shape == (2000, math.prod(IMAGE_SHAPES["mnist-slice"])) and slice_.x_train.dtype == np.float64
    explicit = load_dataset("mnist", MNIST_SLICE_DIR, download=False)
    np.testing.assert_array_equal(explicit.x_test, slice_.x_test.astype(np.float32))
    assert explicit.x_test.shape[1] == math.prod(IMAGE_SHAPES["mnist"])
    with pytest.raises(DatasetNotFoundError, match="MNIST not found.*downloads disabled"):
        load_dataset("mnist", download=False)


def test_unknown_names_and_dtypes_are_refused(cache_root):
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'; expected one of 'mnist', 'mnist-slice'"):
        load_dataset("cifar100")
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64', got 'float16'"):
        load_dataset("cifar10", dtype="float16")
    assert not cache_root.exists()  # refused before any lookup or download
    assert sorted(IMAGE_SHAPES) == sorted(["mnist", "mnist-slice", *dataset_files.SOURCES])


def test_the_published_table_is_well_formed():
    """Every file has a positive size and a 64-digit hex SHA-256; Fashion-MNIST uses MNIST's file names."""
    for source in dataset_files.SOURCES.values():
        assert source.files and source.mirrors and source.mirror_env.startswith("DFA_")
        for file in source.files:
            assert file.size > 0 and re.fullmatch("[0-9a-f]{64}", file.sha256), file
    fashion = {f.name for f in dataset_files.FASHION_MNIST.files}
    assert fashion == {name for name, _, _ in MNIST_FILES.values()}
    assert [f.name for f in dataset_files.CIFAR10.files] == [CIFAR10_ARCHIVE]


def test_dataset_files_imports_nothing_of_the_package():
    """dataset_files sits below dfa_train.data (which imports it): no import cycle."""
    tree = ast.parse(open(dataset_files.__file__).read())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.split(".")[0] in ("dfa_train", "dfa_core")], imported
