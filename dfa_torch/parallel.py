"""Data-parallel DFA training on torch.distributed: one process per device, each taking its rows of every batch.

Mirrors ``dfa_jax.parallel`` name for name. torch runs ONE process per device (``torchrun
--nproc-per-node N``): every process holds the whole training set and the same params,
feedback and optimizer state; global batch i is ``order[i * B:(i + 1) * B]`` as on one
device, and process r takes rows ``dfa_core.parallel.shard_bounds(len(batch), N, r)`` of
it (a ragged last batch splits unevenly; a process may get no rows). The update is the
one-device update of the global batch:

- 'sample' mode: each process forms its rows' gradient sums (e' / n_global for reduction
  'mean'), and one all-reduce adds them up (with the loss);
- 'batch_mean' and 'class_mean': after the forward pass the group sums of every grouped
  quantity (u'_l, a'_l, y_hat', y'), the class counts and the loss sum are all-reduced in one
  buffer, so every process computes the same grouped update from the global groups (no
  gradient all-reduce).

One all-reduce per step either way (two when ``train_step`` is not told the global rows).
The DFA-vs-BP angles (``with_alignment``, ``align_every``) are the global batch's, as on one
process: BP's gradients are all-reduced and its deltas regrouped by the global groups; in
'sample' mode, where the deltas stay split by rows, the angles come from all-reduced norms
and distances (``dfa_torch.alignment._sharded_angles``, two or three more all-reduces).

Params, feedback, KP's B and brsf's ``RuleState`` stay identical on every process (each
applies the same update). gloo on CPU, NCCL on CUDA.

    dp = data_parallel()            # under torchrun: joins the process group; alone: None
    epoch = train_epoch(spec, opt, "dfa", "class_mean", batch_size=512, parallel=dp)
    params, state, losses, _ = epoch(params, feedback, state, x, y, order)  # x, y: the whole set

Launch: ``torchrun --standalone --nproc-per-node N script.py``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from dfa_core import parallel as core_parallel
from dfa_core import validation

Tensor = torch.Tensor

LAUNCH_HINT = "torch runs one process per device: launch with `torchrun --standalone --nproc-per-node N ...`"


class Reducer(NamedTuple):
    """What the grouping code (``dfa_torch.blocks._shard_grouping``, ``dfa_torch.rules``,
    ``dfa_torch.alignment``) needs for a global batch whose rows are split over processes."""

    psum: Callable[[Tensor], Tensor]  # t -> the sum of t over the processes (same shape on every process)
    rows: int  # rows of the global batch (n_global >= 1)


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run. Frozen and hashable (steps are cached per setup).

    Every process holds the same params, feedback and optimizer state and takes its own rows of
    each global batch; ``is_main`` alone should write files.
    """

    size: int  # processes (= devices) in the group, >= 2
    rank: int  # this process's rank, 0 <= rank < size
    device: torch.device  # this process's GPU, cuda:LOCAL_RANK, where CUDA exists; else cpu
    group: Any = None  # the torch.distributed ProcessGroup; None: the default group

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the process that writes the run folder)."""
        return self.rank == 0

    def replicate(self, tree: Any) -> Any:
        """The tree unchanged: every process already holds its own full copy (the mirror of JAX's device_put)."""
        return tree

    def psum(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the processes (an all-reduce); ``t`` may be overwritten."""
        t = t.contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def global_rows(self, rows: int, device: Any) -> int:
        """The rows of the global batch whose shard here has ``rows`` rows (an all-reduce and a host read)."""
        return int(self.psum(torch.tensor([rows], dtype=torch.int64, device=device))[0])

    def reducer(self, rows: int) -> Reducer:
        """The grouping hook for a global batch of ``rows`` rows."""
        return Reducer(self.psum, rows)


def _launch_backend() -> str:
    """gloo for CPU tensors, and NCCL for CUDA tensors where CUDA exists: a run on CPU (no --device cuda)
    still works on a GPU machine."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _local_device(backend: str) -> torch.device:
    """cuda:LOCAL_RANK where the group speaks NCCL (made the current device, so 'cuda' means it), else cpu."""
    if "nccl" not in backend:
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK={local} but this host has {torch.cuda.device_count()} CUDA device(s): "
            "launch at most one process per GPU (torchrun --nproc-per-node <= the GPU count)"
        )
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def data_parallel(devices: Optional[int] = None) -> Optional[DataParallel]:
    """The data-parallel setup of this process for ``train_step`` / ``train_epoch``'s ``parallel``.

    Under a torchrun launch (WORLD_SIZE > 1) whose process group is not up yet, joins the
    default group first (gloo for CPU tensors, plus NCCL for CUDA tensors where CUDA exists, this
    process's GPU being cuda:LOCAL_RANK; env:// rendezvous, as torchrun
    sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE). A group the caller initialised is used
    as it is.

    Args:
      devices: None: as many devices as processes (one process alone: None). An int N: must
        equal the number of processes (torch runs one process per device).

    Returns:
      A ``DataParallel``, or None when this process runs alone (one device: today's path).

    Raises:
      ValueError: devices < 1, devices > 1 in a process that is alone (launch with torchrun), or
        devices different from the number of processes; more processes on a host than GPUs.
      TypeError: devices is not an int.
    """
    if devices is not None:
        devices = validation.check_int("devices", devices, 1)
    world = core_parallel.launched_world_size()
    initialized = dist.is_available() and dist.is_initialized()
    backend = None
    if not initialized and world > 1:
        backend = _launch_backend()
        dist.init_process_group(backend, init_method="env://")
        initialized = True
    size = dist.get_world_size() if initialized else 1
    if devices is not None and devices != size:
        if size == 1:
            raise ValueError(
                f"devices={devices} asked for, but this process runs alone (no torchrun launch, no process group); "
                f"torch runs one process per device: launch with `torchrun --standalone --nproc-per-node {devices} ...`"
            )
        raise ValueError(
            f"devices={devices} asked for, but this torch.distributed run has {size} processes; {LAUNCH_HINT} "
            f"with N = devices (or pass devices=None)"
        )
    if size == 1:
        return None
    return DataParallel(size, dist.get_rank(), _local_device(backend or str(dist.get_backend())))


def _check_parallel(parallel: object, batch_size: Optional[int] = None) -> Optional[DataParallel]:
    """Checks ``train_step`` / ``train_epoch``'s ``parallel`` argument before anything runs.

    Raises:
      TypeError: not None nor a ``DataParallel`` of this backend (e.g. a JAX one).
      ValueError: a ``batch_size`` the processes do not divide (``check_data_parallel``).
    """
    if parallel is None:
        return None
    if not isinstance(parallel, DataParallel):
        raise TypeError(
            f"parallel must be None or dfa_torch.parallel.data_parallel()'s DataParallel, "
            f"got {type(parallel).__module__}.{type(parallel).__name__}"
        )
    if batch_size is not None:
        core_parallel.check_data_parallel(parallel.size, batch_size)
    return parallel


def _refuse(what: str) -> ValueError:
    """The error for what torch data parallel does not run (hardware projections)."""
    return ValueError(
        f"{what} is not supported under torch data parallel (parallel=...): its result would depend on how "
        "the batch is split; run it on one process, or on JAX (one program over all devices)"
    )


__all__ = ["DataParallel", "data_parallel"]
