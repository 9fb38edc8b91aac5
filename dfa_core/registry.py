"""Backend lookup: a plain dict of names to lazily imported modules."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

_BACKENDS = {
    # name: (module implementing it, framework it needs, pip extra that installs it)
    "torch": ("dfa_torch", ("torch",), "torch"),
    "jax": ("dfa_jax", ("jax", "jaxlib", "optax"), "jax"),
}

BACKEND_NAMES = tuple(_BACKENDS)


def get_backend(name: str) -> ModuleType:
    """Returns the backend module (``dfa_torch`` or ``dfa_jax``) for ``name``.

    Both modules expose the same functions with the same arguments: ``asarray``,
    ``to_numpy``, ``forward``, ``forward_with_activations``, ``feedback_projection``,
    ``dfa_grads``, ``bp_grads``, ``loss``, ``make_optimizer``, ``apply_updates``,
    ``train_step``.

    Raises:
      ValueError: unknown name (the message lists the choices).
      ImportError: the framework behind the backend is not installed (the message
        says which extra to install).
    """
    if not isinstance(name, str) or name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {list(BACKEND_NAMES)}")
    module, frameworks, extra = _BACKENDS[name]
    missing = [f for f in frameworks if importlib.util.find_spec(f) is None]
    if missing:
        raise ImportError(
            f"the {name!r} backend needs {', '.join(missing)}, which is not installed; "
            f"install it with: pip install \"dfa-framework[{extra}]\" (or pip install -e \".[{extra}]\" "
            "from a checkout)"
        )
    return importlib.import_module(module)
