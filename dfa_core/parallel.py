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

import math
import os
from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from dfa_core import validation
from dfa_core.model import NetSpec
from dfa_core.rules import as_model

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


# -- layer parallel: what a step sends, the optimizer state cut per stage ---------------------------


class StepBytes(NamedTuple):
    """Bytes one layer-parallel step sends between stages (``layer_parallel_bytes``)."""

    activations: int  # u forward across the S - 1 stage boundaries, all micro-batches together
    error: int  # e (or the grouped e') from the last stage to each of the S - 1 others

    @property
    def total(self) -> int:
        return self.activations + self.error


def layer_parallel_bytes(spec: NetSpec, batch_size: int, stages: int, mode: str = "sample") -> StepBytes:
    """Bytes a layer-parallel DFA step communicates (the same on both backends).

    Forward: every sample's u_l (h_{l-1} after block l's pools and flatten) crosses each stage
    boundary once, batch x (numbers in u_l of the stage's first block l) x itemsize, whatever the
    micro-batching. Error: 'sample' sends e, batch x n_L,
    to each of the S - 1 other stages; 'batch_mean' sends one row and 'class_mean' n_L rows
    (the grouped e', its shape static), once per step. Not counted: the input batch reaching
    stage 0 and the labels reaching the stages that read them (data loading), and the scalar
    loss (8 bytes at most) that torch broadcasts.

    Args:
      spec: the network.
      batch_size: the global batch.
      stages: S, the number of stages (``stage_plan(L, S)``).
      mode: 'sample', 'batch_mean' or 'class_mean'.

    Returns:
      StepBytes(activations, error); ``.total`` is their sum.
    """
    validation.check_spec(spec)
    validation.check_mode(mode)
    batch_size = validation.check_int("batch_size", batch_size, 1)
    model = as_model(spec)
    plan = stage_plan(model.num_layers, stages)
    itemsize = 8 if model.dtype == "float64" else 4
    chain = model.blocks
    boundary = sum(math.prod(chain[group[0]].u_shape) for group in plan[1:])
    rows = {"sample": batch_size, "batch_mean": 1, "class_mean": model.n_out}[mode]
    return StepBytes(batch_size * boundary * itemsize, (len(plan) - 1) * rows * model.n_out * itemsize)


def check_layer_method(method: object) -> None:
    if method != "dfa":
        raise ValueError(
            f"layer parallel trains with method 'dfa' only, got {method!r}: every other rule carries its "
            "teaching signal down from block l + 1 to block l (a backward chain, as BP's), so stages could "
            "not update at once; use data parallel for those"
        )


def params_like(node: Any, like: Sequence[Sequence[Any]]) -> bool:
    """Whether ``node`` is a params-shaped part of an optimizer state (adam's mu, a momentum trace)."""
    if type(node) not in (tuple, list) or len(node) != len(like):
        return False
    for block, ref in zip(node, like):
        if type(block) not in (tuple, list) or len(block) != len(ref):
            return False
        if any(not hasattr(t, "shape") or tuple(t.shape) != tuple(r.shape) for t, r in zip(block, ref)):
            return False
    return True


def map_state(
    states: Sequence[Any],
    likes: Sequence[Any],
    on_params: Callable[[List[Any]], Any],
    on_leaf: Callable[[List[Any]], Any],
) -> Any:
    """Walks parallel optimizer states: ``on_params`` for their params-shaped parts, ``on_leaf`` elsewhere.

    The states share one structure (one optimizer); likes[i] is the params that states[i] is for.
    """
    node = states[0]
    if params_like(node, likes[0]):
        return on_params(list(states))
    if isinstance(node, (tuple, list)):
        children = [map_state([s[i] for s in states], likes, on_params, on_leaf) for i in range(len(node))]
        if hasattr(node, "_fields"):  # a NamedTuple state (optax's, dfa_torch.optim's)
            return type(node)(*children)
        return type(node)(children)
    return on_leaf(list(states))


__all__ = [
    "DATA_AXIS",
    "LAYER_AXIS",
    "StepBytes",
    "check_layer_method",
    "check_data_parallel",
    "launched_rank",
    "launched_world_size",
    "layer_parallel_bytes",
    "map_state",
    "params_like",
    "shard_bounds",
    "stage_plan",
]
