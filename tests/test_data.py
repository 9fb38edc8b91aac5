"""dfa_train.data: checked MNIST loading from gzip IDX files, and the XOR set."""

import gzip
import os

import numpy as np
import pytest

from dfa_train.data import MNIST_FILES, load_mnist, read_idx, xor_dataset

from dfa_test_data import mnist, mnist_dir


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


def test_load_mnist_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST folder not found"):
        load_mnist(str(tmp_path / "nowhere"))


def test_xor_dataset():
    x, y = xor_dataset("float64")
    assert x.dtype == y.dtype == np.float64
    np.testing.assert_array_equal(y[:, 0], np.logical_xor(x[:, 0], x[:, 1]))
