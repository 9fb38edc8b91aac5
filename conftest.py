"""Test configuration shared by tests/ and parity_tests/."""

import os

# Fail on implicit rank promotion in JAX code (chex/equinox test convention).
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
