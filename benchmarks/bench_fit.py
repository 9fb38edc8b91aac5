"""End-to-end training speed of dfa_train.fit against a hand-written loop, the matmul peak and fit_many.

Issue 8 part 4. A plain script in the manner of bench_train_step.py (whose machine
description, framework set-up, timing helper and matmul peak it reuses): every case is
warmed up (one epoch; JAX compilation excluded and reported apart as ``warmup_s``),
timed end to end (fit returns NumPy arrays, the hand-written loops read a float per
epoch, so every timing ends synchronised), and written as one JSON record per line; a
Markdown table and the issue's target checks are printed and also written beside the
JSON as ``.md``.

    python benchmarks/bench_fit.py --quick                 # 6,000 / 2,000 rows, 2 epochs: aimed at < 3 min on 2 cores
    python benchmarks/bench_fit.py                         # full MNIST (60,000 / 10,000), 5 epochs
    python benchmarks/bench_fit.py --device cuda           # torch on cuda, JAX on its GPU

Two setups, both MLPSpec(activation="tanh", output="sigmoid", reduction="sum") trained
by DFA (mode "sample") with SGD lr 1e-4, batch 200, float32: the report's Alpha run
784-200-10, and 784-800-800-10. Data: MNIST from ``dfa_train.data`` ($DFA_DATA_DIR or
the cache; never downloaded here), else synthetic data of the same shapes (recorded as
``data_source``). Cases, per setup and backend:

  fit           ``dfa_train.fit`` with a test set, evaluation included (fit measures the
                train error and test accuracy every epoch); once per ``engine`` when fit
                has that keyword ('epoch': compiled whole epochs, 'step': the per-step loop)
  minimal       a per-step loop written here, what a user writes by hand (``jax_minimal``,
                ``torch_minimal``), test accuracy at each epoch's end
  fit_many      ``dfa_train.fit_many`` with 8 members (different seeds), one call
  fit_sequential  the same 8 members as 8 ``fit`` calls one after the other

FLOPs are matrix products only (``FLOP_FORMULA``); ``frac_peak`` is a case's GFLOP/s
over the best float32 square-matmul GFLOP/s of torch or JAX in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_step as bts  # (sibling script: machine info, Env, timing, matmul peak)

SETUPS = {
    # name: (n_0, ..., n_L)
    "alpha": (784, 200, 10),
    "784-800-800-10": (784, 800, 800, 10),
}
BACKENDS = ("torch", "jax")
SPEC_KW = {"activation": "tanh", "output": "sigmoid", "reduction": "sum"}  # the report's Alpha run
LEARNING_RATE = 1e-4
BATCH = 200
MEMBERS = 8
FIT_SEED, PARAM_SEED, FEEDBACK_SEED = 0, 0, 1  # fit's defaults; the minimal loops use the same draws

MODES = {
    # n_train/n_test: rows of MNIST (or synthetic) used; repeats: timed runs of fit and the minimal loop.
    "full": {
        "epochs": 5,
        "n_train": 60_000,
        "n_test": 10_000,
        "repeats": 3,
        "members": MEMBERS,
        "peak_sizes_cpu": (1024, 2048),
        "peak_sizes_cuda": (2048, 4096, 8192),
        "peak_repeats": 5,
        "peak_target_s": 0.25,
    },
    "quick": {
        "epochs": 2,
        "n_train": 6_000,
        "n_test": 2_000,
        "repeats": 1,
        "members": MEMBERS,
        "peak_sizes_cpu": (1024, 2048),
        "peak_sizes_cuda": (2048, 4096),
        "peak_repeats": 3,
        "peak_target_s": 0.05,
    },
    # --smoke (hidden): checks that every path runs, in seconds; its numbers mean nothing.
    "smoke": {
        "epochs": 1,
        "n_train": 1_000,
        "n_test": 400,
        "repeats": 1,
        "members": 2,
        "peak_sizes_cpu": (256,),
        "peak_sizes_cuda": (1024,),
        "peak_repeats": 2,
        "peak_target_s": 0.01,
    },
}

TARGETS = {
    # name: (what, comparison, threshold); the lines printed at the end say value / threshold.
    "jax_frac_peak": "JAX fit over the whole run >= 55% of the matmul peak",
    "jax_vs_minimal": "JAX fit time <= 0.5x the minimal jitted loop's",
    "torch_vs_minimal": "torch fit time <= 0.8x the minimal torch loop's",
    "many_vs_sequential": "fit_many (8 members) throughput >= 2x 8 sequential fits on CPU (>= 6x on GPU)",
}

FLOP_FORMULA = """\
FLOPs, matrix products only (activations, f', loss, SGD update, gathers ignored):
  one DFA step on B rows  = bench_train_step.step_flops(sizes, B, 'dfa')
                          = 2*B*sum_l n_{l-1}*n_l (forward) + 2*B*n_L*sum_{l<L} n_l (e @ B^T) + 2*B*sum_l n_{l-1}*n_l (dW)
  fit, per epoch          = steps over the N_train rows + forward passes over N_train and N_test (train error, test accuracy)
  minimal loop, per epoch = steps over the N_train rows + a forward pass over N_test (test accuracy)"""  # noqa: E501
# (the formula reads best one term per line, as printed in every result file's header)


# ----------------------------------------------------------------------------- work


def forward_flops(sizes, rows: int) -> int:
    """Matmul FLOPs of a forward pass over ``rows`` samples."""
    return 2 * rows * sum(sizes[l - 1] * sizes[l] for l in range(1, len(sizes)))


def epoch_flops(sizes, n_train: int, n_test: int, batch: int, eval_train: bool) -> dict:
    """Matmul FLOPs of one epoch: DFA steps (ragged last batch counted as it is) and evaluation."""
    full, rest = divmod(n_train, batch)
    train = full * bts.step_flops(sizes, batch, "dfa") + (bts.step_flops(sizes, rest, "dfa") if rest else 0)
    evaluation = forward_flops(sizes, n_test + (n_train if eval_train else 0))
    return {"train": train, "eval": evaluation, "total": train + evaluation}


# ----------------------------------------------------------------------------- data


def load_data(n_train: int, n_test: int, dtype: str = "float32"):
    """(x_train (n_train, 784), y_train (n_train, 10), x_test (n_test, 784), y_test (n_test, 10)), source.

    The first rows of MNIST when ``dfa_train.data`` finds it without downloading, else
    synthetic data of the same shapes: pixels ~ U(0, 1), uniformly random one-hot labels
    (nothing to learn, but the same work).
    """
    from dfa_train import data

    try:
        folder = data.find_mnist(None, download=False)
        d = data.load_mnist(folder, dtype)
        if n_train > d.x_train.shape[0] or n_test > d.x_test.shape[0]:
            raise ValueError(f"MNIST has {d.x_train.shape[0]}/{d.x_test.shape[0]} rows, asked {n_train}/{n_test}")
        arrays = (d.x_train[:n_train], d.y_train[:n_train], d.x_test[:n_test], d.y_test[:n_test])
        return tuple(np.ascontiguousarray(a) for a in arrays), {"data_source": "mnist", "data_dir": folder}
    except (FileNotFoundError, ValueError) as err:
        rng = np.random.default_rng(0)
        x_train, x_test = (rng.random((n, 784), dtype=np.float32).astype(dtype) for n in (n_train, n_test))
        y_train, y_test = (data.one_hot(rng.integers(0, 10, n), 10, dtype) for n in (n_train, n_test))
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        return (x_train, y_train, x_test, y_test), {"data_source": "synthetic", "data_note": reason}


# ----------------------------------------------------------------------------- frameworks


@contextlib.contextmanager
def backend_scope(env, backend: str):
    """Where a backend's arrays live: fit builds torch tensors on torch's default device."""
    if backend == "torch" and env.args.device == "cuda":
        env.torch.set_default_device("cuda")
        try:
            yield
        finally:
            env.torch.set_default_device("cpu")
    else:
        yield


def fit_engines():
    """The values of fit's ``engine`` keyword to measure: ('epoch', 'step') if it has one, else (None,)."""
    from dfa_train import fit

    return ("epoch", "step") if "engine" in inspect.signature(fit).parameters else (None,)


def load_fit_many():
    """(fit_many, None), or (None, why not) while dfa_train.many is not importable."""
    try:
        from dfa_train.many import fit_many
    except ImportError as err:
        return None, f"{type(err).__name__}: {err}"
    return fit_many, None


def fit_kwargs(data, epochs: int, engine) -> dict:
    import dfa_core

    kw = {
        "x_test": data[2],
        "y_test": data[3],
        "epochs": epochs,
        "batch_size": BATCH,
        "optimizer": dfa_core.OptimizerSpec("sgd", learning_rate=LEARNING_RATE),
        "seed": FIT_SEED,
        "param_seed": PARAM_SEED,
        "feedback_seed": FEEDBACK_SEED,
    }
    if engine is not None:
        kw["engine"] = engine
    return kw


# ----------------------------------------------------------------------------- minimal loops


def jax_minimal(spec, data, lr: float, batch: int):
    """run(epochs) -> test accuracy per epoch: one jax.jit-ed DFA + SGD step over NumPy-sliced batches.

    What a user writes by hand (cf. jax's mnist_classifier_fromscratch.py): same initial
    params, feedback and batch order as fit, so the accuracies should agree with fit's.
    """
    import jax
    import jax.numpy as jnp

    import dfa_core

    @jax.jit
    def step(params, feedback, x_BxI, y_BxO):
        hs = [x_BxI]
        for w, b in params[:-1]:
            hs.append(jnp.tanh(hs[-1] @ w.T + b))
        z_BxO = hs[-1] @ params[-1][0].T + params[-1][1]
        loss = jnp.sum(jax.nn.softplus(z_BxO) - y_BxO * z_BxO)  # BCE with logits, summed
        e_BxO = jax.nn.sigmoid(z_BxO) - y_BxO
        deltas = [(e_BxO @ fb_HxO.T) * (1 - h * h) for fb_HxO, h in zip(feedback, hs[1:])] + [e_BxO]
        new = tuple((w - lr * d.T @ h, b - lr * d.sum(0)) for (w, b), d, h in zip(params, deltas, hs))
        return new, loss

    @jax.jit
    def accuracy(params, x, labels):
        h = x
        for w, b in params[:-1]:
            h = jnp.tanh(h @ w.T + b)
        return jnp.mean(jnp.argmax(h @ params[-1][0].T + params[-1][1], axis=1) == labels)

    x_train, y_train, x_test, y_test = data
    test_labels = jnp.asarray(np.argmax(y_test, axis=1))
    x_test_dev = jnp.asarray(x_test)

    def run(epochs: int):
        params = jax.device_put(dfa_core.init_params(spec, PARAM_SEED))
        feedback = jax.device_put(dfa_core.init_feedback(spec, FEEDBACK_SEED))
        rng, accs = np.random.default_rng(FIT_SEED), []
        for _ in range(epochs):
            order, total = rng.permutation(len(x_train)), 0.0
            for i in range(0, len(x_train), batch):
                idx = order[i : i + batch]
                params, loss = step(params, feedback, x_train[idx], y_train[idx])
                total = total + loss
            accs.append(float(accuracy(params, x_test_dev, test_labels)))
        return accs, float(total)

    return run


def torch_minimal(env, spec, data, lr: float, batch: int):
    """run(epochs) -> test accuracy per epoch: the same DFA + SGD loop in plain torch ops under no_grad."""
    import dfa_core

    torch = env.torch
    F = torch.nn.functional
    dev = env.torch_device()
    x_train, y_train, x_test, y_test = data
    x_test_dev = torch.from_numpy(x_test).to(dev)
    test_labels = torch.from_numpy(np.argmax(y_test, axis=1)).to(dev)

    @torch.no_grad()
    def run(epochs: int):
        params = [
            (torch.from_numpy(w).to(dev), torch.from_numpy(b).to(dev))
            for w, b in dfa_core.init_params(spec, PARAM_SEED)
        ]
        feedback = [torch.from_numpy(b).to(dev) for b in dfa_core.init_feedback(spec, FEEDBACK_SEED)]
        rng, accs = np.random.default_rng(FIT_SEED), []
        for _ in range(epochs):
            order, total = rng.permutation(len(x_train)), 0.0
            for i in range(0, len(x_train), batch):
                idx = order[i : i + batch]
                x_BxI, y_BxO = torch.from_numpy(x_train[idx]).to(dev), torch.from_numpy(y_train[idx]).to(dev)
                hs = [x_BxI]
                for w, b in params[:-1]:
                    hs.append(torch.tanh(hs[-1] @ w.T + b))
                z_BxO = hs[-1] @ params[-1][0].T + params[-1][1]
                total = total + F.binary_cross_entropy_with_logits(z_BxO, y_BxO, reduction="sum")
                e_BxO = torch.sigmoid(z_BxO) - y_BxO
                deltas = [(e_BxO @ fb_HxO.T) * (1 - h * h) for fb_HxO, h in zip(feedback, hs[1:])] + [e_BxO]
                for (w, b), d, h in zip(params, deltas, hs):
                    w -= lr * (d.T @ h)
                    b -= lr * d.sum(0)
            h = x_test_dev
            for w, b in params[:-1]:
                h = torch.tanh(h @ w.T + b)
            accs.append(float((torch.argmax(h @ params[-1][0].T + params[-1][1], 1) == test_labels).float().mean()))
        return accs, float(total)

    return run


# ----------------------------------------------------------------------------- timing


def time_runs(run, epochs: int, repeats: int) -> dict:
    """Warm-up ``run(1)`` (compilation included, reported as warmup_s), then ``repeats`` timed ``run(epochs)``.

    ``run`` must return only after the device has finished (a host value read back).
    """
    t0 = time.perf_counter()
    run(1)
    warmup_s = time.perf_counter() - t0
    walls, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run(epochs)
        walls.append(time.perf_counter() - t0)
    per_epoch = [w / epochs for w in walls]
    return {
        "warmup_s": warmup_s,
        "repeats": repeats,
        "wall_s": {"median": statistics.median(walls), "min": min(walls), "max": max(walls)},
        "sec_per_epoch": {"median": statistics.median(per_epoch), "min": min(per_epoch), "max": max(per_epoch)},
    }, out


def rates(work: dict, wall: float, samples: int, peak: float) -> dict:
    """Throughput fields of a case that did ``work`` FLOPs on ``samples`` training rows in ``wall`` s."""
    gflop_s = work["total"] / wall / 1e9
    return {
        "flop": work,
        "gflop": work["total"] / 1e9,
        "gflop_per_s": gflop_s,
        "samples_per_s": samples / wall,
        "peak_gflop_per_s": peak,
        "frac_peak": gflop_s / peak if peak else None,
    }


def measure_fit(env, backend, spec, data, mode, engine, peak) -> dict:
    """One fit case: warm-up fit of 1 epoch, then ``repeats`` fits of ``epochs``."""
    from dfa_train import fit

    x_train, y_train = data[:2]
    hist = []

    def run(epochs):
        with backend_scope(env, backend):
            hist.append(fit(backend, spec, x_train, y_train, **fit_kwargs(data, epochs, engine)))

    timing, _ = time_runs(run, mode["epochs"], mode["repeats"])
    h = hist[-1]
    n_train, n_test = len(x_train), len(data[2])
    work = epoch_flops(spec.layer_sizes, n_train, n_test, BATCH, eval_train=True)
    work = {k: v * mode["epochs"] for k, v in work.items()}
    wall = timing["wall_s"]["median"]
    return {
        **timing,
        **rates(work, wall, n_train * mode["epochs"], peak),
        "fit_time_s_median": statistics.median(h.time_s),
        "test_accuracy": list(h.test_accuracy),
        "final_loss": h.loss[-1],
        "loss_finite": bool(np.isfinite(h.loss[-1])),
    }


def measure_minimal(env, backend, spec, data, mode, peak) -> dict:
    build = jax_minimal if backend == "jax" else (lambda *a: torch_minimal(env, *a))
    run = build(spec, data, LEARNING_RATE, BATCH)
    timing, (accs, last_loss) = time_runs(run, mode["epochs"], mode["repeats"])
    n_train, n_test = len(data[0]), len(data[2])
    work = epoch_flops(spec.layer_sizes, n_train, n_test, BATCH, eval_train=False)
    work = {k: v * mode["epochs"] for k, v in work.items()}
    return {
        **timing,
        **rates(work, timing["wall_s"]["median"], n_train * mode["epochs"], peak),
        "test_accuracy": accs,
        "last_epoch_loss": last_loss,
        "loss_finite": bool(np.isfinite(last_loss)),
    }


def member_overrides(members: int):
    """Member i: its own batch order, initial params and feedback draw."""
    return [{"seed": i, "param_seed": i, "feedback_seed": 1000 + i} for i in range(members)]


def measure_many(env, backend, spec, data, mode, fit_many, peak):
    """(fit_many record fields, fit_sequential record fields): M members in one call vs M fit calls.

    fit_many is warmed up with a 1-epoch call; the sequential fits reuse fit's compiled
    programs (the fit cases ran before, same shapes), so neither side pays compilation.
    """
    from dfa_train import fit

    x_train, y_train = data[:2]
    epochs, members = mode["epochs"], member_overrides(mode["members"])
    kw = fit_kwargs(data, epochs, None)
    for key in ("seed", "param_seed", "feedback_seed"):
        kw.pop(key)
    work = epoch_flops(spec.layer_sizes, len(x_train), len(data[2]), BATCH, eval_train=True)
    work = {k: v * epochs * len(members) for k, v in work.items()}
    samples = len(x_train) * epochs * len(members)
    with backend_scope(env, backend):
        t0 = time.perf_counter()
        fit_many(backend, spec, x_train, y_train, members=members, **{**kw, "epochs": 1})
        warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        many = fit_many(backend, spec, x_train, y_train, members=members, **kw)
        many_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        seq = [fit(backend, spec, x_train, y_train, **kw, **m) for m in members]
        seq_wall = time.perf_counter() - t0
    acc = lambda hs: [h.test_accuracy[-1] for h in hs]
    many_rec = {
        "warmup_s": warmup_s,
        "wall_s": {"median": many_wall, "min": many_wall, "max": many_wall},
        "sec_per_epoch": _single(many_wall / epochs),
        **rates(work, many_wall, samples, peak),
        "test_accuracy_last": acc(many),
        "throughput_vs_sequential": seq_wall / many_wall,
    }
    seq_rec = {
        "wall_s": {"median": seq_wall, "min": seq_wall, "max": seq_wall},
        "sec_per_epoch": _single(seq_wall / epochs),
        **rates(work, seq_wall, samples, peak),
        "test_accuracy_last": acc(seq),
    }
    return many_rec, seq_rec


def _single(x: float) -> dict:
    return {"median": x, "min": x, "max": x}


# ----------------------------------------------------------------------------- report


def fmt_s(s: float) -> str:
    return f"{s:.3g}"


def markdown_table(records) -> str:
    rows = [
        (
            "| setup | backend | case | epochs | s/epoch median [min, max] | samples/s | GFLOP | GFLOP/s | % peak "
            "| warm-up s | test acc (last) | vs |"
        ),
        "| --- | --- | --- | --: | --- | --: | --: | --: | --: | --: | --: | --- |",
    ]
    for r in records:
        if r["kind"] not in ("fit", "minimal", "fit_many", "fit_sequential"):
            continue
        head = f"| {r['setup']} | {r['backend']} | {case_name(r)} | {r['epochs']} "
        if r["status"] != "ok":
            rows.append(head + f"| {r['status']}: {r['reason']} | | | | | | | |")
            continue
        t = r["sec_per_epoch"]
        acc = r.get("test_accuracy", r.get("test_accuracy_last"))
        acc = acc[-1] if isinstance(acc, list) and r["kind"] in ("fit", "minimal") else acc
        acc = f"{statistics.mean(acc):.4f} (mean)" if isinstance(acc, list) else f"{acc:.4f}"
        vs = r.get("vs_minimal") or r.get("throughput_vs_sequential")
        vs = (f"{vs:.2f}x minimal's time" if "vs_minimal" in r else f"{vs:.2f}x sequential throughput") if vs else ""
        warm = f"{r['warmup_s']:.2f}" if r.get("warmup_s") is not None else "-"
        rows.append(
            head + f"| {fmt_s(t['median'])} [{fmt_s(t['min'])}, {fmt_s(t['max'])}] | {r['samples_per_s']:,.0f} "
            f"| {r['gflop']:.1f} | {r['gflop_per_s']:.1f} | {100 * (r['frac_peak'] or 0):.0f}% "
            f"| {warm} | {acc} | {vs} |"
        )
    return "\n".join(rows)


def case_name(r) -> str:
    if r["kind"] == "fit":
        return f"fit engine={r['engine']}" if r["engine"] else "fit (default)"
    if r["kind"] in ("fit_many", "fit_sequential"):
        return f"{r['kind']} x{r['members']}"
    return "minimal loop"


def target_checks(records, device: str) -> list:
    """The issue's four targets per setup, each as 'value (target; value/target) PASS|FAIL'."""
    ok = [r for r in records if r["status"] == "ok" and "setup" in r]
    lines = []
    default_fit = lambda r: r["kind"] == "fit" and r["engine"] in (None, "epoch")
    for setup in dict.fromkeys(r["setup"] for r in records if "setup" in r):
        for r in ok:
            if r["setup"] == setup and r["backend"] == "jax" and default_fit(r):
                f = r["frac_peak"] or 0.0
                lines.append(
                    f"{setup}: JAX {case_name(r)} {100 * f:.0f}% of peak "
                    f"(target >= 55%; {f / 0.55:.2f}x the target): {'PASS' if f >= 0.55 else 'FAIL'}"
                )
        for backend, limit in (("jax", 0.5), ("torch", 0.8)):
            for r in ok:
                if r["setup"] == setup and r["backend"] == backend and r["kind"] == "fit" and "vs_minimal" in r:
                    q = r["vs_minimal"]
                    lines.append(
                        f"{setup}: {backend} {case_name(r)} time / minimal loop's = {q:.2f} "
                        f"(target <= {limit}; {q / limit:.2f}x the limit): {'PASS' if q <= limit else 'FAIL'}"
                    )
        need = 6.0 if device == "cuda" else 2.0
        for r in records:
            if r.get("setup") == setup and r["kind"] == "fit_many":
                if r["status"] != "ok":
                    lines.append(f"{setup}: {r['backend']} fit_many: {r['reason']}")
                    continue
                q = r["throughput_vs_sequential"]
                lines.append(
                    f"{setup}: {r['backend']} fit_many x{r['members']} throughput / sequential = {q:.2f}x "
                    f"(target >= {need:g}x; {q / need:.2f}x the target): {'PASS' if q >= need else 'FAIL'}"
                )
    return lines


def add_ratios(records):
    """vs_minimal on fit records: fit's wall time over the minimal loop's, same setup and backend."""
    minimal = {(r["setup"], r["backend"]): r for r in records if r["kind"] == "minimal" and r["status"] == "ok"}
    for r in records:
        m = minimal.get((r.get("setup"), r.get("backend")))
        if r["kind"] == "fit" and r["status"] == "ok" and m is not None:
            r["vs_minimal"] = r["wall_s"]["median"] / m["wall_s"]["median"]


def report_text(records, header: list, device: str) -> str:
    peaks = [r for r in records if r["kind"] == "peak_matmul" and r["status"] == "ok"]
    lines = list(header)
    lines += [
        f"    peak {r['framework']:5s} n={r['n']:5d}: {r['gflop_per_s_best']:.1f} GFLOP/s (best), "
        f"{r['gflop_per_s_median']:.1f} (median)"
        for r in peaks
    ]
    lines += ["", markdown_table(records), "", "Issue 8 targets:"]
    lines += ["  " + line for line in target_checks(records, device)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="MNIST subset (6,000 / 2,000), 2 epochs (aimed at < 3 min on 2 CPU cores)"
    )
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # every path in seconds; numbers meaningless
    p.add_argument("--epochs", type=int, default=None, help="timed epochs per run (default: 5 full, 2 quick)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list from {','.join(BACKENDS)}")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma list from {','.join(SETUPS)}")
    p.add_argument("--members", type=int, default=None, help=f"fit_many members (default {MEMBERS})")
    p.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads(N); N=1 also makes XLA single-threaded"
    )
    p.add_argument("--tf32", action="store_true", help="allow TF32 float32 matmuls on GPU (default: full float32)")
    p.add_argument("--no-many", action="store_true", help="skip fit_many and the 8 sequential fits")
    p.add_argument(
        "--out",
        default=None,
        help="JSONL path (default: benchmarks/results/<host>-<device>-fit.jsonl); "
        "the Markdown report goes beside it as .md",
    )
    p.add_argument(
        "--report", default=None, metavar="JSONL", help="print the table and target checks of a results file"
    )
    args = p.parse_args(argv)

    def split(s, choices):
        items = [t.strip() for t in s.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            p.error(f"unknown {bad or s!r}; choose from {list(choices)}")
        return items

    args.backends, args.setups = split(args.backends, BACKENDS), split(args.setups, SETUPS)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.dtype = "float32"  # what bench_train_step's Env and peak_matmul read
    for name in ("epochs", "members"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    return args


def run_case(emit, case: dict, measure):
    """Runs ``measure()`` and emits an ok record, or a skipped one naming the exception; returns the record."""
    try:
        fields = measure()
    except Exception as e:  # noqa: BLE001  (report any failure, e.g. a missing keyword, and go on)
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        print(f"skip {case['setup']} {case['backend']} {case_name(case)}: {reason}", flush=True)
        return emit({**case, "status": "skipped", "reason": reason})
    rec = emit({**case, "status": "ok", **fields})
    print(
        f"{case['setup']:15s} {case['backend']:5s} {case_name(case):22s}: "
        f"{fmt_s(rec['sec_per_epoch']['median'])} s/epoch, "
        f"{rec['samples_per_s']:,.0f} samples/s, {rec['gflop_per_s']:.1f} GFLOP/s "
        f"({100 * (rec['frac_peak'] or 0):.0f}% peak)"
        + (f", warm-up {rec['warmup_s']:.2f} s" if rec.get("warmup_s") is not None else ""),
        flush=True,
    )
    return rec


def run_setup(env, emit, args, mode, setup, data, peak):
    """Every case of one setup on every requested backend."""
    import dfa_core

    spec = dfa_core.MLPSpec(SETUPS[setup], dtype="float32", **SPEC_KW)
    engines = fit_engines()
    fit_many, many_error = load_fit_many()
    for backend in args.backends:
        base = {"setup": setup, "layer_sizes": list(spec.layer_sizes), "backend": backend, "epochs": mode["epochs"]}
        error = env.jax_error if backend == "jax" else env.torch_error
        cases = [{**base, "kind": "fit", "engine": e} for e in engines] + [{**base, "kind": "minimal"}]
        for case in cases:
            if error:
                emit({**case, "status": "skipped", "reason": error})
            elif case["kind"] == "fit":
                run_case(emit, case, lambda b=backend, e=case["engine"]: measure_fit(env, b, spec, data, mode, e, peak))
            else:
                run_case(emit, case, lambda b=backend: measure_minimal(env, b, spec, data, mode, peak))
        if args.no_many:
            continue
        many_case = {**base, "kind": "fit_many", "members": mode["members"]}
        seq_case = {**base, "kind": "fit_sequential", "members": mode["members"]}
        reason = error or many_error
        if reason:
            emit({**many_case, "status": "not available" if many_error and not error else "skipped", "reason": reason})
            print(f"{setup} {backend} fit_many: {reason}", flush=True)
            continue
        got = {}

        def measure(which, got=got, backend=backend):
            if not got:
                got["many"], got["seq"] = measure_many(env, backend, spec, data, mode, fit_many, peak)
            return got[which]

        if run_case(emit, many_case, lambda: measure("many"))["status"] == "ok":
            run_case(emit, seq_case, lambda: measure("seq"))


def measure_peak(env, emit, args, mode) -> float:
    """Best float32 n x n matmul GFLOP/s of torch or JAX (bench_train_step.peak_matmul)."""
    sizes = mode["peak_sizes_cuda"] if args.device == "cuda" else mode["peak_sizes_cpu"]
    peak = 0.0
    for rec in bts.peak_matmul(env, sizes, mode["peak_repeats"], mode["peak_target_s"]):
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
    print(f"peak = {peak:.1f} GFLOP/s (best of torch and JAX, float32)", flush=True)
    return peak


def main(argv=None):
    args = parse_args(argv)
    if args.report is not None:
        with open(args.report) as f:
            records = [json.loads(line) for line in f if line.strip()]
        print(report_text(records, [], records[0]["device"] if records else args.device))
        return
    bts.configure_env(args)
    t_start = time.perf_counter()
    mode = dict(MODES[args.mode])
    mode["epochs"] = args.epochs or mode["epochs"]
    mode["members"] = args.members or mode["members"]
    # Both frameworks are imported whatever --backends says, so the peak is always the best of the two.
    env = bts.Env(args, need_torch=True, need_jax=True)
    info = bts.machine_info(args, env.torch, env.jax)
    out_path = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"{info['host']}-{args.device}-fit.jsonl"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    data, source = load_data(mode["n_train"], mode["n_test"])
    many_error = load_fit_many()[1]
    many_status = "not available: " + (many_error or "") if many_error else "available"
    header = [
        (
            f"# bench_fit on {info['host']} ({info['device_name']}), device={args.device}, float32, {args.mode} mode: "
            f"{mode['epochs']} timed epochs, {mode['repeats']} repeat(s), "
            f"N_train={len(data[0])}, N_test={len(data[2])}, "
            f"batch {BATCH}, SGD lr {LEARNING_RATE}, data {source['data_source']}"
        ),
        f"# command: python {' '.join(sys.argv)}" if argv is None else f"# argv: {argv}",
        f"# versions: {json.dumps(info['versions'])}",
        (
            f"# threads: {json.dumps(info['threads'])}, os.cpu_count()={info['os_cpu_count']}, "
            f"affinity={info['affinity_cpus']}, loadavg={os.getloadavg()}"
        ),
        f"# fit engines: {fit_engines()}; fit_many: {many_status}",
        *("# " + line for line in FLOP_FORMULA.splitlines()),
    ]
    print("\n".join(header), flush=True)
    base = {
        "bench": "bench_fit",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **info,
        "dtype": "float32",
        "mode": args.mode,
        **source,
        "n_train": len(data[0]),
        "n_test": len(data[2]),
        "batch": BATCH,
        "optimizer": f"sgd(lr={LEARNING_RATE})",
        "method": "dfa",
        "group_mode": "sample",
        **SPEC_KW,
    }
    records = []

    def emit(rec):
        rec = {**base, **rec, "loadavg_1m": os.getloadavg()[0]}
        records.append(rec)
        return rec

    peak = measure_peak(env, emit, args, mode)
    for setup in args.setups:
        run_setup(env, emit, args, mode, setup, data, peak)
    add_ratios(records)
    with open(out_path, "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in records)
    footer = (
        f"\nwrote {len(records)} records to {out_path}; wall {time.perf_counter() - t_start:.1f} s, "
        f"loadavg {os.getloadavg()}"
    )
    text = report_text(records, header, args.device) + "\n" + footer
    with open(os.path.splitext(out_path)[0] + ".md", "w") as f:
        f.write(text + "\n")
    print()
    print(text[len("\n".join(header)) + 1 :])


if __name__ == "__main__":
    main()
