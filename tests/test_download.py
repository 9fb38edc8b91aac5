"""dfa_train.data.find_mnist: path, env and cache lookup, and verified downloads from a local HTTP server.

The server runs on 127.0.0.1 in a thread and serves copies of the shared MNIST folder;
nothing leaves the machine.
"""

import functools
import gzip
import http.server
import os
import shutil
import threading

import pytest

from dfa_train.data import MNIST_FILES, DatasetNotFoundError, find_mnist, load_mnist

from dfa_test_data import mnist_dir

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
def cache(tmp_path, monkeypatch):
    """An empty user cache (XDG_CACHE_HOME) and no $DFA_DATA_DIR; returns the MNIST cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DFA_DATA_DIR", raising=False)
    monkeypatch.delenv("DFA_MNIST_MIRROR", raising=False)
    return tmp_path / "xdg" / "dfa-framework" / "mnist"


def _leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".")] if os.path.isdir(folder) else []


def test_download_into_the_cache_then_reuse_it(cache, serve):
    """With nothing local, the four files come from the mirror into the cache, verified; the
    next lookup finds the cache without the server (a dead mirror is not asked)."""
    url = serve(mnist_dir())
    folder = find_mnist(base_urls=["http://127.0.0.1:9/", url], timeout=5)  # the first mirror is down
    assert folder == str(cache) and sorted(os.listdir(cache)) == sorted(NAMES)
    assert load_mnist(folder).x_test.shape == (10000, 784)
    assert find_mnist(base_urls=["http://127.0.0.1:9/"], timeout=1) == str(cache)


def test_mirror_from_the_environment(cache, serve, monkeypatch):
    monkeypatch.setenv("DFA_MNIST_MIRROR", serve(mnist_dir()))
    assert find_mnist(timeout=5) == str(cache)


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_bad_download_is_refused_and_not_kept(cache, serve, tmp_path, damage):
    """A file with the wrong content or cut short gives a clear error; neither it nor a
    temporary file is left in the cache, and the good files are kept."""
    mirror = tmp_path / "mirror"
    shutil.copytree(mnist_dir(), mirror)
    bad = MNIST_FILES["train_labels"][0]
    if damage == "corrupt":
        with gzip.open(mirror / bad, "wb") as f:
            f.write(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(10))
    else:
        data = (mirror / bad).read_bytes()
        (mirror / bad).write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetNotFoundError, match="SHA-256" if damage == "corrupt" else "not a complete gzip"):
        find_mnist(base_urls=[serve(mirror)], timeout=5)
    assert bad not in os.listdir(cache) and _leftovers(cache) == []
    assert MNIST_FILES["train_images"][0] in os.listdir(cache)


def test_offline_with_nothing_local_says_where_it_looked(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("DFA_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(DatasetNotFoundError) as err:
        find_mnist(base_urls=["http://127.0.0.1:9/"], timeout=1)
    message = str(err.value)
    for part in ("DFA_DATA_DIR", str(cache), "--data-dir", "127.0.0.1:9", "train-images-idx3-ubyte.gz"):
        assert part in message
    with pytest.raises(DatasetNotFoundError, match="downloads disabled"):
        find_mnist(download=False)


def test_explicit_path_then_environment(cache, monkeypatch, tmp_path):
    """An explicit path is the only place looked at; $DFA_DATA_DIR may name the folder or its parent."""
    with pytest.raises(DatasetNotFoundError, match="MNIST not found in"):
        find_mnist(str(tmp_path / "nowhere"))
    assert find_mnist(str(mnist_dir())) == str(mnist_dir())
    monkeypatch.setenv("DFA_DATA_DIR", str(mnist_dir().parent))
    assert os.path.samefile(find_mnist(download=False), mnist_dir())
