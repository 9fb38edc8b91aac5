"""Conversion between NumPy trees and JAX arrays, and float64 scoping.

float64 is scoped with ``jax.enable_x64(True)`` around each call that needs it, so
the user's global JAX default is never flipped.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dfa_core.backend import ArrayLike, Tree
from dfa_core.tree import tree_map as _map
from dfa_core.validation import dtype_name

NAME = "jax"


def _enable_x64() -> ContextManager[Any]:
    if hasattr(jax, "enable_x64"):  # newer releases
        return jax.enable_x64(True)
    # Older releases only; the installed stubs (a newer jax) no longer have it.
    from jax.experimental import enable_x64  # type: ignore[attr-defined,unused-ignore]

    return enable_x64()


def precision_scope(dtype: str) -> ContextManager[Any]:
    """Context in which arrays of ``dtype`` ('float32' or 'float64') keep their precision."""
    return _enable_x64() if dtype == "float64" else contextlib.nullcontext()


def _leaves(tree: Tree) -> Iterator[ArrayLike]:
    if isinstance(tree, (tuple, list)):
        for t in tree:
            yield from _leaves(t)
    else:
        yield tree


def asarray(tree: Tree, device: Optional[jax.Device] = None) -> Tree:
    """NumPy (or torch/JAX) arrays in nested tuples -> JAX arrays, dtypes kept.

    Args:
      tree: an array or nested tuples/lists of arrays (params, feedback, a batch).
      device: optional ``jax.Device`` (default: JAX's default device).

    Returns:
      The same structure (lists become tuples) of ``jax.Array``; the inputs are copied,
      never aliased, so later changes to them do not reach the result.
    """
    needs_x64 = any(dtype_name(leaf) == "float64" for leaf in _leaves(tree))

    def convert(leaf: ArrayLike) -> jax.Array:
        arr = np.array(leaf.detach().cpu() if hasattr(leaf, "detach") else leaf, copy=True)
        return jax.device_put(arr, device)

    with precision_scope("float64" if needs_x64 else "float32"):
        return _map(convert, tree)


def to_numpy(tree: Tree) -> Tree:
    """JAX arrays in nested tuples -> NumPy arrays, same structure."""
    return _map(lambda leaf: np.asarray(jax.device_get(leaf)), tree)


def as_input(x: ArrayLike, dtype: str) -> jax.Array:
    """One batch array (NumPy or native) -> a JAX array of ``dtype``; call inside precision_scope."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return jnp.asarray(x, dtype=dtype)
