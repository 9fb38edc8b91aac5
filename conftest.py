"""Test configuration shared by tests/ and parity_tests/."""

import os

# Fail on implicit rank promotion in JAX code (chex/equinox test convention).
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# DFA_TEST_DEVICE=cuda runs the suite with torch tensors on the GPU (set JAX_PLATFORMS=cuda
# and JAX_DEFAULT_MATMUL_PRECISION=highest alongside, so float32 tolerances hold on JAX too).
if os.environ.get("DFA_TEST_DEVICE", "cpu") != "cpu":
    import torch

    torch.set_default_device(os.environ["DFA_TEST_DEVICE"])
