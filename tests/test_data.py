"""dfa_train.data: checked MNIST loading from gzip IDX files, the bundled slice, damaged files, and XOR."""

import gzip
import hashlib
import os
import re
import shutil

import numpy as np
import pytest
from dfa_test_data import full_mnist_dir, mnist, mnist_dir

from dfa_train.data import (
    MNIST_FILES,
    MNIST_SLICE_DIR,
    MNIST_SLICE_FILES,
    DatasetNotFoundError,
    load_idx_dataset,
    load_mnist,
    load_mnist_slice,
    make_mnist_slice,
    read_idx,
    write_idx,
    xor_dataset,
)

SLICE_TRAIN_COUNTS = [191, 220, 198, 191, 214, 180, 200, 224, 172, 210]  # digits 0..9 in the first 2,000
SLICE_TEST_COUNTS = [42, 67, 55, 45, 55, 50, 43, 49, 40, 54]  # and in the first 500 test images


@pytest.mark.full_mnist
def test_mnist_shapes_ranges_and_labels():
    """60000/10000 images flattened to 784 values in [0, 1], one-hot labels of 10 classes."""
    data = mnist()
    assert data.x_train.shape == (60000, 784) and data.y_train.shape == (60000, 10)
    assert data.x_test.shape == (10000, 784) and data.y_test.shape == (10000, 10)
    assert data.x_train.dtype == np.float32
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    for y in (data.y_train, data.y_test):
        np.testing.assert_array_equal(y.sum(axis=1), 1)
    # The well-known class counts of MNIST's training set.
    np.testing.assert_array_equal(
        data.y_train.sum(axis=0), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    )


def test_bundled_slice_shapes_ranges_and_labels():
    """The slice: 2000/500 images of 784 values in [0, 1], one-hot labels with its class counts."""
    data = load_mnist_slice("float64")
    assert data.x_train.shape == (2000, 784) and data.y_train.shape == (2000, 10)
    assert data.x_test.shape == (500, 784) and data.y_test.shape == (500, 10)
    assert data.x_train.dtype == np.float64
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    for y in (data.y_train, data.y_test):
        np.testing.assert_array_equal(y.sum(axis=1), 1)
    np.testing.assert_array_equal(data.y_train.sum(axis=0), SLICE_TRAIN_COUNTS)
    np.testing.assert_array_equal(data.y_test.sum(axis=0), SLICE_TEST_COUNTS)


def test_bundled_slice_files_match_their_sha256():
    """Every .gz file hashes to its line in SHA256SUMS (and README.md); its content to MNIST_SLICE_FILES."""
    sums = dict(reversed(line.split()) for line in open(os.path.join(MNIST_SLICE_DIR, "SHA256SUMS")))
    readme = open(os.path.join(MNIST_SLICE_DIR, "README.md")).read()
    assert sorted(sums) == sorted(name for name, _, _ in MNIST_SLICE_FILES.values())
    for name, content_sha, _ in MNIST_SLICE_FILES.values():
        path = os.path.join(MNIST_SLICE_DIR, name)
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sums[name]
        with gzip.open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == content_sha
        assert sums[name] in readme and content_sha in readme


@pytest.mark.full_mnist
def test_bundled_slice_is_the_start_of_mnist(tmp_path):
    """The slice holds MNIST's first 2,000/500 records unchanged, and make_mnist_slice remakes it."""
    full, part = load_mnist(str(full_mnist_dir())), load_mnist_slice()
    np.testing.assert_array_equal(part.x_train, full.x_train[:2000])
    np.testing.assert_array_equal(part.y_test, full.y_test[:500])
    make_mnist_slice(str(full_mnist_dir()), str(tmp_path))
    for name, content_sha, _ in MNIST_SLICE_FILES.values():
        read_idx(str(tmp_path / name), content_sha)


def test_write_idx_round_trips_and_is_reproducible(tmp_path):
    """Same array -> same bytes wherever and whenever written; read_idx gives the array back."""
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(str(tmp_path / "a.gz"), images)
    write_idx(str(tmp_path / "other-name.gz"), images)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "other-name.gz").read_bytes()
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a.gz"), None, 2051), images)
    with pytest.raises(ValueError, match="uint8"):
        write_idx(str(tmp_path / "b.gz"), images.astype(np.int32))


def _write_idx(path, dims, payload, magic=None):
    magic = magic if magic is not None else 0x0800 | len(dims)
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(payload))


def test_read_idx_rejects_a_wrong_checksum(tmp_path):
    """A file whose decompressed bytes do not hash to the expected SHA-256 is refused."""
    path = tmp_path / "labels.gz"
    _write_idx(path, (3,), [1, 2, 3])
    np.testing.assert_array_equal(read_idx(str(path)), [1, 2, 3])
    with pytest.raises(ValueError, match="SHA-256"):
        read_idx(str(path), expected_sha256=MNIST_FILES["train_labels"][1])


def test_read_idx_rejects_bad_headers(tmp_path):
    """Truncated data and non-byte IDX types give errors naming the problem."""
    path = tmp_path / "short.gz"
    _write_idx(path, (2, 2, 2), [0] * 7)
    with pytest.raises(ValueError, match="header announces shape"):
        read_idx(str(path))
    _write_idx(path, (2,), [0] * 8, magic=0x0D01)  # float32 IDX
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(str(path))
    _write_idx(path, (2**31, 2**31, 2**31), [])  # a size that would overflow int64
    with pytest.raises(ValueError, match="header announces shape"):
        read_idx(str(path))


def test_load_mnist_checks_every_file(tmp_path):
    """A corrupted copy of one file makes load_mnist fail with the file's name."""
    src = mnist_dir()
    for name, _, _ in MNIST_FILES.values():
        os.symlink(src / name, tmp_path / name)
    bad = MNIST_FILES["test_labels"][0]
    os.remove(tmp_path / bad)
    _write_idx(tmp_path / bad, (10000,), [0] * 10000)
    with pytest.raises(ValueError, match=f"{bad}: SHA-256"):
        load_mnist(str(tmp_path))


@pytest.mark.full_mnist
def test_load_mnist_refuses_full_mnist_mixed_with_the_slice(tmp_path):
    for name, _, _ in MNIST_FILES.values():
        os.symlink(os.path.join(MNIST_SLICE_DIR, name), tmp_path / name)
    name = MNIST_FILES["test_images"][0]
    os.remove(tmp_path / name)
    os.symlink(full_mnist_dir() / name, tmp_path / name)
    with pytest.raises(ValueError, match=f"must come from one set, .*{name} is from MNIST"):
        load_mnist(str(tmp_path))


def test_load_mnist_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST folder not found"):
        load_mnist(str(tmp_path / "nowhere"))


def _tiny_dataset(folder, n_train=6, n_test=3, test_size=(4, 4)):
    """Four valid IDX files of 4x4 images (6 train, 3 test) in ``folder``; returns file paths by part."""
    rng = np.random.default_rng(0)
    shapes = {
        "train_images": (n_train, 4, 4),
        "train_labels": (n_train,),
        "test_images": (n_test, *test_size),
        "test_labels": (n_test,),
    }
    files = {}
    for part, (name, _, _) in MNIST_FILES.items():
        high = 10 if part.endswith("labels") else 256
        files[part] = write_idx(os.path.join(folder, name), rng.integers(0, high, shapes[part]).astype(np.uint8))
    return files


def _truncate(path):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])


def _ungzip(path):
    raw = gzip.open(path).read()
    open(path, "wb").write(raw)


def _garble(path):
    raw = bytearray(open(path, "rb").read())
    raw[-6] ^= 0xFF  # inside the CRC-32 trailer
    open(path, "wb").write(bytes(raw))


def _label_file_as_images(path):
    write_idx(path, np.zeros(6, dtype=np.uint8))


FILE_DAMAGE = {
    # case: (damage to train-images-idx3-ubyte.gz, what the error must say)
    "truncated": (_truncate, "the gzip data ends early, the file is truncated"),
    "not_gzip": (_ungzip, r"not a gzip file \(it looks like an uncompressed IDX file"),
    "corrupt_gzip": (_garble, "the gzip data is corrupt"),
    "wrong_magic": (_label_file_as_images, r"IDX magic number 2049, expected 2051 \(an image file"),
}


@pytest.mark.parametrize("loader", [load_idx_dataset, load_mnist], ids=["idx", "mnist"])
@pytest.mark.parametrize("case", list(FILE_DAMAGE))
def test_a_damaged_file_is_a_value_error_naming_it(tmp_path, case, loader):
    """No bare EOFError / BadGzipFile / zlib.error: a ValueError that names the file and the fault,
    from the unverified loader and from load_mnist (which checks structure before the checksum)."""
    files = _tiny_dataset(str(tmp_path))
    damage, expected = FILE_DAMAGE[case]
    damage(files["train_images"])
    with pytest.raises(ValueError, match=f"{re.escape(files['train_images'])}: {expected}"):
        loader(str(tmp_path))


FOLDER_DAMAGE = {
    # case: (dataset arguments, file the error names, what it must say)
    "image_sizes_differ": (dict(test_size=(5, 4)), "test_images", "train and test images must have one size"),
    "counts_differ": (dict(n_test=2), "test_labels", "3 labels, but .* holds 2 images"),
}


@pytest.mark.parametrize("case", list(FOLDER_DAMAGE))
def test_files_that_disagree_are_a_value_error_naming_them(tmp_path, case):
    kwargs, part, expected = FOLDER_DAMAGE[case]
    files = _tiny_dataset(str(tmp_path), **kwargs)
    if case == "counts_differ":  # 2 test images, then 3 labels
        write_idx(files["test_labels"], np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match=f"{re.escape(files[part])}: .*{expected}"):
        load_idx_dataset(str(tmp_path))


def test_labels_out_of_range_name_the_file(tmp_path):
    files = _tiny_dataset(str(tmp_path))
    write_idx(files["train_labels"], np.full(6, 12, dtype=np.uint8))
    with pytest.raises(ValueError, match=f"{re.escape(files['train_labels'])}: label 12 found"):
        load_idx_dataset(str(tmp_path), num_classes=10)


def test_a_missing_file_is_named(tmp_path):
    files = _tiny_dataset(str(tmp_path))
    os.remove(files["test_labels"])
    with pytest.raises(DatasetNotFoundError, match=f"IDX file not found: {re.escape(files['test_labels'])}"):
        load_idx_dataset(str(tmp_path))


def test_a_damaged_slice_copy_is_refused(tmp_path):
    """load_mnist accepts a copy of the slice anywhere, but only with every file intact."""
    shutil.copytree(MNIST_SLICE_DIR, tmp_path / "copy")
    assert load_mnist(str(tmp_path / "copy")).x_test.shape == (500, 784)
    name = MNIST_SLICE_FILES["train_labels"][0]
    write_idx(str(tmp_path / "copy" / name), np.zeros(2000, dtype=np.uint8))
    with pytest.raises(ValueError, match=f"{name}: SHA-256 .* or {MNIST_SLICE_FILES['train_labels'][1]}"):
        load_mnist(str(tmp_path / "copy"))


def test_xor_dataset():
    x, y = xor_dataset("float64")
    assert x.dtype == y.dtype == np.float64
    np.testing.assert_array_equal(y[:, 0], np.logical_xor(x[:, 0], x[:, 1]))
