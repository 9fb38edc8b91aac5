"""Backend lookup: a plain dict of names to lazily imported modules."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Union

from dfa_core.backend import BACKEND_API

_BACKENDS = {
    # name: (module implementing it, framework it needs, pip extra that installs it)
    "torch": ("dfa_torch", ("torch",), "torch"),
    "jax": ("dfa_jax", ("jax", "jaxlib", "optax"), "jax"),
}

BACKEND_NAMES = tuple(_BACKENDS)


def resolve_backend(backend: Union[str, ModuleType]) -> ModuleType:
    """A backend given by name ('torch', 'jax') or as a module; a module must have all of BACKEND_API.

    Raises:
      TypeError: neither a name nor a module with the whole backend API (the message lists what lacks).
      ValueError, ImportError: as ``get_backend``.
    """
    if isinstance(backend, str):
        return get_backend(backend)
    missing = [n for n in BACKEND_API if not hasattr(backend, n)] if isinstance(backend, ModuleType) else None
    if missing is None or missing:
        lacks = f" (it lacks {missing})" if missing else ""
        raise TypeError(
            f"backend must be a name {list(BACKEND_NAMES)} or a backend module such as dfa_torch, "
            f"got {backend!r}{lacks}"
        )
    return backend


def get_backend(name: str) -> ModuleType:
    """Returns the backend module (``dfa_torch`` or ``dfa_jax``) for ``name``.

    Both modules expose ``dfa_core.backend.BACKEND_API`` with the same arguments (the
    ``dfa_core.backend.Backend`` protocol is their specification).

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
            f'install it with: pip install "dfa-framework[{extra}]" (or pip install -e ".[{extra}]" '
            "from a checkout)"
        )
    backend = importlib.import_module(module)
    missing = [n for n in BACKEND_API if not hasattr(backend, n)]
    if missing:  # a half-installed or stale checkout; better said here than as an AttributeError later
        raise ImportError(f"backend module {module!r} lacks {missing} of dfa_core.backend.BACKEND_API")
    return backend
