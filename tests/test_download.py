"""dfa_train.data.find_mnist: path, env and cache lookup, and verified downloads from a local HTTP server.

The server runs on 127.0.0.1 in a thread and serves a copy of the tests' MNIST folder; nothing
leaves the machine. Without full MNIST that folder is the bundled slice, and the slice's hashes
stand in for MNIST's (the ``source`` fixture), so the download, verification and cache code runs
either way.
"""

import functools
import gzip
import http.server
import os
import shutil
import threading

import numpy as np
import pytest

from dfa_train import data
from dfa_train.data import MNIST_FILES, DatasetNotFoundError, find_mnist, load_mnist

NAMES = [name for name, _, _ in MNIST_FILES.values()]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve(tmp_path):
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
def source(mnist_source, monkeypatch):
    """The MNIST folder to serve, found before ``cache`` hides $DFA_DATA_DIR and the user cache.
    On the bundled slice, find_mnist verifies downloads against the slice's hashes."""
    folder, is_full = mnist_source
    if not is_full:
        monkeypatch.setattr(data, "MNIST_FILES", data.MNIST_SLICE_FILES)
    return folder


@pytest.fixture
def cache(source, tmp_path, monkeypatch):
    """An empty user cache (XDG_CACHE_HOME) and no $DFA_DATA_DIR; returns the MNIST cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DFA_DATA_DIR", raising=False)
    monkeypatch.delenv("DFA_MNIST_MIRROR", raising=False)
    return tmp_path / "xdg" / "dfa-framework" / "mnist"


def _leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".")] if os.path.isdir(folder) else []


def test_download_into_the_cache_then_reuse_it(cache, serve, source):
    """With nothing local, the four files come from the mirror into the cache, verified; the
    next lookup finds the cache without the server (a dead mirror is not asked)."""
    url = serve(source)
    folder = find_mnist(base_urls=["http://127.0.0.1:9/", url], timeout=5)  # the first mirror is down
    assert folder == str(cache) and sorted(os.listdir(cache)) == sorted(NAMES)
    np.testing.assert_array_equal(load_mnist(folder).x_test, load_mnist(str(source)).x_test)
    assert find_mnist(base_urls=["http://127.0.0.1:9/"], timeout=1) == str(cache)


def test_mirror_from_the_environment(cache, serve, source, monkeypatch):
    monkeypatch.setenv("DFA_MNIST_MIRROR", serve(source))
    assert find_mnist(timeout=5) == str(cache)


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_bad_download_is_refused_and_not_kept(cache, serve, source, tmp_path, damage):
    """A file with the wrong content or cut short gives a clear error; neither it nor a
    temporary file is left in the cache, and the good files are kept."""
    mirror = tmp_path / "mirror"
    shutil.copytree(source, mirror)
    bad = MNIST_FILES["train_labels"][0]
    if damage == "corrupt":
        with gzip.open(mirror / bad, "wb") as f:
            f.write(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(10))
    else:
        data = (mirror / bad).read_bytes()
        (mirror / bad).write_bytes(data[: len(data) // 2])
    url = serve(mirror)
    with pytest.raises(DatasetNotFoundError, match="SHA-256" if damage == "corrupt" else "not a complete gzip") as err:
        find_mnist(base_urls=[url], timeout=5)
    assert str(err.value).count(url + bad) == 1  # the failed URL is named, once
    assert bad not in os.listdir(cache) and _leftovers(cache) == []
    assert MNIST_FILES["train_images"][0] in os.listdir(cache)


def test_offline_with_nothing_local_says_where_it_looked(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("DFA_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(DatasetNotFoundError) as err:
        find_mnist(base_urls=["http://127.0.0.1:9/"], timeout=1)
    message = str(err.value)
    for part in (
        "DFA_DATA_DIR",
        str(tmp_path / "empty"),
        str(tmp_path / "empty" / "mnist"),
        str(cache),
        "--data-dir",
        "127.0.0.1:9",
        "train-images-idx3-ubyte.gz",
        "--dataset mnist-slice",
    ):
        assert part in message
    with pytest.raises(DatasetNotFoundError, match="downloads disabled") as err:
        find_mnist(download=False)
    assert "--dataset mnist-slice" in str(err.value)


def test_explicit_path_then_environment(cache, source, monkeypatch, tmp_path):
    """An explicit path is the only place looked at; $DFA_DATA_DIR may name the folder or its parent."""
    with pytest.raises(DatasetNotFoundError, match="MNIST not found in") as err:
        find_mnist(str(tmp_path / "nowhere"))
    assert "no such folder" in str(err.value) and "--dataset mnist-slice" in str(err.value)
    assert find_mnist(str(source)) == str(source)
    parent = tmp_path / "data"
    parent.mkdir()
    os.symlink(source, parent / "mnist")
    monkeypatch.setenv("DFA_DATA_DIR", str(parent))
    assert os.path.samefile(find_mnist(download=False), source)


def test_offline_falls_back_to_the_bundled_slice_with_a_warning(cache, monkeypatch, tmp_path):
    """No local MNIST and a dead mirror: find_mnist_or_slice warns (saying where it looked) and
    returns the slice, which loads as 2,000/500; with a full copy found it returns that, unflagged."""
    monkeypatch.setenv("DFA_DATA_DIR", str(tmp_path / "empty"))
    with pytest.warns(data.MnistSliceWarning, match="looked in") as record:
        folder, is_slice = data.find_mnist_or_slice(base_urls=["http://127.0.0.1:9/"], timeout=1)
    assert is_slice and os.path.samefile(folder, data.MNIST_SLICE_DIR)
    assert "bundled slice" in str(record[0].message) and str(cache) in str(record[0].message)
    loaded = load_mnist(folder)
    assert (loaded.x_train.shape, loaded.x_test.shape) == ((2000, 784), (500, 784))
    with pytest.warns(data.MnistSliceWarning, match="downloads disabled"):
        assert data.find_mnist_or_slice(download=False)[1]


def test_or_slice_keeps_an_explicit_path_and_flags_the_slice(cache, source, monkeypatch, tmp_path):
    """An explicit folder that lacks MNIST is an error, not a fallback; a folder that holds the
    slice (e.g. $DFA_DATA_DIR pointing at it) is returned flagged as the slice."""
    with pytest.raises(DatasetNotFoundError, match="MNIST not found in"):
        data.find_mnist_or_slice(str(tmp_path / "nowhere"))
    monkeypatch.setenv("DFA_DATA_DIR", data.MNIST_SLICE_DIR)
    assert data.find_mnist_or_slice(download=False) == (data.MNIST_SLICE_DIR, True)
    assert data.find_mnist_or_slice(str(source)) == (str(source), data.is_mnist_slice(str(source)))
