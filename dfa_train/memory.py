"""How much memory a run needs, and whether the device has it: checked before anything is allocated.

``estimate_memory`` counts what one or many members of a spec hold at their peak;
``available_memory`` asks the backend's device (a GPU reports its own free memory) or the
host (``MemAvailable``); ``check_memory`` refuses a run that cannot fit with a message giving
both numbers. Imports neither torch nor JAX.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, Optional, Tuple, Union

import numpy as np

from dfa_core import hardware, validation
from dfa_core.hardware import Projection
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
    method: Any = "dfa",
    align: bool = False,
    projection: Optional[Projection] = None,
) -> int:
    """Bytes that ``num_members`` members of ``spec`` trained together need at their peak (an estimate).

    Per member, in spec.dtype, what lives for the whole run: params (P numbers), the
    optimizer state (sgd 0, momentum P, adam 2P), the feedback the rule reads (F: DFA's
    and DRTP's B_l, FA's, KP's and frSF's matrices shaped like W_{l+1}; none for BP, uSF,
    brSF, shallow), KP's trained B (K_B, the kp blocks' W_{l+1} sizes) and the batch order
    (N int32); plus the larger of what a step allocates (the new params and state, grads
    and updates, KP's new B, brSF's drawn magnitudes and their signed copy 2 x R (R the brsf
    blocks' W_{l+1} sizes), projection noise B x (n_1 + ... + n_{L-1}), a batch of
    B x (n_0 + n_L) and its activations 2 x B x H, with H = n_1 + ... + n_L; the alignment's
    backprop adds 3 x B x H and 2 x P) and what an evaluation pass allocates
    (2 x min(eval_batch_size, N) x H: pre- and post-activations).
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
      method: a rule in dfa_core.METHODS, or a tuple of one per block (its feedback and state counted).
      align: whether alignment angles are measured.
      projection: the run's dfa_core.hardware.Projection (its noise draws counted), or None.

    Returns:
      The estimate in bytes (int).
    """
    validation.check_spec(spec)
    size = np.dtype(spec.dtype).itemsize
    p, state = spec.num_params(), _STATE_COPIES[optimizer] * spec.num_params()
    h, io = activation_numbers(spec), spec.n_in + spec.n_out
    b = min(batch_size, n_train)
    feedback, kp, drawn = rule_numbers(spec, method)
    hw = hardware.active(projection)
    noise = b * sum(rows for rows, _ in spec.feedback_shapes) if hw is not None and hw.noise is not None else 0
    lasting = p + state + feedback + kp
    step = 3 * p + state + kp + 2 * drawn + noise + b * io + 2 * b * h + ((3 * b * h + 2 * p) if align else 0)
    evaluation = 2 * min(eval_batch_size, max(n_train, n_test)) * h
    shared = (n_train + n_test) * io
    return int(num_members * ((lasting + max(step, evaluation)) * size + 4 * n_train) + shared * size)


def rule_numbers(spec: NetSpec, method: Any) -> Tuple[int, int, int]:
    """(F, K_B, R): numbers of the feedback ``method`` reads, of KP's trained B, of brSF's draws per step.

    'dfa' reads DFA's B_l; 'bp' none (its run's DFA matrices are counted by nobody: alignment
    only); every other rule (or a tuple of one per block) the entries ``init_feedback`` draws.
    """
    if method == "dfa":
        return sum(rows * cols for rows, cols in spec.feedback_shapes), 0, 0
    if method == "bp":
        return 0, 0, 0
    rules = validation.method_rules(spec, validation.method_key(method))
    shapes = validation.rule_feedback_shapes(spec, rules)
    feedback = sum(math.prod(shape) for shape in shapes if shape is not None)
    w_above = [math.prod(spec.param_shapes[l + 1][0]) for l in range(len(rules) - 1)]
    kp = sum(n for n, r in zip(w_above, rules) if r == "kp")
    drawn = sum(n for n, r in zip(w_above, rules) if r == "brsf")
    return feedback, kp, drawn


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
    method: Any,
    align: bool,
    projection: Optional[Projection] = None,
) -> None:
    """``check_memory`` for one run of ``spec`` (fit, dfa train): before its params are drawn."""
    need = estimate_memory(spec, 1, n_train, n_test, batch_size, eval_batch_size, optimizer, method, align, projection)
    check_memory(
        backend,
        need,
        f"training {describe(spec)} in {spec.dtype} ({spec.num_params():,} "
        f"parameters, {n_train:,} samples, batch {batch_size}; use smaller layers, "
        "batch_size or eval_batch_size)",
    )


__all__ = [
    "available_memory",
    "check_memory",
    "check_run_memory",
    "estimate_memory",
    "activation_numbers",
    "describe",
    "rule_numbers",
]
