"""Launchers the several-device tests share: gloo processes (``run_ranks``) and a script on simulated
JAX CPU devices (``run_on_simulated_devices``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from dfa_train.launch import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def run_on_simulated_devices(script: str, devices: int, *args: str, xla_flags: str = "", timeout: float = 300) -> Any:
    """Runs ``python script *args`` with ``devices`` simulated CPU devices; returns the JSON of its last line.

    JAX fixes its device count when it starts (the test process has one device), hence a subprocess.
    PJRT_NPROC gives XLA:CPU more pool threads than devices: devices waiting in an all-reduce must not
    starve the one that has not arrived (a hang on 2 cores). No torchrun variables, no DFA_DATA_DIR.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "DFA_DATA_DIR")}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {xla_flags}".strip(),
        PJRT_NPROC=str(4 * devices),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(p for p in (ROOT, TESTS, os.environ.get("PYTHONPATH")) if p),
    )
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode:
        raise AssertionError(f"the {devices}-device subprocess failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


__all__ = ["run_on_simulated_devices", "run_ranks"]
