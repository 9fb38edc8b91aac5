"""Data-parallel JAX training (dfa_jax.parallel): 4 simulated devices equal one device; bad setups refused.

JAX fixes its device count when it starts, and this test process has started it with one
CPU device, so the multi-device cases run in ONE subprocess (this file run as a script,
with XLA_FLAGS=--xla_force_host_platform_device_count=4 set before JAX starts). It loops
over every case, compares the 4-device params with the one-device train_epoch / train_step
of the same process and prints one JSON summary, which the tests below assert on.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import time

import numpy as np
import pytest
from dist_helpers import run_on_simulated_devices

DEVICES = 4
RTOL = 1e-10  # float64: only the order of the all-reduced sums differs from one device
ATOL = 1e-13
SUBPROCESS_TIMEOUT_S = 180
# LLVM's cheap pipeline, as compiling ~60 small programs is what the cases cost (the SPMD partitioner
# is an HLO pass and runs all the same). With 2 cases at a time (2 programs of 4 devices in flight,
# DataParallel.settle), run_on_simulated_devices' PJRT_NPROC keeps the pools from starving a device.
XLA_FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
    "--xla_cpu_collective_call_terminate_timeout_seconds=30"
)


# ---------------------------------------------------------------------------------------------
# The subprocess: every case on 4 simulated devices against 1 device.
# ---------------------------------------------------------------------------------------------

# MLP: 22 samples in batches of 8, two full batches (sharded 2 rows a device) and a ragged one of
# 6 rows, which the 4 devices do not divide (it runs replicated). The conv net: 16 samples, two
# full batches (a ragged batch doubles the program, and compiling is what these cases cost).
N_SAMPLES = {"mlp": 22, "conv": 16}
BATCH, EPOCHS = 8, 2
METHOD_MODES = (
    ("dfa", "sample"),
    ("dfa", "batch_mean"),
    ("dfa", "class_mean"),
    ("drtp", "sample"),
    ("drtp", "batch_mean"),
    ("drtp", "class_mean"),
    ("bp", "sample"),
    ("fa", "sample"),
    ("usf", "sample"),
    ("brsf", "sample"),
    ("frsf", "sample"),
    ("kp", "sample"),
    ("shallow", "sample"),
)
# The conv net checks the block VJPs under sharding; the rules' hidden signals are the same code for
# Dense and conv blocks (the MLP covers every rule), so it runs DFA's modes, BP and two chain rules.
CONV_METHOD_MODES = (
    ("dfa", "sample"),
    ("dfa", "batch_mean"),
    ("dfa", "class_mean"),
    ("bp", "sample"),
    ("fa", "sample"),
    ("kp", "sample"),
)


def _spec(net):
    from dfa_core import Conv2d, Dense, Flatten, MaxPool2d, MLPSpec, ModelSpec

    if net == "mlp":
        return MLPSpec((6, 8, 7, 3), activation="tanh", output="softmax", reduction="mean", dtype="float64")
    layers = (Conv2d(2, 3, padding=1), MaxPool2d(2), Flatten(), Dense(5), Dense(3))
    return ModelSpec((1, 6, 6), layers, activation="tanh", output="sigmoid", reduction="sum", dtype="float64")


def _setup(net, method, opt_name, projection=None):
    """(spec, opt, (params, feedback, opt_state), x, y): float64 JAX arrays on the default device."""
    import dfa_jax
    from dfa_core import OptimizerSpec, init_feedback, init_params

    spec = _spec(net)
    opt = OptimizerSpec("sgd", 0.1) if opt_name == "sgd" else OptimizerSpec("adam", 1e-2)
    params = dfa_jax.asarray(init_params(spec, 0))
    feedback = dfa_jax.asarray(init_feedback(spec, 1, method=method))
    state = dfa_jax.make_optimizer(opt, spec.dtype).init(params)
    state = dfa_jax.init_rule_state(spec, method, state, feedback, seed=5, projection=projection)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(N_SAMPLES[net], *(spec.input_shape if net == "conv" else spec.layer_sizes[:1])))
    y = np.eye(3)[rng.integers(0, 3, N_SAMPLES[net])]
    return spec, opt, (params, feedback, state), dfa_jax.asarray(x), dfa_jax.asarray(y)


def _leaves(tree):
    import jax

    return [np.asarray(leaf, dtype=np.float64) for leaf in jax.tree_util.tree_leaves(tree)]


def _max_rel(a, b):
    """max |a - b| / (|b| + ATOL / RTOL) over the leaves (<= RTOL means allclose(a, b, RTOL, ATOL));
    NaN where both are NaN (angles not measured at a step) counts as equal, elsewhere as infinite."""
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb) and all(u.shape == v.shape for u, v in zip(la, lb))
    worst = 0.0
    for u, v in zip(la, lb):
        both_nan = np.isnan(u) & np.isnan(v)
        rel = np.abs(u - v) / (np.abs(v) + ATOL / RTOL)
        rel = np.where(both_nan, 0.0, np.where(np.isnan(rel), np.inf, rel))
        worst = max(worst, float(rel.max(initial=0.0)))
    return worst


def _run_epochs(spec, opt, method, mode, start, x, y, parallel, **kw):
    """EPOCHS compiled epochs from ``start``; returns (params, opt_state, losses, angles)."""
    from dfa_jax.epoch import train_epoch

    epoch = train_epoch(spec, opt, method, mode, BATCH, parallel=parallel, **kw)
    params, feedback, state = start
    if parallel is not None:  # the run wrapper replicates too; placing once is what fit does
        params, feedback, state, x, y = parallel.replicate((params, feedback, state, x, y))
    losses, angles = [], []
    for e in range(EPOCHS):
        order = np.random.default_rng(10 + e).permutation(len(x))
        params, state, loss, angle = epoch(params, feedback, state, x, y, order, e * 3)
        losses.append(loss)
        angles.append(angle)
    return params, state, losses, angles


def _epoch_case(net, method, mode, opt_name, dp, projection=None, align_every=0):
    spec, opt, start, x, y = _setup(net, method, opt_name, projection)
    kw = {"projection": projection, "align_every": align_every}
    one = _run_epochs(spec, opt, method, mode, start, x, y, None, **kw)
    many = _run_epochs(spec, opt, method, mode, start, x, y, dp, **kw)
    out = {"params": _max_rel(many[0], one[0]), "state": _max_rel(many[1], one[1])}
    out["losses"] = _max_rel(many[2], one[2])
    if align_every:
        out["angles"] = _max_rel(many[3], one[3])
        out["angles_measured"] = int(sum(np.isfinite(a).all(axis=(1, 2)).sum() for a in _leaves(one[3])))
    leaves = __import__("jax").tree_util.tree_leaves(many[0])
    out["replicated_out"] = all(
        len(w.sharding.device_set) == dp.size and w.sharding.is_fully_replicated for w in leaves
    )
    return out


def _step_case(net, method, mode, opt_name, dp, rows, with_alignment=False):
    """train_step on two global batches of ``rows`` rows, 4 devices against 1."""
    from dfa_jax.train import train_step

    spec, opt, start, x, y = _setup(net, method, opt_name)
    outs = []
    for parallel in (None, dp):
        step = train_step(spec, opt, method, mode, with_alignment=with_alignment, parallel=parallel)
        (params, feedback, state), rest = start, []
        for t in range(2):
            batch = slice(t * rows, (t + 1) * rows)
            params, state, *more = step(params, feedback, state, x[batch], y[batch])
            rest.append(more)
        outs.append((params, state, rest))
    (p1, s1, r1), (p4, s4, r4) = outs
    return {"params": _max_rel(p4, p1), "state": _max_rel(s4, s1), "losses": _max_rel(r4, r1)}


def _hlo_counts(dp):
    """all-reduces and partitions in the compiled dfa/class_mean epoch on 1 and on 4 devices (the
    compile cache of the case run before makes this nearly free)."""
    import jax.numpy as jnp

    from dfa_jax.arrays import precision_scope
    from dfa_jax.epoch import train_epoch

    spec, opt, (params, feedback, state), x, y = _setup("mlp", "dfa", "adam")
    found = {}
    for name, parallel in (("one", None), ("many", dp)):
        epoch = train_epoch(spec, opt, "dfa", "class_mean", BATCH, parallel=parallel)
        with precision_scope(spec.dtype):
            args = (params, feedback, state, x, y, jnp.arange(len(x), dtype=jnp.int32), jnp.int32(0))
            args = args if parallel is None else parallel.replicate(args)
            text = epoch.jitted.lower(*args).compile().as_text()  # type: ignore[attr-defined]
        found[name] = {"all_reduce": text.count("all-reduce("), "partitions": text.count(f"num_partitions={DEVICES}")}
    return found


def _plugin_device(q_KxO):
    """A deterministic plug-in device: q B_l^T with fixed B_l, for the MLP's hidden widths 8 and 7."""
    rng = np.random.default_rng(7)
    return [q_KxO @ rng.normal(size=(n, q_KxO.shape[1])).T for n in (8, 7)]


def _device_case(dp, device):
    """The plug-in device (a pure_callback) under the partitioned epoch, float64 crossing it exactly."""
    return _epoch_case("mlp", "dfa", "class_mean", "sgd", dp, device)


def _cases(dp):
    """{name: thunk} of every case; thunk() -> {quantity: max relative difference, ...}."""
    from dfa_core.hardware import Projection

    noise = Projection(quantize="kbit:4", noise="additive", sigma=0.05)
    device = Projection(quantize="ternary", device=_plugin_device)
    cases = {}
    for net in ("mlp", "conv"):
        for i, (method, mode) in enumerate(METHOD_MODES):
            if net == "conv" and (method, mode) not in CONV_METHOD_MODES:
                continue  # keeps the MLP's optimizer choice per case
            opt_name = ("sgd", "adam")[i % 2]
            cases[f"epoch-{net}-{method}-{mode}"] = functools.partial(_epoch_case, net, method, mode, opt_name, dp)
    cases["epoch-mlp-dfa-sample-noise-align"] = functools.partial(
        _epoch_case, "mlp", "dfa", "sample", "sgd", dp, noise, align_every=2
    )
    cases["epoch-mlp-brsf-sample-align"] = functools.partial(  # another rule's angles: its own update
        _epoch_case, "mlp", "brsf", "sample", "adam", dp, None, align_every=2
    )
    cases["epoch-mlp-dfa-class_mean-device"] = functools.partial(_device_case, dp, device)
    cases["step-mlp-dfa-class_mean-even"] = functools.partial(_step_case, "mlp", "dfa", "class_mean", "adam", dp, 8)
    cases["step-mlp-kp-sample-ragged"] = functools.partial(_step_case, "mlp", "kp", "sample", "sgd", dp, 6)
    cases["step-mlp-dfa-sample-align"] = functools.partial(_step_case, "mlp", "dfa", "sample", "sgd", dp, 8, True)
    return cases


def run_cases(workers=2):
    """Every case, ``workers`` at a time (compiling releases the GIL); returns the JSON summary."""
    import jax

    from dfa_jax.parallel import data_parallel

    t0 = time.perf_counter()
    dp = data_parallel(DEVICES)
    assert dp is not None
    cases = _cases(dp)
    device_case = cases.pop("epoch-mlp-dfa-class_mean-device")  # alone: it sets a process-wide flag
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(thunk) for name, thunk in cases.items()}
        results = {name: future.result() for name, future in futures.items()}
    results["epoch-mlp-dfa-class_mean-device"] = device_case()
    summary = {"devices": len(jax.devices()), "dp_size": dp.size, "cases": results}
    summary["hlo"] = _hlo_counts(dp)
    summary["seconds"] = time.perf_counter() - t0
    return summary


# ---------------------------------------------------------------------------------------------
# The tests.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _summary():
    return run_on_simulated_devices(__file__, DEVICES, xla_flags=XLA_FAST_COMPILE, timeout=SUBPROCESS_TIMEOUT_S)


def _case_names():
    from dfa_core import METHODS

    names = [f"epoch-mlp-{m}-{mode}" for m, mode in METHOD_MODES]
    names += [f"epoch-conv-{m}-{mode}" for m, mode in CONV_METHOD_MODES]
    assert {m for m, _ in METHOD_MODES} == set(METHODS)
    return names + [
        "epoch-mlp-dfa-sample-noise-align",
        "epoch-mlp-brsf-sample-align",
        "epoch-mlp-dfa-class_mean-device",
        "step-mlp-dfa-class_mean-even",
        "step-mlp-kp-sample-ragged",
        "step-mlp-dfa-sample-align",
    ]


def test_four_simulated_devices_train_every_case_as_one_device():
    """float64 params, optimizer state, losses (and angles) of 4 devices within rtol 1e-10 of one
    device, for every method and mode on an MLP (DFA's modes, BP and two chain rules on a conv net),
    projections, alignment and train_step."""
    summary = _summary()
    assert summary["devices"] == DEVICES and summary["dp_size"] == DEVICES
    assert sorted(summary["cases"]) == sorted(_case_names())
    for name, diffs in summary["cases"].items():
        for quantity in ("params", "state", "losses"):
            assert diffs[quantity] <= RTOL, f"{name}: {quantity} differ by {diffs[quantity]:.3g} (relative)"
        if "angles" in diffs:
            assert diffs["angles"] <= RTOL, f"{name}: angles differ by {diffs['angles']:.3g}"
            assert diffs["angles_measured"] == 3  # align_every=2 over steps 0..5: steps 0, 2 and 4
        if name.startswith("epoch-"):
            assert diffs["replicated_out"], f"{name}: params did not come back replicated over the 4 devices"


def test_the_epoch_program_is_partitioned_over_the_devices():
    """Sharding really happens: the 4-device program is SPMD-partitioned with all-reduces, the
    one-device program has neither."""
    hlo = _summary()["hlo"]
    assert hlo["many"]["all_reduce"] > 0 and hlo["many"]["partitions"] > 0
    assert hlo["one"]["all_reduce"] == 0 and hlo["one"]["partitions"] == 0


def test_data_parallel_none_is_the_one_device_path():
    """devices=None gives None, and parallel=None builds the very step and epoch of before."""
    from dfa_core import MLPSpec, OptimizerSpec
    from dfa_jax.epoch import train_epoch
    from dfa_jax.parallel import data_parallel
    from dfa_jax.train import train_step

    assert data_parallel() is None and data_parallel(None) is None
    spec, opt = MLPSpec((4, 5, 3), dtype="float64"), OptimizerSpec("sgd", 0.1)
    assert train_step(spec, opt, "dfa", "class_mean", parallel=None) is train_step(spec, opt, "dfa", "class_mean")
    assert train_epoch(spec, opt, batch_size=6, parallel=None) is train_epoch(spec, opt, batch_size=6)
    one = data_parallel(1)
    assert train_epoch(spec, opt, batch_size=6, parallel=one) is train_epoch(spec, opt, batch_size=6, parallel=one)
    assert train_epoch(spec, opt, batch_size=6, parallel=one) is not train_epoch(spec, opt, batch_size=6)


def test_one_device_setup_describes_itself():
    import jax

    from dfa_core.parallel import DATA_AXIS
    from dfa_jax.parallel import data_parallel

    dp = data_parallel(1)
    assert dp is not None
    assert (dp.size, dp.rank, dp.is_main) == (1, 0, True)
    assert dp.mesh.axis_names == (DATA_AXIS,)
    assert data_parallel(jax.devices()[:1]) == dp  # frozen and hashable: one compiled program per setup
    placed = dp.replicate((np.ones(3), (np.zeros((2, 2)),)))
    assert placed[0].sharding.is_fully_replicated and placed[1][0].shape == (2, 2)


@pytest.mark.parametrize(
    "devices,error,match",
    [
        (0, ValueError, "devices must be an int >= 1, got 0"),
        (-2, ValueError, ">= 1"),
        (10_000, ValueError, "xla_force_host_platform_device_count=N"),
        (True, TypeError, "devices must be None, an int or a sequence"),
        ("cpu", TypeError, "got str"),
        ([], ValueError, "at least one jax device"),
        (["cpu:0"], TypeError, "jax.Device objects"),
    ],
)
def test_bad_devices_are_refused(devices, error, match):
    from dfa_jax.parallel import data_parallel

    with pytest.raises(error, match=match):
        data_parallel(devices)


def test_repeated_device_is_refused():
    import jax

    from dfa_jax.parallel import data_parallel

    d = jax.devices()[0]
    with pytest.raises(ValueError, match="more than once"):
        data_parallel([d, d])


def test_a_torchrun_launch_is_refused(monkeypatch):
    from dfa_jax.parallel import data_parallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="JAX runs one process over all devices; use devices=N, not torchrun"):
        data_parallel(2)


def test_batch_size_not_divisible_and_foreign_setups_are_refused_before_tracing(monkeypatch):
    from dataclasses import dataclass

    from dfa_core import MLPSpec, OptimizerSpec
    from dfa_jax import parallel as jax_parallel
    from dfa_jax.epoch import train_epoch
    from dfa_jax.train import train_step

    spec, opt = MLPSpec((4, 5, 3), dtype="float64"), OptimizerSpec("sgd", 0.1)
    three = jax_parallel.DataParallel.__new__(jax_parallel.DataParallel)  # size 3 without 3 devices
    monkeypatch.setattr(jax_parallel.DataParallel, "size", property(lambda self: 3))
    with pytest.raises(ValueError, match="batch_size=8 is not divisible by devices=3"):
        train_epoch(spec, opt, "dfa", batch_size=8, parallel=three)

    @dataclass(frozen=True)
    class TorchLike:
        size: int = 2
        rank: int = 0

    for build in (
        lambda p: train_epoch(spec, opt, batch_size=8, parallel=p),
        lambda p: train_step(spec, opt, parallel=p),
    ):
        with pytest.raises(TypeError, match="DataParallel, got .*TorchLike"):
            build(TorchLike())


if __name__ == "__main__":  # the 4-device subprocess of _summary()
    print(json.dumps(run_cases()))
