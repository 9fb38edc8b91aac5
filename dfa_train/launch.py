"""Runs a function in several local processes joined by torch.distributed (gloo on 127.0.0.1).

What tests and benchmarks use to stand for a torchrun launch on one machine (users train with
``torchrun ... dfa train``):

    from dfa_train.launch import run_ranks
    outs = run_ranks(my_module_level_fn, 2, arg)   # [fn(0, 2, arg), fn(1, 2, arg)]

``fn`` must be a module-level function (the processes are spawned, so they import it); it
is called as ``fn(rank, world, *args)`` after ``init_process_group('gloo')`` and its return
value (NumPy arrays in tuples/dicts, anything picklable) comes back in rank order. An
exception in any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable, List

TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            queue.put((rank, True, fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported to the parent, which raises it
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = TIMEOUT_S) -> List[Any]:
    """[fn(0, world, *args), ..., fn(world - 1, world, *args)], each in its own gloo process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
