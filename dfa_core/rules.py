"""What both backends' learning rules share, NumPy-free arithmetic on specs and shapes.

``dfa_jax.rules`` and ``dfa_torch.rules`` read these, so the two stay one definition.
"""

from __future__ import annotations

import functools
import math
from typing import Tuple

from dfa_core.model import Dense, ModelSpec, NetSpec

KP_DECAY = 1e-4
"""Kolen-Pollack's default weight decay lambda per step, on W_{l+1} and B_l of kp blocks. The decay is
not scaled by the learning rate (as in Akrout et al.'s code): with Adam at a stepped rate, 1e-3 let the
decay overtake the updates after the rate dropped and LeNet-5 collapsed to 11.7% (README, KP's decay)."""


def frozen_blocks(rules: Tuple[str, ...]) -> Tuple[int, ...]:
    """The hidden blocks a 'shallow' rule freezes: their updates are zeroed after the optimizer, so that
    no weight decay (nor any optimizer's arithmetic on zero gradients) moves them."""
    return tuple(l for l, rule in enumerate(rules[:-1]) if rule == "shallow")


def check_kp_decay(kp_decay: object) -> float:
    """``kp_decay`` as a float in [0, 1), or a ValueError naming what arrived."""
    if isinstance(kp_decay, bool) or not isinstance(kp_decay, (int, float)) or not 0.0 <= float(kp_decay) < 1.0:
        raise ValueError(f"kp_decay must be a number in [0, 1), got {kp_decay!r}")
    return float(kp_decay)


@functools.lru_cache(maxsize=None)
def as_model(spec: NetSpec) -> ModelSpec:
    """The ModelSpec of an MLPSpec's Dense layers (same params, same numbers); a ModelSpec as it is."""
    if isinstance(spec, ModelSpec):
        return spec
    layers = tuple(Dense(n) for n in spec.layer_sizes[1:])
    return ModelSpec((spec.n_in,), layers, spec.activation, spec.output, spec.reduction, spec.dtype)


def _fans(w_shape: Tuple[int, ...]) -> Tuple[int, int]:
    """(fan_in, fan_out) of a Dense (out, in) or Conv2d (out, in, k, k) weight, as torch.nn.init counts them."""
    receptive = math.prod(w_shape[2:])
    return w_shape[1] * receptive, w_shape[0] * receptive


def usf_scale(w_shape: Tuple[int, ...]) -> float:
    """s = sqrt(2 / (fan_in + fan_out)): uSF's sign(W) scaled to Xavier's std (Sanfiz & Akrout 2021)."""
    fan_in, fan_out = _fans(w_shape)
    return math.sqrt(2.0 / (fan_in + fan_out))


def brsf_bound(w_shape: Tuple[int, ...]) -> float:
    """a = sqrt(6 / (fan_in + fan_out)): brSF draws |R| ~ U(0, a), Xavier-uniform's magnitude (biotorch)."""
    fan_in, fan_out = _fans(w_shape)
    return math.sqrt(6.0 / (fan_in + fan_out))


__all__ = ["KP_DECAY", "as_model", "brsf_bound", "check_kp_decay", "frozen_blocks", "usf_scale"]
