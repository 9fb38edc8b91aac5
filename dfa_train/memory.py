"""How much memory a run needs, and whether the device has it: checked before anything is allocated.

``estimate_memory`` counts what one or many members of a spec hold at their peak;
``available_memory`` asks the backend's device (a GPU reports its own free memory) or the
host (``MemAvailable``); ``check_memory`` refuses a run that cannot fit with a message giving
both numbers. Imports neither torch nor JAX.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Optional, Tuple, Union

import numpy as np

from dfa_core import validation
from dfa_core.model import ModelSpec, NetSpec
from dfa_core.registry import resolve_backend

_MEMINFO = "/proc/meminfo"

_STATE_COPIES = {"sgd": 0, "momentum": 1, "adam": 2}  # optimizer-state trees shaped like params


def estimate_memory(
    spec: NetSpec,
    num_members: int,
    n_train: int,
    n_test: int = 0,
    batch_size: int = 200,
    eval_batch_size: int = 10000,
    optimizer: str = "sgd",
    method: str = "dfa",
    align: bool = False,
) -> int:
    """Bytes that ``num_members`` members of ``spec`` trained together need at their peak (an estimate).

    Per member, in spec.dtype, what lives for the whole run: params (P numbers), the
    optimizer state (sgd 0, momentum P, adam 2P), the feedback (DFA) and the batch
    order (N int32); plus the larger of what a step allocates (the new params and state,
    grads and updates, a batch of B x (n_0 + n_L) and its activations 2 x B x H, with
    H = n_1 + ... + n_L; the alignment's backprop adds 3 x B x H and 2 x P) and what an
    evaluation pass allocates (2 x min(eval_batch_size, N) x H: pre- and post-activations).
    Shared: the data (N + N_test) x (n_0 + n_L). For 784-200-10, M = 8, N = 10000, B = 200,
    float32, XLA's memory analysis of the JAX programs gives 0.9-1.0x of it at the peak
    (training, or evaluation with eval_batch_size 10000).

    Args:
      spec: the network (its dtype sets the bytes per number).
      num_members: M, >= 1.
      n_train: training samples N.
      n_test: test samples.
      batch_size: samples per step B.
      eval_batch_size: rows per evaluation pass.
      optimizer: 'sgd', 'momentum' or 'adam'.
      method: 'dfa' (feedback counted) or 'bp'.
      align: whether alignment angles are measured.

    Returns:
      The estimate in bytes (int).
    """
    validation.check_spec(spec)
    size = np.dtype(spec.dtype).itemsize
    p, state = spec.num_params(), _STATE_COPIES[optimizer] * spec.num_params()
    h, io = activation_numbers(spec), spec.n_in + spec.n_out
    b = min(batch_size, n_train)
    lasting = p + state + (sum(rows * cols for rows, cols in spec.feedback_shapes) if method == "dfa" else 0)
    step = 3 * p + state + b * io + 2 * b * h + ((3 * b * h + 2 * p) if align else 0)
    evaluation = 2 * min(eval_batch_size, max(n_train, n_test)) * h
    shared = (n_train + n_test) * io
    return int(num_members * ((lasting + max(step, evaluation)) * size + 4 * n_train) + shared * size)


def activation_numbers(spec: NetSpec) -> int:
    """H: numbers a forward pass keeps per sample. An MLP's n_1 + ... + n_L; a ModelSpec's blocks'
    inputs after their prefix (u_l, which pools and flattens change) and outputs a_l."""
    if isinstance(spec, ModelSpec):
        return sum(math.prod(block.u_shape) + block.a_size for block in spec.blocks)
    return sum(spec.layer_sizes[1:])


def describe(spec: NetSpec) -> str:
    """The model in a message: an MLP's widths, or a ModelSpec's input shape and block count."""
    if isinstance(spec, ModelSpec):
        return f"a {spec.num_layers}-block model on {spec.input_shape} inputs"
    return str(list(spec.layer_sizes))


def _host_available() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes; None where the file does not exist (not Linux)."""
    try:
        with open(_MEMINFO) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        return None
    return None


def available_memory(backend: Union[str, ModuleType]) -> Optional[Tuple[int, str]]:
    """(bytes free, where) on the backend's default device; None when nothing reports it.

    A GPU reports its own free memory (``torch.cuda.mem_get_info``, JAX's
    ``device.memory_stats()``); on the CPU it is the host's ``MemAvailable``.
    """
    got = resolve_backend(backend).memory_free()
    if got is not None:
        return got
    host = _host_available()
    return None if host is None else (host, "host memory (MemAvailable)")


def check_memory(backend: Union[str, ModuleType], need: int, what: str) -> None:
    """Raises MemoryError naming ``need`` (bytes), ``what`` needs it and what is free, when it does not fit."""
    free = available_memory(backend)
    if free is not None and need > free[0]:
        raise MemoryError(
            f"{what} would need about {need:,} bytes ({need / 2**20:.1f} MiB) but {free[1]} has {free[0]:,} bytes "
            f"({free[0] / 2**20:.1f} MiB) free"
        )


def check_run_memory(
    backend: Union[str, ModuleType],
    spec: NetSpec,
    n_train: int,
    n_test: int,
    batch_size: int,
    eval_batch_size: int,
    optimizer: str,
    method: str,
    align: bool,
) -> None:
    """``check_memory`` for one run of ``spec`` (fit, dfa train): before its params are drawn."""
    need = estimate_memory(spec, 1, n_train, n_test, batch_size, eval_batch_size, optimizer, method, align)
    check_memory(
        backend,
        need,
        f"training {describe(spec)} in {spec.dtype} ({spec.num_params():,} "
        f"parameters, {n_train:,} samples, batch {batch_size}; use smaller layers, "
        "batch_size or eval_batch_size)",
    )


__all__ = ["available_memory", "check_memory", "check_run_memory", "estimate_memory", "activation_numbers", "describe"]
