"""A stepped learning rate: multiplied by ``gamma`` at given epochs (torch's MultiStepLR, biotorch's recipe).

    opt = optimizer_at(OptimizerSpec("momentum", 0.1), epoch=60, milestones=(50, 75), gamma=0.1)
    opt.learning_rate   # 0.01: epochs 50..74 train at lr * 0.1, epochs 75.. at lr * 0.01

Epochs count from 0; milestone m changes the rate from epoch m on (after m epochs). The optimizer
state does not depend on the rate (sgd, momentum and adam keep none of it), so the state carries
over a milestone unchanged, and a resumed run picks the rate of its epoch: exact.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence, Tuple

from dfa_core.spec import OptimizerSpec


def check_milestones(milestones: Any, gamma: Any) -> Tuple[Tuple[int, ...], float]:
    """Checks a schedule; returns (milestones as a tuple of ints, gamma as a float).

    Raises:
      ValueError, TypeError: milestones not strictly increasing ints >= 1, or gamma not a finite number > 0.
    """
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
        raise TypeError(f"lr_milestones must be a sequence of epochs such as (50, 75), got {milestones!r}")
    if any(isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1 for m in milestones):
        raise ValueError(f"lr_milestones must be epochs >= 1, got {list(milestones)!r}")
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ValueError(f"lr_milestones must increase strictly, got {list(milestones)!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0 < float(gamma) < math.inf:
        raise ValueError(f"lr_gamma must be a finite number > 0, got {gamma!r}")
    return tuple(int(m) for m in milestones), float(gamma)


def optimizer_at(opt: OptimizerSpec, epoch: int, milestones: Sequence[int], gamma: float) -> OptimizerSpec:
    """``opt`` with learning rate lr * gamma^(milestones passed by ``epoch``); ``opt`` itself before the first."""
    passed = sum(1 for m in milestones if m <= epoch)
    if not passed:
        return opt
    return dataclasses.replace(opt, learning_rate=opt.learning_rate * gamma**passed)


def parse_milestones(text: str) -> Tuple[int, ...]:
    """'50,75' -> (50, 75) (the command line's --lr-milestones); checked by ``check_milestones``."""
    try:
        milestones = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected epochs separated by commas, such as 50,75, got {text!r}") from None
    return check_milestones(milestones, 1.0)[0]


__all__ = ["check_milestones", "optimizer_at", "parse_milestones"]
