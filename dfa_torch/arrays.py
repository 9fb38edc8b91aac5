"""Conversion between NumPy trees and torch tensors (the torch twin of dfa_jax.arrays)."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Union

import numpy as np
import torch

from dfa_core.backend import ArrayLike, Tree
from dfa_core.tree import tree_map as _map

NAME = "torch"

Device = Union[str, torch.device]  # 'cpu', 'cuda:0' or a torch.device

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def precision_scope(dtype: str) -> ContextManager[None]:
    """No-op on torch (float64 needs no switch); kept so both backends read alike."""
    del dtype
    return contextlib.nullcontext()


def torch_dtype(dtype: str) -> torch.dtype:
    return _DTYPES[dtype]


def asarray(tree: Tree, device: Optional[Device] = None) -> Tree:
    """NumPy (or JAX/torch) arrays in nested tuples -> torch tensors, dtypes kept.

    Args:
      tree: an array or nested tuples/lists of arrays (params, feedback, a batch).
      device: optional torch device (default: torch.get_default_device()).

    Returns:
      The same structure (lists become tuples) of tensors; inputs are copied, never
      aliased, so later changes to them do not reach the result.
    """

    device = torch.get_default_device() if device is None else device

    def convert(leaf: ArrayLike) -> torch.Tensor:
        if isinstance(leaf, torch.Tensor):
            return leaf.detach().clone().to(device)
        return torch.from_numpy(np.array(leaf, copy=True)).to(device)

    return _map(convert, tree)


def to_numpy(tree: Tree) -> Tree:
    """Tensors in nested tuples -> NumPy arrays, same structure."""
    return _map(lambda leaf: leaf.detach().cpu().numpy(), tree)


def as_input(x: ArrayLike, dtype: str, device: Optional[Device] = None) -> torch.Tensor:
    """One batch array (NumPy or native) -> a tensor of ``dtype`` on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=torch_dtype(dtype))
    return torch.as_tensor(np.asarray(x), dtype=torch_dtype(dtype), device=device)
