"""Helpers over the nested tuples the framework passes around: ((W_1, b_1), ..., (W_L, b_L)).

Plain Python, no framework: the same functions serve NumPy, torch and JAX leaves.
"""

from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple


def tree_map(fn: Callable[..., Any], *trees: Any) -> Any:
    """Applies ``fn`` leaf by leaf over trees of nested tuples/lists; returns nested tuples."""
    if isinstance(trees[0], (tuple, list)):
        return tuple(tree_map(fn, *ts) for ts in zip(*trees))
    return fn(*trees)


def flatten_pairs(tree: Sequence[Sequence[Any]]) -> List[Any]:
    """((W_1, b_1), (W_2, b_2)) -> [W_1, b_1, W_2, b_2]."""
    return [leaf for pair in tree for leaf in pair]


def unflatten_pairs(leaves: Sequence[Any], like: Sequence[Sequence[Any]]) -> Tuple[Tuple[Any, ...], ...]:
    """The inverse of ``flatten_pairs``, shaped like ``like``."""
    out, i = [], 0
    for pair in like:
        out.append(tuple(leaves[i : i + len(pair)]))
        i += len(pair)
    return tuple(out)


__all__ = ["flatten_pairs", "tree_map", "unflatten_pairs"]
