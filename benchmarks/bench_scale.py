"""Throughput of data-parallel and layer-parallel DFA against the number of devices, with the bytes sent.

Issue 12. Every case trains the same network on the same synthetic data and reports samples/s
for 1, 2, 4 ... devices, as a ratio to one device in the same run, and the bytes each step
communicates:

  jax_data     ``dfa_jax.train_epoch(..., parallel=data_parallel(N))``: one program over a mesh of
               N devices, each batch sharded; bytes: the all-reduces in the compiled step (HLO)
  jax_layer    ``dfa_jax.layer_parallel(spec, opt, N, microbatches)``: stage s on device s;
               bytes: ``dfa_core.parallel.layer_parallel_bytes``
  torch_data   ``dfa_torch.train_epoch(..., parallel=data_parallel())`` in N gloo processes
               (``dfa_train.launch.run_ranks``); bytes: what ``DataParallel.psum`` all-reduced
  torch_layer  ``dfa_torch.layer_parallel`` in N gloo processes; bytes as jax_layer

On a CPU, JAX's N devices are simulated (``--xla_force_host_platform_device_count``) and share
the machine's cores, as the torch processes do: there the numbers measure what splitting costs
(communication, synchronisation, smaller matmuls), not a speed-up. On a machine with N GPUs
(``--device cuda``) they measure scaling. The float32 matmul peak of the same run is reported.

    python benchmarks/bench_scale.py --quick          # 2 cores: about 3 minutes
    python benchmarks/bench_scale.py --devices 1,2,4,8 --device cuda

Writes one JSON record per line to ``--out`` (default benchmarks/results/<host>-scale.jsonl) and
a Markdown table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="1,2,4", help="device counts to measure, comma-separated (first: 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="a smaller net and data set")
    p.add_argument("--cases", default="jax_data,jax_layer,torch_data,torch_layer")
    p.add_argument("--microbatches", type=int, default=4, help="layer parallel: micro-batches per step")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.device_counts = [int(n) for n in args.devices.split(",")]
    args.cases = args.cases.split(",")
    return args


def setup(quick: bool) -> dict:
    """The network and data: an MLP deep enough to cut into 4 stages, tanh, sigmoid + sum, float32."""
    if quick:
        return {"sizes": (784, 512, 512, 512, 10), "batch": 512, "n_train": 4096, "epochs": 2}
    return {"sizes": (784, 1024, 1024, 1024, 10), "batch": 1024, "n_train": 16384, "epochs": 3}


def configure(args) -> None:
    """Environment JAX reads when it starts: N simulated CPU devices, enough pool threads."""
    if args.device == "cpu":
        n = max(args.device_counts)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
        # Simulated devices waiting in an all-reduce hold pool threads; more threads than devices avoids a stall.
        os.environ.setdefault("PJRT_NPROC", str(4 * n))


def data(cfg: dict, dtype: str = "float32"):
    rng = np.random.default_rng(0)
    n, sizes = cfg["n_train"], cfg["sizes"]
    x = rng.standard_normal((n, sizes[0])).astype(dtype)
    y = np.eye(sizes[-1], dtype=dtype)[rng.integers(0, sizes[-1], size=n)]
    return x, y


def spec_of(cfg: dict):
    from dfa_core import MLPSpec

    return MLPSpec(cfg["sizes"], activation="tanh", output="sigmoid", reduction="sum", dtype="float32")


def opt_of():
    from dfa_core import OptimizerSpec

    return OptimizerSpec("sgd", 1e-4)


# ----------------------------------------------------------------------------- JAX


HLO_SHAPE = re.compile(r"(f32|f64|s32|bf16)\[([\d,]*)\]")
ITEMSIZE = {"f32": 4, "f64": 8, "s32": 4, "bf16": 2}


def hlo_all_reduce_bytes(hlo_text: str) -> int:
    """Bytes of the operands of every all-reduce in an HLO module's text (its result shapes)."""
    total = 0
    for line in hlo_text.splitlines():
        if " all-reduce(" not in line and " all-reduce-start(" not in line:
            continue
        lhs = line.split("=", 1)[1].split("all-reduce", 1)[0]
        for kind, dims in HLO_SHAPE.findall(lhs):
            total += ITEMSIZE[kind] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def jax_data_case(cfg: dict, n: int, method: str, mode: str) -> dict:
    import jax

    import dfa_jax
    from dfa_core import init_feedback, init_params
    from dfa_jax.parallel import data_parallel

    spec, opt = spec_of(cfg), opt_of()
    dp = data_parallel(n)
    x_np, y_np = data(cfg)
    params = dp.replicate(dfa_jax.asarray(init_params(spec, 0)))
    feedback = dp.replicate(dfa_jax.asarray(init_feedback(spec, 1)))
    state = dp.replicate(dfa_jax.make_optimizer(opt, spec.dtype).init(params))
    x, y = dp.replicate(dfa_jax.asarray((x_np, y_np)))
    epoch = dfa_jax.train_epoch(spec, opt, method, mode, cfg["batch"], parallel=dp)
    step = dfa_jax.train_step(spec, opt, method, mode, parallel=dp)
    xb, yb = dp.replicate(dfa_jax.asarray((x_np[: cfg["batch"]], y_np[: cfg["batch"]])))
    hlo = step.jitted.lower(params, feedback, state, xb, yb).compile().as_text()
    order = np.random.default_rng(0).permutation(x_np.shape[0]).astype(np.int32)
    params, state, losses, _ = epoch(params, feedback, state, x, y, order)  # compile + warm
    jax.block_until_ready(losses)
    t0 = time.perf_counter()
    for _ in range(cfg["epochs"]):
        params, state, losses, _ = epoch(params, feedback, state, x, y, order)
    jax.block_until_ready(losses)
    seconds = (time.perf_counter() - t0) / cfg["epochs"]
    return {"sec_per_epoch": seconds, "bytes_per_step": hlo_all_reduce_bytes(hlo)}


def jax_layer_case(cfg: dict, n: int, microbatches: int, mode: str) -> dict:
    import jax

    import dfa_jax
    from dfa_core import init_feedback, init_params
    from dfa_core.parallel import layer_parallel_bytes
    from dfa_jax.layer_parallel import layer_parallel

    spec, opt = spec_of(cfg), opt_of()
    lp = layer_parallel(spec, opt, n, microbatches, mode)
    params = init_params(spec, 0)
    staged = lp.place(params, init_feedback(spec, 1), dfa_jax.make_optimizer(opt, spec.dtype).init(params))
    x_np, y_np = data(cfg)
    b = cfg["batch"]
    batches = [(x_np[i : i + b], y_np[i : i + b]) for i in range(0, x_np.shape[0], b)]
    staged, loss = lp.step(staged, *batches[0])  # compile + warm
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(cfg["epochs"]):
        for xb, yb in batches:
            staged, loss = lp.step(staged, xb, yb)
    jax.block_until_ready(jax.tree_util.tree_leaves(staged))
    seconds = (time.perf_counter() - t0) / cfg["epochs"]
    return {"sec_per_epoch": seconds, "bytes_per_step": layer_parallel_bytes(spec, b, n, mode).total}


# ----------------------------------------------------------------------------- torch (one process per device)


def torch_data_rank(rank: int, world: int, cfg: dict, method: str, mode: str) -> dict:
    import dfa_torch
    import dfa_torch.parallel as tp
    from dfa_core import init_feedback, init_params

    sent = [0]
    psum = tp.DataParallel.psum

    def counting_psum(self, t):
        sent[0] += t.numel() * t.element_size()
        return psum(self, t)

    tp.DataParallel.psum = counting_psum  # type: ignore[method-assign]  # counts what the step all-reduces
    spec, opt = spec_of(cfg), opt_of()
    dp = tp.data_parallel()
    x, y = dfa_torch.asarray(data(cfg))
    params = dfa_torch.asarray(init_params(spec, 0))
    feedback = dfa_torch.asarray(init_feedback(spec, 1))
    state = dfa_torch.make_optimizer(opt, spec.dtype).init(params)
    epoch = dfa_torch.train_epoch(
        spec, opt, method, mode, cfg["batch"], donate=True, **({"parallel": dp} if dp else {})
    )
    order = np.random.default_rng(0).permutation(x.shape[0])
    params, state, losses, _ = epoch(params, feedback, state, x, y, order)  # warm
    steps = -(-x.shape[0] // cfg["batch"])
    sent[0] = 0
    t0 = time.perf_counter()
    for _ in range(cfg["epochs"]):
        params, state, losses, _ = epoch(params, feedback, state, x, y, order)
    float(losses.sum())
    seconds = (time.perf_counter() - t0) / cfg["epochs"]
    return {"sec_per_epoch": seconds, "bytes_per_step": sent[0] // (cfg["epochs"] * steps)}


def torch_layer_rank(rank: int, world: int, cfg: dict, microbatches: int, mode: str) -> dict:
    import dfa_torch
    from dfa_core import init_feedback, init_params
    from dfa_core.parallel import layer_parallel_bytes
    from dfa_torch.layer_parallel import layer_parallel

    spec, opt = spec_of(cfg), opt_of()
    lp = layer_parallel(spec, opt, world, microbatches, mode)
    params = init_params(spec, 0)
    staged = lp.place(params, init_feedback(spec, 1), dfa_torch.make_optimizer(opt, spec.dtype).init(params))
    x_np, y_np = data(cfg)
    b = cfg["batch"]
    batches = [dfa_torch.asarray((x_np[i : i + b], y_np[i : i + b])) for i in range(0, x_np.shape[0], b)]
    staged, loss = lp.step(staged, *batches[0])
    t0 = time.perf_counter()
    for _ in range(cfg["epochs"]):
        for xb, yb in batches:
            staged, loss = lp.step(staged, xb, yb)
    float(loss)
    seconds = (time.perf_counter() - t0) / cfg["epochs"]
    return {"sec_per_epoch": seconds, "bytes_per_step": layer_parallel_bytes(spec, b, world, mode).total}


def torch_case(cfg: dict, n: int, fn, *args) -> dict:
    """N processes of one thread each (one process for N = 1: the same conditions), gloo on 127.0.0.1."""
    from dfa_train.launch import run_ranks

    results = run_ranks(fn, n, cfg, *args)
    return {"sec_per_epoch": max(r["sec_per_epoch"] for r in results), "bytes_per_step": results[0]["bytes_per_step"]}


# ----------------------------------------------------------------------------- main


def cases(args):
    """(name, label, device counts, run(cfg, n) -> record) for every case asked for."""
    mb = args.microbatches
    out = []
    if "jax_data" in args.cases:
        for method, mode in (("dfa", "sample"), ("dfa", "batch_mean"), ("bp", "sample")):
            out.append(("jax_data", f"{method}/{mode}", lambda cfg, n, m=method, d=mode: jax_data_case(cfg, n, m, d)))
    if "jax_layer" in args.cases:
        out.append(
            ("jax_layer", f"dfa/sample, {mb} micro-batches", lambda cfg, n: jax_layer_case(cfg, n, mb, "sample"))
        )
    if "torch_data" in args.cases:
        for method, mode in (("dfa", "sample"), ("dfa", "batch_mean"), ("bp", "sample")):
            out.append(
                (
                    "torch_data",
                    f"{method}/{mode}",
                    lambda cfg, n, m=method, d=mode: torch_case(cfg, n, torch_data_rank, m, d),
                )
            )
    if "torch_layer" in args.cases:
        out.append(
            (
                "torch_layer",
                f"dfa/sample, {mb} micro-batches",
                lambda cfg, n: torch_case(cfg, n, torch_layer_rank, mb, "sample"),
            )
        )
    return out


def peak_gflops(device: str) -> float:
    """Best float32 GFLOP/s of a 2048 x 2048 matmul (JAX, one device), measured in this run."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    mm = jax.jit(lambda p: p @ p)
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    del jnp
    return 2 * n**3 / best / 1e9


def markdown(records) -> str:
    lines = [
        "| case | rule/mode | devices | samples/s | vs 1 device | bytes/step |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    base = {}
    for r in records:
        if r.get("kind") != "case":
            continue
        key = (r["case"], r["label"])
        if r["devices"] == 1:
            base[key] = r["samples_per_s"]
        ratio = r["samples_per_s"] / base[key] if key in base else float("nan")
        lines.append(
            f"| {r['case']} | {r['label']} | {r['devices']} | {r['samples_per_s']:,.0f} | {ratio:.2f}x "
            f"| {r['bytes_per_step']:,} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    configure(args)
    cfg = setup(args.quick)
    out = args.out or os.path.join(HERE, "results", f"{socket.gethostname()}-scale.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    records = [
        {
            "kind": "machine",
            "host": socket.gethostname(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "device": args.device,
            "setup": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            "peak_gflop_per_s": peak_gflops(args.device),
        }
    ]
    print(json.dumps(records[0]), flush=True)
    for name, label, run in cases(args):
        for n in args.device_counts:
            rec = run(cfg, n)
            rec.update(kind="case", case=name, label=label, devices=n)
            rec["samples_per_s"] = cfg["n_train"] / rec["sec_per_epoch"]
            records.append(rec)
            print(json.dumps(rec), flush=True)
    with open(out, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    table = markdown(records)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    sys.exit(main())
