"""Test configuration shared by tests/ and parity_tests/."""

import os
import sys

import pytest

# Fail on implicit rank promotion in JAX code (chex/equinox test convention).
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles thousands of tiny XLA programs and runs each a few times: compile time, not
# run time, is what it waits for, and XLA:CPU's optimisation passes cost a third of the suite's
# wall time (parity_tests/test_parity_grads.py: 71 s -> 48 s without them, same results). Tests
# compare numbers with tolerances and never time anything. A user's own XLA_FLAGS are kept.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

# DFA_TEST_DEVICE=cuda runs the suite with torch tensors on the GPU (set JAX_PLATFORMS=cuda
# and JAX_DEFAULT_MATMUL_PRECISION=highest alongside, so float32 tolerances hold on JAX too).
if os.environ.get("DFA_TEST_DEVICE", "cpu") != "cpu":
    import torch

    torch.set_default_device(os.environ["DFA_TEST_DEVICE"])


def _test_data():
    """tests/dfa_test_data.py; its folder is on sys.path once a module of tests/ is collected, but
    a marked test elsewhere (parity_tests/) may come first."""
    tests_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    import dfa_test_data

    return dfa_test_data


def pytest_collection_modifyitems(config, items):
    """Tests marked ``full_mnist`` skip, saying why, when only the bundled MNIST slice is at hand."""
    marked = [item for item in items if item.get_closest_marker("full_mnist") is not None]
    if marked and _test_data().full_mnist_dir() is None:
        skip = pytest.mark.skip(reason=_test_data().FULL_MNIST_MISSING)
        for item in marked:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mnist_source():
    """(folder, is_full): full MNIST from $DFA_DATA_DIR, the user cache or ../shared/datasets/mnist,
    else the bundled 2,000/500 slice (is_full False). Read once per session; nothing is downloaded."""
    full = _test_data().full_mnist_dir()
    return (full, True) if full is not None else (_test_data().mnist_dir(), False)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module.

    Every compiled XLA:CPU program keeps its own memory mappings; the whole suite compiles
    thousands, which passes Linux's default limit of 65,530 mappings per process
    (vm.max_map_count) and crashes a later compile with a segfault. Modules do not share
    programs they need, so clearing between them only costs a recompile where one repeats.
    """
    yield
    jax = sys.modules.get("jax")
    if jax is not None:
        import gc

        jax.clear_caches()
        gc.collect()
