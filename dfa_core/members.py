"""What both backends' ``many`` modules share: the members' optimizer numbers and the epoch's checks.

``dfa_jax.many`` and ``dfa_torch.many`` train M members in one program; the arrays differ, the
bookkeeping is this one definition.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from dfa_core import hardware, validation
from dfa_core.hardware import Projection
from dfa_core.rules import check_kp_decay
from dfa_core.spec import OPTIMIZERS, OptimizerSpec


class Hyper(NamedTuple):
    """Optimizer hyper-parameters of M members, each an (M,) array of the run's dtype (unused ones too)."""

    learning_rate: Any  # (M,): step size
    momentum: Any  # (M,): 'momentum' decay of the trace
    b1: Any  # (M,): 'adam' first-moment decay
    b2: Any  # (M,): 'adam' second-moment decay
    eps: Any  # (M,): 'adam' denominator offset
    weight_decay: Any  # (M,): L2 coefficient added to the gradients (0: none)


def hyper_columns(opts: Sequence[OptimizerSpec]) -> Tuple[np.ndarray, ...]:
    """``Hyper``'s fields of ``opts`` (one OptimizerSpec per member) as float64 NumPy columns (M,)."""
    return tuple(np.asarray([getattr(o, f) for o in opts], dtype=np.float64) for f in Hyper._fields)


def check_structure(optimizer: object, nesterov: object) -> Tuple[str, bool]:
    """(optimizer, nesterov) of a many-member program: the name fixes its structure (and nesterov
    matters for 'momentum' alone); ValueError / TypeError naming what arrived."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
    return str(optimizer), nesterov and optimizer == "momentum"


def check_epoch_many(
    spec: Any,
    optimizer: object,
    nesterov: object,
    method: Any,
    mode: str,
    batch_size: object,
    align_every: object,
    projection: Optional[Projection],
    kp_decay: object,
) -> Tuple[Any, ...]:
    """``train_epoch_many``'s arguments checked, before anything is traced or run, and normalised:
    (spec, optimizer, nesterov, method key, mode, batch_size, align_every, projection, kp_decay),
    the key of the cached program."""
    optimizer, nesterov = check_structure(optimizer, nesterov)
    validation.check_train_step(spec, OptimizerSpec(optimizer, nesterov=nesterov), method, mode)
    for name, value, minimum in (("batch_size", batch_size, 1), ("align_every", align_every, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    key = validation.method_key(method)
    hw = hardware.check_many_projection(key, projection)
    return spec, optimizer, nesterov, key, mode, batch_size, align_every, hw, check_kp_decay(kp_decay)


__all__ = ["Hyper", "check_epoch_many", "check_structure", "hyper_columns"]
