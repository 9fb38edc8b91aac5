"""The gloo launcher the tests use (``dfa_train.launch.run_ranks``), importable as ``dist_helpers``."""

from dfa_train.launch import run_ranks

__all__ = ["run_ranks"]
