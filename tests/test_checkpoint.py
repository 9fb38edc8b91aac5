"""dfa_train.checkpoint: backend-neutral optimizer states, exact resume, cross-backend loading, atomic files."""

import os

import numpy as np
import pytest

from dfa_core import MLPSpec, OptimizerSpec, get_backend, init_params
from dfa_train.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dfa_train.state import opt_state_from_numpy, opt_state_to_numpy
from dfa_train.trainer import fit

SPEC64 = MLPSpec((8, 6, 3), dtype="float64")
OPTIMIZERS = {
    "sgd": OptimizerSpec("sgd", 0.05),
    "momentum": OptimizerSpec("momentum", 0.05),
    "adam": OptimizerSpec("adam", 1e-2),
}


def _data(n=90, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    return x, np.eye(3)[(x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)]


X, Y = _data()
FIT_KW = dict(batch_size=32, seed=3, align_every=0)


def _checkpoint_after(backend, opt, epochs, path):
    """Runs ``epochs`` epochs and saves the checkpoint of the last one to ``path``."""

    def on_epoch(e):
        if e.epoch == epochs:
            save_checkpoint(path, Checkpoint(e.params, e.feedback, e.resume, {"backend": backend}))

    fit(backend, SPEC64, X, Y, optimizer=opt, epochs=epochs, on_epoch=on_epoch, **FIT_KW)
    return load_checkpoint(path)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_opt_state_keys_agree_between_backends(opt_name):
    """torch and optax states flatten to the same keys and shapes, and refill each other's templates."""
    flat = {}
    for name in ("torch", "jax"):
        be = get_backend(name)
        tx = be.make_optimizer(OPTIMIZERS[opt_name], "float64")
        with be.precision_scope("float64"):
            flat[name] = opt_state_to_numpy(be, tx.init(be.asarray(init_params(SPEC64))))
    assert sorted(flat["torch"]) == sorted(flat["jax"])
    for key in flat["torch"]:
        assert flat["torch"][key].shape == flat["jax"][key].shape, key
    be = get_backend("jax")
    with be.precision_scope("float64"):
        template = be.make_optimizer(OPTIMIZERS[opt_name], "float64").init(be.asarray(init_params(SPEC64)))
        filled = opt_state_from_numpy(be, template, {k: v + 1 for k, v in flat["torch"].items()})
        back = opt_state_to_numpy(be, filled)
    for key, value in flat["torch"].items():
        np.testing.assert_array_equal(back[key], value + 1)


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
def test_resume_from_a_saved_checkpoint_is_exact(tmp_path, backend, opt_name):
    """4 epochs straight and 2 epochs + save + load + 2 more epochs give identical params and losses."""
    opt = OPTIMIZERS[opt_name]
    straight = fit(backend, SPEC64, X, Y, optimizer=opt, epochs=4, **FIT_KW)
    ckpt = _checkpoint_after(backend, opt, 2, str(tmp_path / "c.npz"))
    assert ckpt.resume.epoch == 2 and len(ckpt.resume.train_error) == 2
    resumed = fit(
        backend,
        SPEC64,
        X,
        Y,
        optimizer=opt,
        epochs=4,
        params=ckpt.params,
        feedback=ckpt.feedback,
        resume=ckpt.resume,
        **FIT_KW,
    )
    assert resumed.loss == straight.loss and resumed.train_error == straight.train_error
    for (w, b), (w_ref, b_ref) in zip(resumed.params, straight.params):
        np.testing.assert_array_equal(w, w_ref)
        np.testing.assert_array_equal(b, b_ref)


@pytest.mark.parametrize("writer,reader", [("torch", "jax"), ("jax", "torch")])
def test_checkpoint_of_one_backend_resumes_on_the_other(tmp_path, writer, reader):
    """A checkpoint written by one backend (Adam state included) loads into the other and
    continues to the params of an uninterrupted run, within float64 rounding (rtol 1e-10)."""
    opt = OPTIMIZERS["adam"]
    straight = fit(writer, SPEC64, X, Y, optimizer=opt, epochs=4, **FIT_KW)
    ckpt = _checkpoint_after(writer, opt, 2, str(tmp_path / "c.npz"))
    resumed = fit(
        reader,
        SPEC64,
        X,
        Y,
        optimizer=opt,
        epochs=4,
        params=ckpt.params,
        feedback=ckpt.feedback,
        resume=ckpt.resume,
        **FIT_KW,
    )
    np.testing.assert_allclose(resumed.loss, straight.loss, rtol=1e-10)
    for (w, b), (w_ref, b_ref) in zip(resumed.params, straight.params):
        np.testing.assert_allclose(w, w_ref, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(b, b_ref, rtol=1e-10, atol=1e-13)


def test_checkpoint_files_are_atomic_and_versioned(tmp_path):
    """Saving leaves only the .npz and its .json (no temporaries); a wrong version or a
    non-checkpoint file is refused with a message; a mismatched optimizer state is refused."""
    path = str(tmp_path / "c.npz")
    ckpt = _checkpoint_after("torch", OPTIMIZERS["momentum"], 1, path)
    save_checkpoint(path, ckpt)  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["c.json", "c.npz"]
    assert load_checkpoint(path).meta == {"backend": "torch"}
    arrays = dict(np.load(path))
    meta = arrays["__meta__"].tobytes().decode().replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 99')
    arrays["__meta__"] = np.frombuffer(meta.encode(), dtype=np.uint8)
    np.savez(str(tmp_path / "v99.npz"), **arrays)
    with pytest.raises(ValueError, match="format version 99"):
        load_checkpoint(str(tmp_path / "v99.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz is not a checkpoint: it is not an .npz"):
        load_checkpoint(str(tmp_path / "junk.npz"))
    with pytest.raises(ValueError, match="optimizer state mismatch"):
        fit(
            "torch",
            SPEC64,
            X,
            Y,
            optimizer=OPTIMIZERS["adam"],
            epochs=2,
            params=ckpt.params,
            feedback=ckpt.feedback,
            resume=ckpt.resume,
            **FIT_KW,
        )


def _saved(tmp_path):
    path = str(tmp_path / "c.npz")
    return path, _checkpoint_after("torch", OPTIMIZERS["adam"], 1, path)


def _damage(path, how):
    data = open(path, "rb").read()
    if how == "empty":
        data = b""
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "crc":  # flip one byte inside the first stored array's data
        i = data.index(b"params/0/0.npy") + 200
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
    elif how == "random":
        data = np.random.default_rng(0).bytes(4096)
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize(
    "how,message",
    [
        ("empty", "c.npz is empty"),
        ("truncated", "c.npz is damaged"),
        ("crc", "c.npz is damaged"),
        ("random", "c.npz is not a checkpoint: it is not an .npz"),
    ],
)
def test_damaged_checkpoints_name_the_file(tmp_path, how, message):
    """Empty, cut, CRC-damaged or random files give a CheckpointError naming the file, not a raw
    BadZipFile / EOFError / pickle hint."""
    from dfa_train.checkpoint import CheckpointError

    path, _ = _saved(tmp_path)
    _damage(path, how)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.pop("epoch"), "metadata key 'epoch' must be a int, got nothing"),
        (lambda m: m.update(loss="x"), "metadata key 'loss' must be a list, got str"),
    ],
)
def test_checkpoint_metadata_is_checked(tmp_path, edit, message):
    import json

    path, _ = _saved(tmp_path)
    arrays = dict(np.load(path))
    meta = json.loads(arrays["__meta__"].tobytes().decode())
    edit(meta)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path)


def test_run_files_honour_the_umask(tmp_path):
    """Atomic writes give the mode an ordinary open() would (0666 less the umask), not mkstemp's 0600."""
    from dfa_train.checkpoint import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(str(tmp_path / "a.json"), "{}")
        path, _ = _saved(tmp_path)
    finally:
        os.umask(old)
    for name in ("a.json", "c.npz", "c.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o640, name


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A full disk during a save leaves the last checkpoint intact and no temporary file behind."""
    import errno

    path, ckpt = _saved(tmp_path)
    before = open(path, "rb").read()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="could not write .*c.npz .*No space left"):
        save_checkpoint(path, ckpt._replace(meta={"changed": True}))
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["c.json", "c.npz"]


def test_non_finite_params_are_never_saved(tmp_path):
    path, ckpt = _saved(tmp_path)
    w, b = ckpt.params[0]
    bad = ((np.full_like(w, np.inf), b),) + ckpt.params[1:]
    with pytest.raises(ValueError, match="refusing to save .* layer 1's params are not finite"):
        save_checkpoint(path, ckpt._replace(params=bad))
    assert np.all(np.isfinite(load_checkpoint(path).params[0][0]))


def test_stale_temporaries_are_removed(tmp_path):
    from dfa_train.checkpoint import remove_stale_temps

    (tmp_path / ".tmp-abc123checkpoint.npz").write_bytes(b"half")
    (tmp_path / "keep.txt").write_text("mine")
    assert remove_stale_temps(str(tmp_path)) == (".tmp-abc123checkpoint.npz",)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]
