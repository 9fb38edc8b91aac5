"""get_backend: lookup by name, clear errors, lazy imports."""

import importlib.util
import subprocess
import sys

import pytest

from dfa_core import BACKEND_NAMES, get_backend
from dfa_core.backend import BACKEND_API, Backend
from dfa_core.registry import resolve_backend

MIRRORED = BACKEND_API  # the one list of backend names (dfa_core.backend)


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError) as info:
        get_backend("tensorflow")
    assert "'tensorflow'" in str(info.value) and "['torch', 'jax']" in str(info.value)


def test_missing_framework_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "jax" else real(n, *a))
    with pytest.raises(ImportError) as info:
        get_backend("jax")
    assert "dfa-framework[jax]" in str(info.value)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_backends_mirror_each_other(name):
    """Both backends export the same names with the same argument names."""
    import inspect

    be, other = get_backend(name), get_backend("jax" if name == "torch" else "torch")
    assert be.NAME == name
    for attr in MIRRORED:
        assert hasattr(be, attr), f"{name} lacks {attr}"
        fn, twin = getattr(be, attr), getattr(other, attr)
        if inspect.isfunction(fn) and inspect.isfunction(twin):
            assert list(inspect.signature(fn).parameters) == list(inspect.signature(twin).parameters), attr


def test_core_imports_neither_framework():
    """dfa_core imports only NumPy at import time."""
    code = "import sys, dfa_core; print(sorted(m for m in ('torch', 'jax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_backends_export_exactly_the_contract_and_satisfy_the_protocol(name):
    be = get_backend(name)
    assert list(be.__all__[: len(BACKEND_API)]) == list(BACKEND_API)
    assert isinstance(be, Backend)


def test_a_module_lacking_part_of_the_contract_is_refused():
    import types

    partial = types.ModuleType("partial_backend")
    partial.asarray = lambda tree: tree
    with pytest.raises(TypeError, match="it lacks .*'to_numpy'"):
        resolve_backend(partial)
    with pytest.raises(TypeError, match="backend must be a name"):
        resolve_backend(3)
    assert resolve_backend("torch") is get_backend("torch")
