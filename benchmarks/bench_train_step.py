"""Train-step throughput of DFA and BP (torch eager, torch.compile, JAX jit) against a matmul peak and peers.

Issue 5 (MLPs) and issue 10 (conv nets, ``CONV_NETS``: our backends' DFA and BP steps on a
``dfa_core.ModelSpec``). A plain script in the manner of nanoGPT's bench.py: every case is warmed up
(JAX compilation and torch.compile are excluded from the timings and reported apart as
``warmup_s``), synchronised (``block_until_ready``, ``torch.cuda.synchronize``), timed
as several repeats of a calibrated number of steps, and written as one JSON record per
line; a Markdown table and the issue's target checks are printed at the end.

    python benchmarks/bench_train_step.py --quick          # small grid, < 2 min on 2 CPU cores
    python benchmarks/bench_train_step.py                  # full grid (CPU: tens of minutes)
    python benchmarks/bench_train_step.py --device cuda    # full grid on the default GPU
    python benchmarks/bench_train_step.py --nets lenet5,vgg5-32x32 --backends torch,jax   # conv nets only

FLOPs are counted from the model, matrix products only (see ``FLOP_FORMULA``; conv
nets: ``CONV_FLOP_FORMULA``, from ``Block.flops``); elementwise work (activations,
derivatives, loss, the SGD update) is ignored, so GFLOP/s is a lower bound on what the
hardware did.

Peak memory of a step (target (e)) is measured in a fresh subprocess per case, see
``memory_child``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np

from dfa_core.model import Conv2d, Dense, Flatten, MaxPool2d, ModelSpec, layer_flops  # NumPy only: no torch, jax

NETS = {
    # name: (n_0, ..., n_L)
    "784-256-10": (784, 256, 10),
    "784-800-800-10": (784, 800, 800, 10),
    "784-4096x3-10": (784, 4096, 4096, 4096, 10),
    "784-240x7-10": (784,) + (240,) * 7 + (10,),
}
BATCHES = (32, 128, 1024)

# Conv nets (issue 10), our backends only (torch, torch_compile, jax); name: (input_shape, layers).
CONV_NETS = {
    # LeNet-5 (LeCun et al. 1998) on MNIST-sized input, with relu and max pools.
    "lenet5": (
        (1, 28, 28),
        (Conv2d(6, 5, padding=2), MaxPool2d(2), Conv2d(16, 5), MaxPool2d(2), Flatten())
        + (Dense(120), Dense(84), Dense(10)),
    ),
    # VGG-style on CIFAR-sized input: five 3x3 'same' convs of 32-64 channels, three pools, two dense.
    "vgg5-32x32": (
        (3, 32, 32),
        (Conv2d(32, 3, padding="same"), Conv2d(32, 3, padding="same"), MaxPool2d(2))
        + (Conv2d(64, 3, padding="same"), Conv2d(64, 3, padding="same"), MaxPool2d(2))
        + (Conv2d(64, 3, padding="same"), MaxPool2d(2), Flatten(), Dense(128), Dense(10)),
    ),
}
CONV_SPEC_KW = dict(activation="relu", output="softmax", reduction="mean")
# A conv block's DFA weight gradient sums the projected error over every output position, so on
# the benchmark's random batch DFA diverges at lr 1e-2 within ~10 steps (3e-4 within ~100) and
# later steps time inf/NaN arithmetic; at 1e-4 LeNet-5 stays finite for 400+ steps.
CONV_LEARNING_RATE = 1e-4
# A final loss above this (ln 10 = 2.3 at the start) marks a diverged case in the checks.
DIVERGED_LOSS = 100.0
CONV_BATCHES = (128,)
METHODS = ("dfa", "bp")
OURS = ("torch", "torch_compile", "jax")
PEERS = ("torch_nn", "biotorch")  # torch_nn: nn.Sequential + torch.optim.SGD (BP); biotorch: DFA
IMPLS = OURS + PEERS
PEER_METHOD = {"torch_nn": "bp", "biotorch": "dfa"}

QUICK = dict(
    nets=("784-256-10", "784-240x7-10"),
    batches=(128,),
    # Target (a) names this case; it costs ~1-2 s a step on 2 cores, so quick runs it on JAX only.
    extra=(("jax", "dfa", "784-4096x3-10", 1024), ("jax", "bp", "784-4096x3-10", 1024)),
    memory=(("784-240x7-10", 1024),),
    conv_nets=tuple(CONV_NETS),
    conv_impls=("torch", "jax"),  # torch.compile of a conv step takes ~20 s per case on 2 cores
    peak_sizes_cpu=(1024, 2048),
    peak_sizes_cuda=(2048, 4096),
    warmup=1,
    repeats=3,
    target_s=0.05,
)
FULL = dict(
    nets=tuple(NETS),
    batches=BATCHES,
    extra=(),
    memory=(("784-240x7-10", 1024), ("784-4096x3-10", 1024)),
    conv_nets=tuple(CONV_NETS),
    conv_impls=OURS,
    peak_sizes_cpu=(512, 1024, 2048),
    peak_sizes_cuda=(1024, 2048, 4096, 8192),
    warmup=3,
    repeats=7,
    target_s=0.25,
)

LEARNING_RATE = 1e-2
SPEC_KW = dict(activation="tanh", output="sigmoid", reduction="mean")  # 'mean' keeps 1e-2 stable at B=1024

FLOP_FORMULA = """\
FLOPs per step, matrix products only (elementwise ops -- activations, f', loss, SGD update -- ignored):
  forward  F   = 2*B*sum_{l=1..L} n_{l-1}*n_l
  DFA step     = F + 2*B*n_L*sum_{l=1..L-1} n_l      (feedback projection e @ [B_1;...;B_{L-1}]^T)
                   + 2*B*sum_{l=1..L} n_{l-1}*n_l    (one weight-gradient product delta_l^T h_{l-1} per layer)
  BP step      = F + 2*B*sum_{l=1..L} n_{l-1}*n_l    (weight-gradient products)
                   + 2*B*sum_{l=2..L} n_{l-1}*n_l    (input-gradient products delta_l W_l)
  peers use the same count for their method (biotorch DFA also computes input gradients it throws away)."""


CONV_FLOP_FORMULA = """\
FLOPs per step of a conv net (dfa_core.model.layer_flops: a multiply-add counts 2, plus bias adds and
one operation per pooled input; activations, f', loss, SGD update ignored). Per block l: P_l the
parametrised layer's forward FLOPs, Q_l its prefix's (pools), a_l its output size, per sample:
  forward  F   = B*sum_l (Q_l + P_l)                  (= B * sum of Block.flops())
  DFA step     = F + B*sum_l P_l                      (weight-gradient VJP of each block)
                   + 2*B*n_L*sum_{l=1..L-1} a_l       (feedback projection e @ B_l^T)
  BP step      = F + B*sum_l P_l                      (weight gradients)
                   + B*sum_{l=2..L} (P_l + Q_l)       (input gradients through layers and pools)
  so BP ~ 3x forward, DFA ~ 2x forward."""


def step_flops(sizes, batch: int, method: str) -> int:
    """Matrix-product FLOPs of one train step; see FLOP_FORMULA."""
    products = [sizes[l - 1] * sizes[l] for l in range(1, len(sizes))]
    forward = 2 * batch * sum(products)
    if method == "dfa":
        return forward + 2 * batch * sizes[-1] * sum(sizes[1:-1]) + 2 * batch * sum(products)
    return forward + 2 * batch * sum(products) + 2 * batch * sum(products[1:])


def conv_step_flops(spec: ModelSpec, batch: int, method: str) -> int:
    """FLOPs of one train step of a ModelSpec ``spec``; see CONV_FLOP_FORMULA."""
    layer = [layer_flops(block.layer, block.u_shape) for block in spec.blocks]  # P_l
    prefix = [block.flops() - p for block, p in zip(spec.blocks, layer)]  # Q_l
    forward = batch * (sum(layer) + sum(prefix))
    if method == "dfa":
        return forward + batch * sum(layer) + 2 * batch * spec.n_out * sum(b.a_size for b in spec.blocks[:-1])
    return forward + batch * sum(layer) + batch * sum(p + q for p, q in zip(layer[1:], prefix[1:]))


def conv_spec(net: str, dtype: str) -> ModelSpec:
    """The ModelSpec of ``CONV_NETS[net]`` in ``dtype``."""
    input_shape, layers = CONV_NETS[net]
    return ModelSpec(input_shape, layers, dtype=dtype, **CONV_SPEC_KW)


def net_spec(net: str, dtype: str):
    """The spec a case runs: a ModelSpec for a conv net, else the MLPSpec of ``NETS[net]``."""
    import dfa_core

    return conv_spec(net, dtype) if net in CONV_NETS else dfa_core.MLPSpec(NETS[net], dtype=dtype, **SPEC_KW)


def case_flops(net: str, spec, batch: int, method: str) -> int:
    return conv_step_flops(spec, batch, method) if net in CONV_NETS else step_flops(NETS[net], batch, method)


# ----------------------------------------------------------------------------- machine


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(args, torch, jax) -> dict:
    info = {
        "host": socket.gethostname(),
        "device": args.device,
        "cpu_model": cpu_model(),
        "os_cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "versions": {
            "python": platform.python_version(),
            **{d: _version(d) for d in ("numpy", "torch", "jax", "jaxlib", "optax", "dfa-framework", "biotorch")},
        },
        "threads": {
            "torch_num_threads": torch.get_num_threads() if torch else None,
            "torch_num_interop_threads": torch.get_num_interop_threads() if torch else None,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "jax_backend": jax.default_backend() if jax else None,
        },
        "matmul_precision": "tf32" if args.tf32 else "highest",
    }
    if args.device == "cuda" and torch is not None and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
    elif args.device == "cuda" and jax is not None and jax.default_backend() == "gpu":
        info["device_name"] = jax.devices()[0].device_kind
    else:
        info["device_name"] = info["cpu_model"]
    return info


def git_state() -> dict:
    """The commit the run measured and the files it had changed on top (None outside a git checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*argv):
        try:
            out = subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    # git diff takes no index lock (git status may refresh the index), so a run never blocks a commit.
    changed = git("diff", "--name-only", "HEAD")
    return {"commit": git("rev-parse", "HEAD"), "changed": changed.splitlines() if changed else []}


# ----------------------------------------------------------------------------- timing


def time_case(run, warmup: int, repeats: int, target_s: float) -> dict:
    """Times ``run(n)`` (n steps, synchronised before it returns).

    The first call (compilation included) is reported as warmup_s and excluded; one
    more timed step calibrates how many steps a repeat needs to last ``target_s``.
    """
    t0 = time.perf_counter()
    run(1)
    warmup_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        run(1)
    t0 = time.perf_counter()
    run(1)
    one = time.perf_counter() - t0
    n = int(min(10_000, max(1, round(target_s / max(one, 1e-9)))))
    # A warm step that already lasts a repeat counts as one (saves seconds on 784-4096x3-10).
    per_step = [one] if n == 1 else []
    for _ in range(repeats - len(per_step)):
        t0 = time.perf_counter()
        run(n)
        per_step.append((time.perf_counter() - t0) / n)
    return {
        "warmup_s": warmup_s,
        "repeats": repeats,
        "steps_per_repeat": n,
        "sec_per_step": {"median": statistics.median(per_step), "min": min(per_step), "max": max(per_step)},
    }


# ----------------------------------------------------------------------------- frameworks


class Env:
    """The imported frameworks and how arrays reach the device."""

    def __init__(self, args, need_torch: bool, need_jax: bool):
        self.args = args
        self.torch = self.jax = None
        self.torch_error = self.jax_error = None
        if need_torch:
            try:
                import torch

                self.torch = torch
                if args.threads:
                    torch.set_num_threads(args.threads)
                torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
                if args.device == "cuda" and not torch.cuda.is_available():
                    self.torch_error = "torch.cuda.is_available() is False"
            except ImportError as e:
                self.torch_error = f"torch not importable: {e}"
        if need_jax:
            try:
                import jax

                self.jax = jax
                jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.tf32 else "highest")
                if args.device == "cuda" and jax.default_backend() != "gpu":
                    self.jax_error = (
                        f"jax default backend is {jax.default_backend()!r}, not 'gpu' (install jax[cuda12])"
                    )
            except ImportError as e:
                self.jax_error = f"jax not importable: {e}"

    def torch_sync(self):
        if self.args.device == "cuda":
            self.torch.cuda.synchronize()

    def torch_device(self):
        return "cuda" if self.args.device == "cuda" else "cpu"


def make_inputs(input_shape, n_out: int, batch: int, dtype: str, seed: int = 0):
    """A random batch: x (B, *input_shape) ~ N(0, 1) and one-hot y (B, n_out), NumPy."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *input_shape)).astype(dtype)
    y_BxO = np.eye(n_out, dtype=dtype)[rng.integers(0, n_out, size=batch)]
    return x, y_BxO


def make_batch(sizes, batch: int, dtype: str, seed: int = 0):
    """A random MLP batch: x (B, n_0) ~ N(0, 1) and one-hot y (B, n_L), NumPy."""
    return make_inputs((sizes[0],), sizes[-1], batch, dtype, seed)


def build_ours(env: Env, impl: str, method: str, spec, batch: int):
    """run(n) for our train_step on ``impl``; params are fresh arrays, donated step to step.

    Args:
      spec: an MLPSpec or a ModelSpec (conv nets) in the run's dtype.
    """
    import dfa_core

    lr = CONV_LEARNING_RATE if isinstance(spec, ModelSpec) else LEARNING_RATE
    opt = dfa_core.OptimizerSpec("sgd", learning_rate=lr)
    backend = "jax" if impl == "jax" else "torch"
    be = dfa_core.get_backend(backend)
    step = be.train_step(spec, opt, method, "sample", donate=True)
    params_np = dfa_core.init_params(spec, seed=0)
    feedback_np = dfa_core.init_feedback(spec, seed=1)
    in_shape = spec.input_shape if isinstance(spec, ModelSpec) else (spec.n_in,)
    x_np, y_np = make_inputs(in_shape, spec.n_out, batch, spec.dtype)
    tx = be.make_optimizer(opt, spec.dtype)
    if backend == "torch":
        torch = env.torch
        if impl == "torch_compile":
            # Every case's step is a closure of the same code object; without a reset,
            # dynamo's per-code cache limit would silently send later cases to eager.
            torch._dynamo.reset()
            step = torch.compile(step, dynamic=False)
        dev = env.torch_device()
        params, feedback, x, y = (be.asarray(t, device=dev) for t in (params_np, feedback_np, x_np, y_np))
        sync = env.torch_sync
    else:
        jax = env.jax
        with be.precision_scope(spec.dtype):
            params, feedback, x, y = (be.asarray(t) for t in (params_np, feedback_np, x_np, y_np))
        sync = jax.block_until_ready
    state = [params, tx.init(params), None]

    def run(n: int):
        params, opt_state, loss = state
        for _ in range(n):
            params, opt_state, loss = step(params, feedback, opt_state, x, y)
        if backend == "jax":
            sync((params, loss))
        else:
            sync()
        state[:] = [params, opt_state, loss]
        return loss

    return run, (lambda: float(be.to_numpy(state[2])))


def build_peer(env: Env, impl: str, sizes, batch: int):
    """run(n) for a peer: plain torch BP (nn.Sequential + optim.SGD) or biotorch DFA."""
    import dfa_core

    torch = env.torch
    F = torch.nn.functional
    args = env.args
    spec = dfa_core.MLPSpec(sizes, dtype=args.dtype, **SPEC_KW)
    tdtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    dev = env.torch_device()
    layers = []
    for l, (w, b) in enumerate(dfa_core.init_params(spec, seed=0)):
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if l < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    model = torch.nn.Sequential(*layers)
    if impl == "biotorch":
        from biotorch.module.biomodule import BioModule

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a conversion report
            model = BioModule(model, mode="dfa", output_dim=sizes[-1])
    model = model.to(device=dev, dtype=tdtype)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    x_np, y_np = make_batch(sizes, batch, args.dtype)
    x, y = torch.from_numpy(x_np).to(dev), torch.from_numpy(y_np).to(dev)

    def loss_fn(z_BxO, y_BxO):  # the spec's loss: BCE summed over outputs, mean over the batch
        return F.binary_cross_entropy_with_logits(z_BxO, y_BxO, reduction="sum") / z_BxO.shape[0]

    state = [None]

    def run(n: int):
        for _ in range(n):
            sgd.zero_grad(set_to_none=True)
            out = model(x, targets=y, loss_function=loss_fn) if impl == "biotorch" else model(x)
            loss = loss_fn(out, y)
            loss.backward()
            sgd.step()
        env.torch_sync()
        state[0] = loss
        return loss

    return run, (lambda: float(state[0].detach().cpu()))


# ----------------------------------------------------------------------------- peak


def peak_matmul(env: Env, sizes, repeats: int, target_s: float):
    """Best GFLOP/s of an n x n @ n x n product per framework and size (spec.dtype)."""
    args = env.args
    out = []
    for fw in ("torch", "jax"):
        mod, err = (env.torch, env.torch_error) if fw == "torch" else (env.jax, env.jax_error)
        if mod is None or err:
            out.append({"kind": "peak_matmul", "framework": fw, "status": "skipped", "reason": err or "not requested"})
            continue
        for n in sizes:
            rng = np.random.default_rng(n)
            a_np, b_np = (rng.standard_normal((n, n)).astype(args.dtype) for _ in range(2))
            if fw == "torch":
                torch = env.torch
                a, b = torch.from_numpy(a_np).to(env.torch_device()), torch.from_numpy(b_np).to(env.torch_device())
                c = torch.empty_like(a)

                def run(k, a=a, b=b, c=c):
                    for _ in range(k):
                        torch.mm(a, b, out=c)
                    env.torch_sync()

            else:
                jax = env.jax
                import dfa_jax

                with dfa_jax.precision_scope(args.dtype):
                    a, b = jax.device_put(a_np), jax.device_put(b_np)
                    mm = jax.jit(lambda p, q: p @ q)

                    def run(k, a=a, b=b, mm=mm):
                        with dfa_jax.precision_scope(args.dtype):
                            for _ in range(k):
                                r = mm(a, b)
                            r.block_until_ready()

            t = time_case(run, 1, repeats, target_s)
            flops = 2 * n**3
            out.append(
                {
                    "kind": "peak_matmul",
                    "framework": fw,
                    "n": n,
                    "status": "ok",
                    "sec_per_matmul": t["sec_per_step"],
                    "gflop_per_s_best": flops / t["sec_per_step"]["min"] / 1e9,
                    "gflop_per_s_median": flops / t["sec_per_step"]["median"] / 1e9,
                }
            )
    return out


# ----------------------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_child(payload: dict) -> dict:
    """Runs in a fresh process: how much memory a train step needs beyond what is resident before it.

    CPU: the step is warmed up (compiled), then the kernel's RSS high-water mark is
    reset (``echo 5 > /proc/self/clear_refs``), a few steps run, and the result is
    VmHWM - VmRSS(before). The parent starts this process with a fixed
    ``MALLOC_MMAP_THRESHOLD_`` so glibc hands every buffer >= 128 KiB back to the OS
    when it is freed; otherwise freed warm-up buffers would stay resident and the
    delta would read ~0. JAX also reports XLA's planned temporary buffer size.
    GPU: torch's peak allocated bytes after a reset; JAX's peak bytes in use (not
    resettable, so it includes the warm-up step).
    """
    args = argparse.Namespace(**payload["args"])
    impl, method, sizes, batch = payload["impl"], payload["method"], tuple(payload["sizes"]), payload["batch"]
    env = Env(args, need_torch=impl != "jax", need_jax=impl == "jax")
    import dfa_core

    run, _ = build_ours(env, impl, method, dfa_core.MLPSpec(sizes, dtype=args.dtype, **SPEC_KW), batch)
    run(2)
    rec = {}
    if args.device == "cuda" and impl != "jax":
        torch = env.torch
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(3)
        rec["step_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        rec["method_note"] = "torch.cuda.max_memory_allocated after reset - memory_allocated before"
    elif args.device == "cuda":
        stats0 = env.jax.devices()[0].memory_stats() or {}
        run(3)
        stats = env.jax.devices()[0].memory_stats() or {}
        rec["step_peak_mib"] = (stats.get("peak_bytes_in_use", 0) - stats0.get("bytes_in_use", 0)) / 2**20
        rec["method_note"] = "jax peak_bytes_in_use (incl. warm-up) - bytes_in_use before"
    else:
        base_kib = _proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            reset = True
        except OSError:
            reset = False
        run(3)
        rec["step_peak_mib"] = (_proc_status_kib("VmHWM") - base_kib) / 1024
        rec["rss_before_mib"] = base_kib / 1024
        rec["method_note"] = (
            "VmHWM (reset after warm-up) - VmRSS before, MALLOC_MMAP_THRESHOLD_=131072"
            if reset
            else "clear_refs unavailable: VmHWM is the lifetime peak (includes import and compile)"
        )
    if impl == "jax":
        rec["xla_temp_mib"] = xla_temp_mib(env, method, sizes, batch)
    return rec


def xla_temp_mib(env: Env, method, sizes, batch):
    """XLA's own plan: temporary buffers of the compiled step, MiB (None if not exposed)."""
    import dfa_core
    import dfa_jax

    args = env.args
    spec = dfa_core.MLPSpec(sizes, dtype=args.dtype, **SPEC_KW)
    opt = dfa_core.OptimizerSpec("sgd", learning_rate=LEARNING_RATE)
    step = dfa_jax.train_step(spec, opt, method, "sample", donate=True)
    jitted = getattr(step, "jitted", None)
    if jitted is None:
        return None
    x_np, y_np = make_batch(sizes, batch, args.dtype)
    with dfa_jax.precision_scope(args.dtype):
        params = dfa_jax.asarray(dfa_core.init_params(spec, 0))
        fb = dfa_jax.asarray(dfa_core.init_feedback(spec, 1))
        x, y = dfa_jax.asarray(x_np), dfa_jax.asarray(y_np)
        opt_state = dfa_jax.make_optimizer(opt, spec.dtype).init(params)
        try:
            analysis = jitted.lower(params, fb, opt_state, x, y).compile().memory_analysis()
            return analysis.temp_size_in_bytes / 2**20
        except Exception:  # memory_analysis is backend-dependent
            return None


def measure_memory(args, impl, method, net, batch) -> dict:
    payload = {"args": vars(args), "impl": impl, "method": method, "sizes": list(NETS[net]), "batch": batch}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--_memory-child", json.dumps(payload)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    rec = {"kind": "memory", "impl": impl, "method": method, "net": net, "batch": batch}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**rec, "status": "skipped", "reason": f"child failed (rc {proc.returncode}): {tail[0][:200]}"}
    return {**rec, "status": "ok", **json.loads(lines[-1])}


# ----------------------------------------------------------------------------- report


def fmt_ms(s):
    return f"{s * 1e3:.3g}"


def markdown_table(records) -> str:
    rows = [
        "| impl | method | net | B | ms/step median [min, max] | samples/s "
        "| GFLOP/step | GFLOP/s | % peak | warm-up s |",
        "| --- | --- | --- | --: | --- | --: | --: | --: | --: | --: |",
    ]
    for r in records:
        if r["kind"] != "train_step":
            continue
        head = f"| {r['impl']} | {r['method']} | {r['net']} | {r['batch']} "
        if r["status"] != "ok":
            rows.append(head + f"| skipped: {r['reason']} | | | | | |")
            continue
        t = r["sec_per_step"]
        rows.append(
            head
            + f"| {fmt_ms(t['median'])} [{fmt_ms(t['min'])}, {fmt_ms(t['max'])}] "
            + f"| {r['samples_per_s']:,.0f} | {r['gflop_per_step']:.3g} | {r['gflop_per_s']:.1f} "
            + f"| {100 * r['frac_peak']:.0f}% | {r['warmup_s']:.2f} |"
        )
    return "\n".join(rows)


def target_checks(records, device: str) -> list:
    """The issue's targets (a)-(e), each as a line with its status."""
    ok = {
        (r["impl"], r["method"], r["net"], r["batch"]): r
        for r in records
        if r["kind"] == "train_step" and r["status"] == "ok"
    }
    med = lambda r: r["sec_per_step"]["median"]
    lines = []

    r = ok.get(("jax", "dfa", "784-4096x3-10", 1024))
    if r:
        verdict = "PASS" if r["frac_peak"] >= 0.8 else "FAIL"
        lines.append(
            f"(a) JAX DFA 784-4096x3-10 B=1024: {r['gflop_per_s']:.1f} GFLOP/s = "
            f"{100 * r['frac_peak']:.0f}% of peak (target >= 80%): {verdict}"
        )
    else:
        lines.append("(a) JAX DFA 784-4096x3-10 B=1024: not measured in this run")

    deep = [n for n in NETS if len(NETS[n]) - 2 >= 3]
    for impl in OURS:
        pairs = []
        for (i, m, net, b), r in ok.items():
            if i == impl and m == "dfa" and net in deep and (impl, "bp", net, b) in ok:
                pairs.append((net, b, med(r) / med(ok[(impl, "bp", net, b)])))
        if pairs:
            n_pass = sum(q <= 0.75 for _, _, q in pairs)
            # The FLOP ratio is what equal efficiency would give: 0.77 on the deep narrow net, 0.69 on 4096x3.
            detail = ", ".join(
                f"{net} B={b}: {q:.3f} "
                f"(FLOP ratio {step_flops(NETS[net], b, 'dfa') / step_flops(NETS[net], b, 'bp'):.3f})"
                for net, b, q in sorted(pairs)
            )
            lines.append(f"(b) {impl}: DFA/BP step time (target <= 0.75) {n_pass}/{len(pairs)} pass -- {detail}")
        else:
            lines.append(f"(b) {impl}: no DFA/BP pair on a net with >= 3 hidden layers")

    if device == "cpu":
        for impl in ("torch", "torch_compile"):
            ratios = [
                (m, net, b, med(r) / med(ok[("jax", m, net, b)]))
                for (i, m, net, b), r in ok.items()
                if i == impl and ("jax", m, net, b) in ok and net in NETS
            ]
            if ratios:
                gm = math.exp(statistics.mean(math.log(q) for *_, q in ratios))
                n_pass = sum(q <= 1.3 for *_, q in ratios)
                worst = max(ratios, key=lambda t: t[3])
                lines.append(
                    f"(c) {impl}/jax step time on CPU (target <= 1.3): {n_pass}/{len(ratios)} pass, geo-mean {gm:.2f}, "
                    f"worst {worst[3]:.2f} ({worst[0]} {worst[1]} B={worst[2]})"
                )
            else:
                lines.append(f"(c) {impl}/jax: no common cases")
    else:
        lines.append("(c) torch/JAX time ratio is a CPU target; this run is on cuda")

    pairs = []
    for (i, m, net, b), r in ok.items():
        if i == "biotorch":
            for ours in ("torch", "torch_compile", "jax"):
                if (ours, "dfa", net, b) in ok:
                    pairs.append((ours, net, b, ok[(ours, "dfa", net, b)]["samples_per_s"] / r["samples_per_s"]))
    if pairs:
        parts = ", ".join(f"{o} {net} B={b}: {q:.2f}x" for o, net, b, q in sorted(pairs))
        n_pass = sum(q >= 2 for *_, q in pairs)
        lines.append(f"(d) ours/biotorch DFA throughput (target >= 2x): {n_pass}/{len(pairs)} pass -- {parts}")
    else:
        lines.append("(d) biotorch not measured (not installed: pip install biotorch)")

    mem = {
        (r["impl"], r["method"], r["net"], r["batch"]): r
        for r in records
        if r["kind"] == "memory" and r["status"] == "ok"
    }
    got = False
    for (impl, m, net, b), r in sorted(mem.items()):
        if m == "dfa" and (impl, "bp", net, b) in mem:
            bp = mem[(impl, "bp", net, b)]
            got = True
            # On JAX, XLA's planned temporaries are the honest number (its CPU runtime keeps
            # buffers between calls, so the RSS delta is only a lower bound).
            key = (
                "xla_temp_mib"
                if r.get("xla_temp_mib") is not None and bp.get("xla_temp_mib") is not None
                else "step_peak_mib"
            )
            verdict = "PASS" if r[key] <= bp[key] else "FAIL"
            what = "XLA temp buffers" if key == "xla_temp_mib" else "step peak memory"
            extra = (
                f" (RSS delta DFA {r['step_peak_mib']:.1f} MiB vs BP {bp['step_peak_mib']:.1f} MiB)"
                if key == "xla_temp_mib"
                else ""
            )
            lines.append(
                f"(e) {impl} {net} B={b}: {what} DFA {r[key]:.1f} MiB vs BP {bp[key]:.1f} MiB "
                f"(target DFA <= BP): {verdict}{extra}"
            )
    if not got:
        lines.append("(e) no DFA/BP memory pair measured")
    return lines


def conv_checks(records) -> list:
    """Issue 10's conv lines: DFA/BP step time per backend and net (target <= 0.75), torch/JAX time."""
    ok = {
        (r["impl"], r["method"], r["net"], r["batch"]): r
        for r in records
        if r["kind"] == "train_step" and r["status"] == "ok" and r["net"] in CONV_NETS
    }
    med = lambda r: r["sec_per_step"]["median"]
    lines = []
    for impl in OURS:
        pairs = sorted(
            (net, b, r, ok[(impl, "bp", net, b)])
            for (i, m, net, b), r in ok.items()
            if i == impl and m == "dfa" and (impl, "bp", net, b) in ok
        )
        if not pairs:
            continue
        n_pass = sum(med(dfa) / med(bp) <= 0.75 for _, _, dfa, bp in pairs)
        # The FLOP ratio is what equal efficiency of the DFA and BP steps would give.
        detail = ", ".join(
            f"{net} B={b}: {med(dfa) / med(bp):.3f} (FLOP ratio {dfa['flop_per_step'] / bp['flop_per_step']:.3f})"
            for net, b, dfa, bp in pairs
        )
        lines.append(f"{impl}: DFA/BP step time (target <= 0.75) {n_pass}/{len(pairs)} pass -- {detail}")
    ratios = [
        f"{m} {net} B={b}: {med(r) / med(ok[('jax', m, net, b)]):.2f}"
        for (i, m, net, b), r in sorted(ok.items())
        if i == "torch" and ("jax", m, net, b) in ok
    ]
    if ratios:
        lines.append("torch/jax step time: " + ", ".join(ratios))
    for r in sorted(ok.values(), key=lambda r: (r["impl"], r["method"], r["net"], r["batch"])):
        if not (math.isfinite(r["final_loss"]) and r["final_loss"] < DIVERGED_LOSS):
            lines.append(
                f"WARNING {r['impl']} {r['method']} {r['net']} B={r['batch']}: final loss {r['final_loss']:.3g}, "
                "diverged (its time may be of inf/NaN arithmetic)"
            )
    skipped = [r for r in records if r["kind"] == "train_step" and r["status"] != "ok" and r["net"] in CONV_NETS]
    for r in skipped:
        lines.append(f"skipped {r['impl']} {r['method']} {r['net']} B={r['batch']}: {r['reason']}")
    if not lines:
        lines.append("no conv-net case measured")
    return lines


def print_checks(records, device: str) -> None:
    """The issue-5 target lines (when the records hold an MLP case), then issue 10's conv lines (a conv net)."""
    mlp = any(r["kind"] == "memory" or (r["kind"] == "train_step" and r["net"] not in CONV_NETS) for r in records)
    if mlp:
        print("Issue 5 targets:")
        for line in target_checks(records, device):
            print("  " + line)
    if any(r["kind"] == "train_step" and r["net"] in CONV_NETS for r in records):
        print(("\n" if mlp else "") + "Conv nets (issue 10):")
        for line in conv_checks(records):
            print("  " + line)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small grid, fewer repeats (< 2 min on 2 CPU cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", default="float32", help="float32 (default), float64; bfloat16 is reported as unsupported")
    p.add_argument("--backends", default=",".join(IMPLS), help=f"comma list from {','.join(IMPLS)}")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument(
        "--nets",
        default=None,
        help=f"comma list from {','.join(NETS)} (MLPs) and {','.join(CONV_NETS)} (conv nets) "
        "(default: the mode's grid, every conv net included)",
    )
    p.add_argument(
        "--batches",
        default=None,
        help=f"comma list of batch sizes (default: the mode's grid for MLPs, {','.join(map(str, CONV_BATCHES))} "
        "for conv nets)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads(N); N=1 also makes XLA single-threaded"
    )
    p.add_argument("--tf32", action="store_true", help="allow TF32 float32 matmuls on GPU (default: full float32)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses (target e)")
    p.add_argument("--out", default=None, help="JSONL path (default: benchmarks/results/<host>-<device>.jsonl)")
    p.add_argument(
        "--report",
        default=None,
        metavar="JSONL",
        help="print the table and target checks of a results file; run nothing",
    )
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    def split(s, choices=None, conv=str):
        items = [conv(t) for t in s.split(",") if t.strip()]
        bad = [t for t in items if choices is not None and t not in choices]
        if bad:
            p.error(f"unknown {bad}; choose from {list(choices)}")
        return items

    if args.memory_child is None:
        mode = QUICK if args.quick else FULL
        args.backends = split(args.backends, IMPLS)
        args.methods = split(args.methods, METHODS)
        if args.nets:
            args.nets = split(args.nets, {**NETS, **CONV_NETS})
        else:
            args.nets = list(mode["nets"]) + list(mode["conv_nets"])
        args.batches = split(args.batches, conv=int) if args.batches else None
    return args


def configure_env(args):
    """Environment that must be set before jax is imported."""
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        # torch and JAX share the GPU; JAX would otherwise grab 75% of it at start-up.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    warnings.filterwarnings("ignore", message=".*non-full backward hook.*")


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child is not None:
        payload = json.loads(args.memory_child)
        configure_env(argparse.Namespace(**payload["args"]))
        print(json.dumps(memory_child(payload)))
        return
    if args.report is not None:
        with open(args.report) as f:
            records = [json.loads(line) for line in f if line.strip()]
        print(markdown_table(records))
        print()
        print_checks(records, records[0]["device"] if records else args.device)
        return
    configure_env(args)
    t_start = time.perf_counter()
    mode = QUICK if args.quick else FULL
    mlp_nets = [n for n in args.nets if n in NETS]
    conv_nets = [n for n in args.nets if n in CONV_NETS]
    cases = [
        (impl, method, net, b)
        for net in mlp_nets
        for b in args.batches or mode["batches"]
        for method in args.methods
        for impl in args.backends
        if impl in OURS or PEER_METHOD[impl] == method
    ]
    if args.quick and mlp_nets == list(QUICK["nets"]) and args.batches in (None, list(QUICK["batches"])):
        cases += [c for c in mode["extra"] if c[0] in args.backends and c[1] in args.methods]
    # Conv nets after the MLP grid, so the issue-5 rows come first; peers have no conv version here.
    cases += [
        (impl, method, net, b)
        for net in conv_nets
        for b in args.batches or CONV_BATCHES
        for method in args.methods
        for impl in args.backends
        if impl in mode["conv_impls"]
    ]
    need_torch = any(c[0] != "jax" for c in cases) or "torch" in args.backends
    need_jax = any(c[0] == "jax" for c in cases)
    env = Env(args, need_torch, need_jax)
    info = machine_info(args, env.torch, env.jax)
    host_dev = f"{info['host']}-{args.device}"
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{host_dev}.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)

    print(
        f"# bench_train_step on {info['host']} ({info['device_name']}), device={args.device}, dtype={args.dtype}, "
        f"{'quick' if args.quick else 'full'} mode"
    )
    print(f"# versions: {json.dumps(info['versions'])}")
    print(
        f"# threads: {json.dumps(info['threads'])}, os.cpu_count()={info['os_cpu_count']}, "
        f"affinity={info['affinity_cpus']}, loadavg={os.getloadavg()}"
    )
    if mlp_nets:
        print(FLOP_FORMULA)
    if conv_nets:
        print(CONV_FLOP_FORMULA)
    sys.stdout.flush()

    base = {
        "bench": "bench_train_step",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **info,
        "dtype": args.dtype,
        "mode": "quick" if args.quick else "full",
        "git": git_state(),  # the torch and JAX steps change between commits: say which code ran
    }
    records = []

    def emit(rec):
        rec = {**base, **rec, "loadavg_1m": os.getloadavg()[0]}
        records.append(rec)
        return rec

    try:
        import dfa_core

        dfa_core.MLPSpec((2, 2), dtype=args.dtype)
        dtype_error = None
    except ValueError as e:
        dtype_error = f"dtype {args.dtype!r} unsupported: {e}"

    peak = 0.0
    if dtype_error is None:
        sizes = mode["peak_sizes_cuda"] if args.device == "cuda" else mode["peak_sizes_cpu"]
        for rec in peak_matmul(env, sizes, mode["repeats"], mode["target_s"]):
            emit(rec)
            if rec["status"] == "ok":
                peak = max(peak, rec["gflop_per_s_best"])
                print(
                    f"peak {rec['framework']:5s} n={rec['n']:5d}: {rec['gflop_per_s_best']:.1f} GFLOP/s (best), "
                    f"{rec['gflop_per_s_median']:.1f} (median)",
                    flush=True,
                )
            else:
                print(f"peak {rec['framework']}: skipped ({rec['reason']})", flush=True)
        print(f"peak = {peak:.1f} GFLOP/s (best of torch and JAX, {args.dtype})", flush=True)

    biotorch_error = None
    if "biotorch" in args.backends:
        try:
            import biotorch  # noqa: F401
        except ImportError:
            biotorch_error = "biotorch not installed (pip install biotorch)"
            print(f"skip biotorch: {biotorch_error}", flush=True)

    for impl, method, net, batch in cases:
        spec = None
        case = {
            "kind": "train_step",
            "impl": impl,
            "method": method,
            "net": net,
            **(
                {
                    "model": "conv",
                    "input_shape": list(CONV_NETS[net][0]),
                    "layers": [repr(l) for l in CONV_NETS[net][1]],
                }
                if net in CONV_NETS
                else {"layer_sizes": list(NETS[net])}
            ),
            "batch": batch,
            "group_mode": "sample",
            "optimizer": f"sgd(lr={CONV_LEARNING_RATE if net in CONV_NETS else LEARNING_RATE})",
            **(CONV_SPEC_KW if net in CONV_NETS else SPEC_KW),
            "backend": "jax" if impl == "jax" else "torch",
            "compiler": {"torch": "eager", "torch_compile": "torch.compile", "jax": "jax.jit"}.get(impl, "eager"),
        }
        reason = dtype_error
        if reason is None and impl == "jax":
            reason = env.jax_error
        elif reason is None:
            reason = env.torch_error or (biotorch_error if impl == "biotorch" else None)
        if reason is None:
            try:
                spec = net_spec(net, args.dtype)
                flops = case_flops(net, spec, batch, method)
                run, final_loss = (
                    build_peer(env, impl, NETS[net], batch)
                    if impl in PEERS
                    else build_ours(env, impl, method, spec, batch)
                )
                timing = time_case(run, mode["warmup"], mode["repeats"], mode["target_s"])
            except Exception as e:  # report, e.g., a torch.compile failure, and go on
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        if reason is not None:
            rec = emit({**case, "status": "skipped", "reason": reason})
            print(f"skip {impl:13s} {method} {net:15s} B={batch:5d}: {reason}", flush=True)
            continue
        sec = timing["sec_per_step"]["median"]
        loss = final_loss()
        rec = emit(
            {
                **case,
                "status": "ok",
                **timing,
                "samples_per_s": batch / sec,
                "flop_per_step": flops,
                "gflop_per_step": flops / 1e9,
                "gflop_per_s": flops / sec / 1e9,
                "peak_gflop_per_s": peak,
                "frac_peak": (flops / sec / 1e9) / peak if peak else None,
                "final_loss": loss,
                "loss_finite": math.isfinite(loss),
            }
        )
        print(
            f"{impl:13s} {method} {net:15s} B={batch:5d}: {fmt_ms(sec)} ms/step, "
            f"{rec['samples_per_s']:,.0f} samples/s, {rec['gflop_per_s']:.1f} GFLOP/s "
            f"({100 * (rec['frac_peak'] or 0):.0f}% peak), warm-up {timing['warmup_s']:.2f} s",
            flush=True,
        )

    if not args.no_memory and dtype_error is None and mlp_nets:  # memory (target e) is an MLP target
        for net, batch in mode["memory"]:
            for impl in ("torch", "jax"):
                if (
                    impl not in args.backends
                    or (impl == "jax" and env.jax_error)
                    or (impl == "torch" and env.torch_error)
                ):
                    continue
                for method in args.methods:
                    rec = emit(measure_memory(args, impl, method, net, batch))
                    if rec["status"] == "ok":
                        print(
                            f"memory {impl:5s} {method} {net} B={batch}: step peak {rec['step_peak_mib']:.1f} MiB"
                            + (
                                f", XLA temp {rec['xla_temp_mib']:.1f} MiB"
                                if rec.get("xla_temp_mib") is not None
                                else ""
                            ),
                            flush=True,
                        )
                    else:
                        print(f"memory {impl} {method} {net} B={batch}: skipped ({rec['reason']})", flush=True)

    with open(out_path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")

    print()
    print(markdown_table(records))
    print()
    print_checks(records, args.device)
    print(
        f"\nwrote {len(records)} records to {out_path}; wall {time.perf_counter() - t_start:.1f} s, "
        f"loadavg {os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
