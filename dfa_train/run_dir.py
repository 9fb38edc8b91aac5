"""Owning a run folder: one run at a time (an OS lock), nothing of the user's overwritten, no debris.

``claim(out_dir, resume)`` is a context manager around a run:
- ``out_dir`` must be a folder we can write; a new run needs it absent or empty, a resumed
  one needs it to hold that run (config.json and checkpoint.npz);
- an exclusive ``fcntl.flock`` on ``out_dir/.lock`` refuses a second run into the same folder
  while the first is alive; the OS drops the lock when a process dies, so a killed run never
  leaves the folder stuck;
- temporaries of a write that was killed (``.tmp-*``) are removed on opening;
- a new run that fails before its first epoch is written (bad data for the mode, a device
  error, ...) removes what it created, so its rerun is not blocked. Ctrl-C and SIGTERM keep
  the epoch-0 checkpoint once it exists: the run resumes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from typing import Iterator, List

from dfa_train.checkpoint import CHECKPOINT_NAME, TEMP_PREFIX, remove_stale_temps
from dfa_train.config import ConfigError
from dfa_train.state import DivergenceError

LOCK_NAME = ".lock"


def _check_target(out_dir: str, resume: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError("out", f"{out_dir!r} is a file, expected a folder for the run")
    if resume:
        missing = [n for n in ("config.json", CHECKPOINT_NAME) if not os.path.isfile(os.path.join(out_dir, n))]
        if missing:
            raise ConfigError("resume", f"{out_dir!r} holds no run to resume (missing {', '.join(missing)})")
        return
    if os.path.isdir(out_dir):
        theirs = sorted(n for n in os.listdir(out_dir) if n != LOCK_NAME and not n.startswith(TEMP_PREFIX))
        if theirs:
            shown = ", ".join(theirs[:5]) + (", ..." if len(theirs) > 5 else "")
            if CHECKPOINT_NAME in theirs:
                raise ConfigError(
                    "out",
                    f"{out_dir!r} already holds a run (checkpoint.npz); resume it with "
                    f"--resume {out_dir} or choose another folder",
                )
            raise ConfigError(
                "out",
                f"{out_dir!r} is not empty (it holds {shown}); choose an empty or new "
                "folder (nothing in it is overwritten)",
            )


def check_new_folder(out_dir: str) -> None:
    """Raises ConfigError('out') unless ``out_dir`` is absent or empty: for compare and sweep
    folders, which must not write over a run or the user's files."""
    _check_target(out_dir, resume=False)


def _make_folder(out_dir: str) -> List[str]:
    """Creates ``out_dir`` (and missing parents); returns the folders created, outermost first."""
    created, path = [], os.path.abspath(out_dir)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"cannot create the run folder {out_dir!r}: {err.strerror}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, f"cannot write into the run folder {out_dir!r} (permission denied)")
    return created[::-1]


def _lock(out_dir: str):
    f = open(os.path.join(out_dir, LOCK_NAME), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(
            "out", f"{out_dir!r} is in use by another dfa run (pid {holder}); wait for it or choose another folder"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _remove_new_run(out_dir: str, created: List[str], names_before: set) -> None:
    """Removes what a failed new run wrote: the folders it created, else only its own files."""
    if created:
        shutil.rmtree(created[0], ignore_errors=True)
        return
    for name in set(os.listdir(out_dir)) - names_before:
        path = os.path.join(out_dir, name)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


class Claim:
    """What ``claim`` yields: call ``started()`` once the first epoch is on disk."""

    def __init__(self) -> None:
        self.first_epoch_written = False

    def started(self) -> None:
        self.first_epoch_written = True


@contextlib.contextmanager
def claim(out_dir: str, resume: bool) -> Iterator[Claim]:
    """Owns ``out_dir`` for one run (see the module docstring).

    Raises:
      ConfigError: ``out_dir`` is a file, is not empty (new run), holds no run (resume),
        or another run holds its lock.
      OSError: the folder cannot be created or written.
    """
    _check_target(out_dir, resume)
    created = [] if resume else _make_folder(out_dir)
    names_before = set(os.listdir(out_dir)) - {LOCK_NAME}
    lock = _lock(out_dir)
    remove_stale_temps(out_dir)
    state = Claim()
    try:
        yield state
    except BaseException as err:
        # An interrupted or diverged new run keeps its epoch-0 checkpoint (it resumes, or shows what
        # diverged); any other failure
        # before the first epoch, or an interrupt before that checkpoint, leaves nothing behind.
        resumable = isinstance(err, (KeyboardInterrupt, DivergenceError)) and os.path.exists(
            os.path.join(out_dir, CHECKPOINT_NAME)
        )
        if not resume and not state.first_epoch_written and not resumable:
            lock.close()
            _remove_new_run(out_dir, created, names_before)
        raise
    finally:
        lock.close()


__all__ = ["Claim", "LOCK_NAME", "check_new_folder", "claim"]
