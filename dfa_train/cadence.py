"""When a run writes its checkpoint: every N epochs, every N seconds, or 'auto' (under 5% of the run's time).

Pure functions over numbers, so the policy is tested with fake clocks; ``dfa_train.run``
reads the clock and calls ``checkpoint_due`` after every epoch. Whatever the cadence, a
run also writes at its end, before a divergence stop and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Union

AUTO_RATIO = 20.0
"""'auto' writes once the time since the last write is >= AUTO_RATIO x that write's duration:
writing then costs at most 1 / (1 + AUTO_RATIO) < 5% of the run's wall time."""

UNITS = ("auto", "epochs", "seconds")


class CheckpointEvery(NamedTuple):
    """A parsed ``--checkpoint-every`` value."""

    unit: str  # one of UNITS
    value: float  # epochs (an int >= 1) or seconds (> 0); AUTO_RATIO for 'auto'


def parse_checkpoint_every(text: Union[str, int]) -> CheckpointEvery:
    """'auto' -> auto; '2' -> every 2 epochs; '30s' (or '0.5s') -> every 30 seconds.

    Raises:
      ValueError: anything else (0, negative numbers, 'abc', '5x'); the message names the accepted forms.
    """
    expected = "expected 'auto', a number of epochs N >= 1 (e.g. 2) or of seconds N > 0 (e.g. 30s)"
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"{expected}, got {type(text).__name__} {text!r}")
    raw = str(text).strip()
    if raw == "auto":
        return CheckpointEvery("auto", AUTO_RATIO)
    if raw.endswith("s"):
        try:
            seconds = float(raw[:-1])
        except ValueError:
            raise ValueError(f"{expected}, got {text!r}") from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"{expected}, got {text!r}")
        return CheckpointEvery("seconds", seconds)
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{expected}, got {text!r}")
    return CheckpointEvery("epochs", int(raw))


def format_checkpoint_every(every: CheckpointEvery) -> str:
    """The canonical text of ``every``: 'auto', '2' or '30s' (what config.json stores)."""
    if every.unit == "auto":
        return "auto"
    if every.unit == "epochs":
        return str(int(every.value))
    return f"{every.value:g}s"


def checkpoint_due(every: CheckpointEvery, epoch: int, since_write_s: float, last_write_s: float) -> bool:
    """Whether to write the checkpoint after epoch ``epoch``.

    Args:
      every: the cadence.
      epoch: epochs run so far, 1-based (epoch N of 'every N epochs' writes when N divides it,
        so a resumed run keeps writing at epochs N, 2N, ...).
      since_write_s: seconds from the end of the last write to now.
      last_write_s: how long the last write took, seconds.

    Returns:
      True to write now.
    """
    if every.unit == "epochs":
        return epoch % int(every.value) == 0
    if every.unit == "seconds":
        return since_write_s >= every.value
    return since_write_s >= every.value * last_write_s


__all__ = ["AUTO_RATIO", "CheckpointEvery", "checkpoint_due", "format_checkpoint_every", "parse_checkpoint_every"]
