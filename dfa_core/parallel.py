"""What data- and layer-parallel training share on both backends: shard bounds, stage plans, checks.

Imports NumPy only. The engines live in ``dfa_jax.parallel`` (a ``jax.sharding.Mesh``,
one program) and ``dfa_torch.parallel`` (``torch.distributed``, one process per device).

Data parallel: every global batch of ``batch_size`` samples is split over ``size``
devices; device r takes rows ``shard_bounds(len(batch), size, r)`` of it. The update is
the one-device update of the global batch: the averaged modes group over the global
batch, and 'mean' divides by its size, not by a shard's.

Layer parallel: the blocks 1..L are cut into ``size`` contiguous stages
(``stage_plan``); stage s runs blocks ``plan[s]`` on device s.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Tuple

from dfa_core import validation

DATA_AXIS = "data"
"""The mesh axis (JAX) a batch is sharded over."""

LAYER_AXIS = "layer"
"""The mesh axis (JAX) blocks are placed along."""


def shard_bounds(n: int, size: int, rank: int) -> Tuple[int, int]:
    """Rows [start, stop) of a batch of ``n`` rows that device ``rank`` of ``size`` takes.

    Contiguous and balanced: the first ``n % size`` devices take one row more, so a ragged
    last batch splits as evenly as it can (a device may get no rows when n < size).
    """
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_data_parallel(size: object, batch_size: object, available: Optional[int] = None) -> int:
    """Checks a data-parallel setup; returns ``size`` as an int.

    Raises:
      ValueError: size < 1, more devices than ``available``, or a global batch that the devices
        do not divide (each device must take the same number of rows of every full batch; the
        ragged last batch of an epoch is split by ``shard_bounds``).
    """
    size = validation.check_int("devices", size, 1)
    batch_size = validation.check_int("batch_size", batch_size, 1)
    if available is not None and size > available:
        raise ValueError(f"devices={size} asked for, but only {available} device(s) exist here")
    if batch_size % size:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by devices={size}: every device takes "
            f"batch_size / devices rows of each global batch; pick a batch size that is a multiple of {size}"
        )
    return size


def stage_plan(num_blocks: int, size: int) -> Tuple[Tuple[int, ...], ...]:
    """Blocks (0-based) of each of ``size`` stages: contiguous, the first ``num_blocks % size`` one longer.

    Raises:
      ValueError: fewer blocks than stages (a stage must own at least one block).
    """
    size = validation.check_int("devices", size, 1)
    if num_blocks < size:
        raise ValueError(f"layer parallel: {num_blocks} block(s) cannot fill {size} stages (one block at least each)")
    return tuple(tuple(range(*shard_bounds(num_blocks, size, s))) for s in range(size))


def launched_world_size(env: Optional[Mapping[str, str]] = None) -> int:
    """Processes in a torchrun launch (its WORLD_SIZE), or 1 outside one."""
    env = os.environ if env is None else env
    raw = env.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be a positive integer (set by torchrun), got {raw!r}") from None
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be a positive integer (set by torchrun), got {raw!r}")
    return world


def launched_rank(env: Optional[Mapping[str, str]] = None) -> int:
    """This process's rank in a torchrun launch (its RANK), or 0 outside one: rank 0 alone writes files."""
    env = os.environ if env is None else env
    if launched_world_size(env) == 1:
        return 0
    raw = env.get("RANK", "")
    if not raw.isdigit():
        raise ValueError(f"RANK must be a non-negative integer in a torchrun launch (WORLD_SIZE > 1), got {raw!r}")
    return int(raw)


__all__ = [
    "DATA_AXIS",
    "LAYER_AXIS",
    "check_data_parallel",
    "launched_rank",
    "launched_world_size",
    "shard_bounds",
    "stage_plan",
]
