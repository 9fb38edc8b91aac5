"""Cost per DFA step of a plug-in projection device against the in-program projection, on torch and JAX.

Issue 11. ``Projection(device=project)`` runs the projection e' B_l^T outside the compiled step
(``jax.pure_callback`` on JAX, a plain call on torch): every step then copies e' to the host, calls
the device and copies (e' B_1^T, ..., e' B_{L-1}^T) back. This script measures what that costs, per
DFA gradient step (``dfa_grads_unchecked``, arrays already on the device), for three projections:

- ``in_program``: the plain step (projection=None), the baseline;
- ``numpy_device``: a device that computes e B^T exactly with NumPy on the host (the round trip and
  a host matmul: the floor for any hardware in the loop);
- ``optical_sim``: ``examples/optical_projection.py``'s simulated optical processor (three complex
  products for the intensity-based linear recovery).

A plain script in the manner of nanoGPT's bench.py: warm-up excluded (JAX compiles there),
synchronised (``block_until_ready``; ``torch.cuda.synchronize``), the median of several repeats of
a calibrated number of steps, one JSON record per case (with ``ratio`` = time / in_program's time of
the same backend), then a Markdown table. Each backend runs in its own process.

    python benchmarks/bench_projection.py --threads 1              # 784-256-256-10, batch 128, CPU
    python benchmarks/bench_projection.py --device cuda --net 784-800-800-10 --batch 1024
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dfa_core import MLPSpec, get_backend, init_feedback, init_params
from dfa_core.hardware import Projection

ROOT = Path(__file__).resolve().parents[1]


def _optical_projector_class():
    """OpticalProjector from examples/optical_projection.py (examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("optical_projection", ROOT / "examples" / "optical_projection.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.OpticalProjector


def numpy_device(feedback_np):
    """A device computing (e B_1^T, ..., e B_{L-1}^T) exactly on the host, in e's dtype."""
    b_HxO = np.concatenate(feedback_np, axis=0)
    splits = np.cumsum([b.shape[0] for b in feedback_np])[:-1]

    def project(e):
        return tuple(np.split(e @ b_HxO.T.astype(e.dtype), splits, axis=1))

    return project


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(name: str, device: str) -> dict:
    """The machine, library versions and the backend's threads/device (imports only that backend)."""
    info = {
        "host": socket.gethostname(),
        "cpu": platform.processor() or platform.machine(),
        "os_cpu_count": os.cpu_count(),
        "versions": {"python": platform.python_version(), **{d: _version(d) for d in ("numpy", "torch", "jax")}},
    }
    if name == "torch":
        import torch

        info.update(device=device, torch_num_threads=torch.get_num_threads())
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    else:
        import jax

        info.update(device=str(jax.devices()[0]), jax_backend=jax.default_backend())
    return info


def _sync(name: str, out) -> None:
    if name == "jax":
        import jax

        jax.block_until_ready(out)
    else:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def time_step(name, step, repeats: int, min_seconds: float) -> float:
    """Median seconds per call of step() over ``repeats`` timed runs of a calibrated number of calls."""
    for _ in range(3):  # warm-up (JAX compiles here)
        _sync(name, step())
    n, elapsed = 1, 0.0
    while True:  # calibrate: enough calls for min_seconds
        start = time.perf_counter()
        for _ in range(n):
            out = step()
        _sync(name, out)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or n >= 1 << 14:
            break
        n *= 2
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            out = step()
        _sync(name, out)
        times.append((time.perf_counter() - start) / n)
    return statistics.median(times)


def bench_backend(name: str, spec: MLPSpec, batch: int, device: str, args) -> list:
    be = get_backend(name)
    dfa = __import__(f"dfa_{name}.dfa", fromlist=["dfa_grads_unchecked"])
    params_np, feedback_np = init_params(spec, seed=0), init_feedback(spec, seed=1)
    rng = np.random.default_rng(0)
    x_np = rng.random((batch, spec.n_in)).astype(spec.dtype)
    y_np = np.eye(spec.n_out, dtype=spec.dtype)[rng.integers(0, spec.n_out, batch)]
    optical = _optical_projector_class()(spec.n_out, spec.hidden_sizes, seed=1)
    cases = {
        "in_program": None,
        "numpy_device": Projection(device=numpy_device(feedback_np)),
        "optical_sim": Projection(device=optical),
    }
    where = device if name == "torch" else None
    records = []
    with be.precision_scope(spec.dtype):
        params = be.asarray(params_np, where)
        feedback = be.asarray(feedback_np, where)
        x, y = be.asarray(x_np, where), be.asarray(y_np, where)
        base = None
        for case, projection in cases.items():

            def step(projection=projection):
                return dfa.dfa_grads_unchecked(spec, params, feedback, x, y, "sample", projection)

            seconds = time_step(name, step, args.repeats, args.min_seconds)
            base = seconds if base is None else base
            records.append(
                {
                    "bench": "projection",
                    "backend": name,
                    "case": case,
                    "net": "-".join(map(str, spec.layer_sizes)),
                    "batch": batch,
                    "dtype": spec.dtype,
                    "ms_per_step": 1e3 * seconds,
                    "ratio": seconds / base,
                }
            )
    return records


def run_child(name: str, argv: list, threads) -> list:
    """Runs one backend in a fresh process and returns its records. Apart, torch's and XLA's thread
    pools do not compete; ``threads`` also caps the host BLAS the NumPy devices use (set before NumPy
    loads): on a shared 2-core VM a 128x10 @ 10x512 NumPy product took 16 ms with OpenBLAS's default
    threads and 0.02 ms with one."""
    env = dict(os.environ)
    if threads:
        env.update({v: str(threads) for v in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")})
    cmd = [sys.executable, __file__, *argv, "--backends", name, "--child"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for r in records:
        print(json.dumps(r), flush=True)
    return records


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="784-256-256-10", help="layer sizes, dash-separated")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--backends", default="torch,jax")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch's device (JAX: its default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.2, help="each timed repeat runs at least this long")
    parser.add_argument("--out", default=None, help="append the JSON records (with machine info) to this file")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and host BLAS threads (default: the libraries' own)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    spec = MLPSpec(tuple(int(n) for n in args.net.split("-")), activation="tanh", output="softmax", dtype=args.dtype)
    names = args.backends.split(",")
    if args.child:
        if names[0] == "torch" and args.threads:
            import torch

            torch.set_num_threads(args.threads)  # on a shared machine, 2+ threads wait on each other
        machine = {**machine_info(names[0], args.device), "threads": args.threads}
        for r in bench_backend(names[0], spec, args.batch, args.device, args):
            print(json.dumps({**r, "machine": machine}), flush=True)
        return 0
    parent_argv = [a for a in argv if a != "--child"]
    keep = [
        a for i, a in enumerate(parent_argv) if a != "--backends" and (i == 0 or parent_argv[i - 1] != "--backends")
    ]
    records = [r for name in names for r in run_child(name, keep, args.threads)]
    print("\n| backend | case | ms / step | ratio to in_program |\n|---|---|---:|---:|")
    for r in records:
        print(f"| {r['backend']} | {r['case']} | {r['ms_per_step']:.3f} | {r['ratio']:.2f} |")
    if args.out:
        with open(args.out, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
