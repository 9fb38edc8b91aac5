"""Layer-parallel DFA (dfa_jax.layer_parallel, dfa_torch.layer_parallel) equals one device; bad setups refused.

Each case trains a float64 net for a few steps with its blocks cut into stages and compares
the gathered params, optimizer state and losses with the one-device ``train_step(spec, opt,
'dfa', mode)`` on the same global batches. JAX fixes its device count when it starts, so its
cases run in ONE subprocess (this file run as a script, with
XLA_FLAGS=--xla_force_host_platform_device_count=4 set before JAX starts) that prints a JSON
summary; torch's run in 2 gloo processes (``dist_helpers.run_ranks``), one spawn for all cases.
"""

from __future__ import annotations

import functools
import json
import time

import numpy as np
import pytest
from dist_helpers import run_on_simulated_devices, run_ranks

from dfa_core import MLPSpec, OptimizerSpec, init_feedback, init_params

DEVICES = 4
RTOL = 1e-10  # float64: only the order of the micro-batch and group sums differs from one device
ATOL = 1e-13
STEPS, BATCH = 3, 12
SUBPROCESS_TIMEOUT_S = 180

OPTIMIZERS = {"sgd": OptimizerSpec("sgd", 0.1), "adam": OptimizerSpec("adam", 1e-2)}


def _specs():
    from dfa_core import Conv2d, Dense, Flatten, MaxPool2d, ModelSpec

    return {
        "mlp": MLPSpec((6, 8, 7, 5, 3), activation="tanh", output="sigmoid", dtype="float64"),
        "mlpmean": MLPSpec((6, 8, 7, 5, 3), activation="relu", output="softmax", reduction="mean", dtype="float64"),
        "conv": ModelSpec(
            (1, 6, 6),
            (Conv2d(2, 3, padding=1), MaxPool2d(2), Conv2d(3, 2), Flatten(), Dense(5), Dense(3)),
            activation="tanh",
            output="sigmoid",
            dtype="float64",
        ),
        # Two blocks: two stages meet at a MaxPool2d + Flatten prefix, which stage 0 applies before sending.
        "pool": ModelSpec(
            (1, 6, 6), (Conv2d(2, 3, padding=1), MaxPool2d(2), Flatten(), Dense(3)), output="softmax", dtype="float64"
        ),
    }


# name: spec-optimizer-mode-stages-microbatches. Every mode, both optimizers, both reductions,
# one and several micro-batches, 2, 3 and 4 stages (4 blocks each), the conv net twice (its 4
# stages meet at a MaxPool2d and at a Flatten prefix).
JAX_CASES = (
    "mlp-sgd-sample-2-1",
    "mlpmean-adam-sample-3-3",
    "mlp-adam-batch_mean-4-2",
    "mlpmean-sgd-class_mean-2-3",
    "conv-adam-sample-4-2",
    "conv-sgd-class_mean-3-2",
)
TORCH_CASES = (
    "mlp-sgd-sample-2-1",
    "mlp-adam-sample-2-3",
    "mlp-sgd-batch_mean-2-2",
    "mlp-adam-class_mean-2-3",
    "mlpmean-adam-sample-2-4",
    "mlpmean-sgd-batch_mean-2-1",
    "mlpmean-adam-class_mean-2-2",
    "conv-adam-sample-2-2",
    "conv-sgd-batch_mean-2-3",
    "conv-adam-class_mean-2-1",
    "pool-adam-sample-2-3",
    "pool-sgd-class_mean-2-1",
)


def _parse(case):
    spec, opt, mode, stages, microbatches = case.split("-")
    return _specs()[spec], OPTIMIZERS[opt], mode, int(stages), int(microbatches)


def _batches(spec):
    rng = np.random.default_rng(3)
    shape = (spec.n_in,) if isinstance(spec, MLPSpec) else spec.input_shape
    x = rng.normal(size=(STEPS, BATCH, *shape))
    y = np.eye(spec.n_out)[rng.integers(0, spec.n_out, size=(STEPS, BATCH))]
    return x, y


def _leaves(tree):
    if isinstance(tree, (tuple, list)):
        return [leaf for t in tree for leaf in _leaves(t)]
    return [tree]


def _numpy(tree):
    return [np.asarray(leaf.detach() if hasattr(leaf, "detach") else leaf, dtype=np.float64) for leaf in _leaves(tree)]


def _max_rel(a, b):
    """max |a - b| / (|b| + ATOL / RTOL) over the leaves: <= RTOL means allclose(a, b, RTOL, ATOL)."""
    la, lb = _numpy(a), _numpy(b)
    assert len(la) == len(lb) and all(u.shape == v.shape for u, v in zip(la, lb))
    return max((float(np.max(np.abs(u - v) / (np.abs(v) + ATOL / RTOL))) for u, v in zip(la, lb) if u.size), default=0)


def _one_device(be, spec, opt, mode, x, y):
    """STEPS one-device train_steps from the seeded start: (params, opt_state, losses), and the start."""
    params = be.asarray(init_params(spec, 0))
    feedback = be.asarray(init_feedback(spec, 1))
    state = be.make_optimizer(opt, spec.dtype).init(params)
    step = be.train_step(spec, opt, "dfa", mode)
    p, s, losses = params, state, []
    for t in range(STEPS):
        p, s, loss = step(p, feedback, s, be.asarray(x[t]), be.asarray(y[t]))
        losses.append(float(loss))
    return (p, s, losses), (params, feedback, state)


def _compare(lp, start, want, x, y):
    staged = lp.place(*start)
    placed = staged
    losses = []
    for t in range(STEPS):
        staged, loss = lp.step(staged, x[t], y[t])
        losses.append(float(loss))
    params, state = lp.gather(staged)
    trained = _max_rel(want[0], start[0]) > 1e3 * RTOL  # the reference moved, so equality means something
    return (
        placed,
        staged,
        {
            "params": _max_rel(params, want[0]),
            "state": _max_rel(state, want[1]),
            "losses": _max_rel(losses, want[2]),
            "trained": bool(trained),
        },
    )


# ---------------------------------------------------------------------------------------------
# JAX: the subprocess with 4 simulated devices.
# ---------------------------------------------------------------------------------------------


def _jax_case(case):
    import jax

    import dfa_jax
    from dfa_jax.layer_parallel import layer_parallel

    t0 = time.perf_counter()
    spec, opt, mode, stages, microbatches = _parse(case)
    x, y = _batches(spec)
    want, start = _one_device(dfa_jax, spec, opt, mode, x, y)
    # Two stages go on an explicit device list, last device first; more take the first N devices.
    devices = [jax.devices()[-1], jax.devices()[1]] if stages == 2 else stages
    lp = layer_parallel(spec, opt, devices, microbatches, mode)
    placed, staged, out = _compare(lp, start, want, x, y)
    # Where each stage's arrays live: its params, B_l and optimizer state, before and after the steps.
    out["devices"] = [
        sorted({str(d) for leaf in _jax_leaves(stage) for d in leaf.devices()}) for stage in (*placed, *staged)
    ]
    out["plan_devices"] = [str(d) for d in lp.devices] * 2
    out["expected_devices"] = [str(d) for d in (devices if stages == 2 else jax.devices()[:stages])] * 2
    out["seconds"] = time.perf_counter() - t0
    return out


def _jax_leaves(tree):
    import jax

    return [leaf for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "devices")]


def _jax_errors():
    """Messages of the setups refused only where several devices exist."""
    from dfa_jax.layer_parallel import layer_parallel

    errors = {}
    two_blocks = MLPSpec((4, 5, 3), dtype="float64")
    try:
        layer_parallel(two_blocks, OPTIMIZERS["sgd"], 3)
    except ValueError as err:
        errors["stages"] = str(err)
    return errors


def run_cases():
    """Every JAX case on simulated devices; {case: {quantity: max relative diff, ...}, ...}."""
    import jax

    t0 = time.perf_counter()
    summary = {"devices": len(jax.devices()), "cases": {case: _jax_case(case) for case in JAX_CASES}}
    summary["errors"] = _jax_errors()
    summary["seconds"] = time.perf_counter() - t0
    return summary


@functools.lru_cache(maxsize=None)
def _jax_summary():
    return run_on_simulated_devices(__file__, DEVICES, timeout=SUBPROCESS_TIMEOUT_S)


@pytest.mark.parametrize("case", JAX_CASES)
def test_jax_stages_on_simulated_devices_train_as_one_device(case):
    """Gathered params, optimizer state and per-step losses equal the one-device train_step's."""
    summary = _jax_summary()
    assert summary["devices"] == DEVICES
    got = summary["cases"][case]
    assert got["trained"]
    for quantity in ("params", "state", "losses"):
        assert got[quantity] <= RTOL, (case, quantity, got[quantity])


@pytest.mark.parametrize("case", JAX_CASES)
def test_jax_each_stage_lives_on_its_own_device(case):
    """Every array of stage s (params, B_l, optimizer state) sits on devices[s], before and after steps."""
    got = _jax_summary()["cases"][case]
    assert got["devices"] == [[d] for d in got["plan_devices"]]
    assert got["plan_devices"] == got["expected_devices"]
    stages = int(case.split("-")[3])
    assert len(set(got["plan_devices"])) == stages


def test_jax_more_stages_than_blocks_is_refused():
    assert "2 block(s) cannot fill 3 stages" in _jax_summary()["errors"]["stages"]


# ---------------------------------------------------------------------------------------------
# torch: 2 gloo processes, one stage each.
# ---------------------------------------------------------------------------------------------


def _torch_case(case, rank):
    import dfa_torch
    from dfa_torch.layer_parallel import Stage, layer_parallel

    spec, opt, mode, stages, microbatches = _parse(case)
    x, y = _batches(spec)
    want, start = _one_device(dfa_torch, spec, opt, mode, x, y)
    lp = layer_parallel(spec, opt, stages, microbatches, mode)
    _, staged, out = _compare(lp, start, want, x, y)
    # Each rank keeps its own stage only.
    own = staged[rank]
    out["kept_only_own_stage"] = (
        isinstance(own, Stage)
        and all(s is None for r, s in enumerate(staged) if r != rank)
        and len(own.params) == len(lp.plan[rank])
    )
    return out


def _torch_errors(rank, world):
    from dfa_torch.layer_parallel import layer_parallel

    spec, opt = _specs()["mlp"], OPTIMIZERS["sgd"]
    errors = {}
    for name, call in {
        "world": lambda: layer_parallel(spec, opt, world + 1),
        "method": lambda: layer_parallel(spec, opt, method="bp"),
    }.items():
        try:
            call()
        except ValueError as err:
            errors[name] = str(err)
    lp = layer_parallel(spec, opt, microbatches=5)
    x, y = _batches(spec)
    import dfa_torch

    start = (dfa_torch.asarray(init_params(spec, 0)), dfa_torch.asarray(init_feedback(spec, 1)))
    staged = lp.place(*start, dfa_torch.make_optimizer(opt, spec.dtype).init(start[0]))
    try:  # raised on every rank before any message is sent
        lp.step(staged, x[0], y[0])
    except ValueError as err:
        errors["microbatches"] = str(err)
    return errors


def _torch_all(rank, world):
    out = {case: _torch_case(case, rank) for case in TORCH_CASES}
    out["errors"] = _torch_errors(rank, world)
    return out


@pytest.fixture(scope="module")
def torch_ranks():
    return run_ranks(_torch_all, 2)


@pytest.mark.parametrize("case", TORCH_CASES)
def test_torch_two_processes_train_as_one(torch_ranks, case):
    """On both ranks: gathered params and optimizer state and the losses equal one process's train_step."""
    for rank in (0, 1):
        got = torch_ranks[rank][case]
        assert got["trained"] and got["kept_only_own_stage"]
        for quantity in ("params", "state", "losses"):
            assert got[quantity] <= RTOL, (case, rank, quantity, got[quantity])


def test_torch_bad_setups_are_refused(torch_ranks):
    for rank in (0, 1):
        errors = torch_ranks[rank]["errors"]
        assert "devices=3, but the process group has 2 process(es)" in errors["world"]
        assert "'dfa' only" in errors["method"] and "backward chain" in errors["method"]
        assert "batch of 12 samples is not divisible by microbatches=5" in errors["microbatches"]


def test_torch_without_a_process_group_says_how_to_start_one():
    from dfa_torch.layer_parallel import layer_parallel

    with pytest.raises(RuntimeError, match="init_process_group"):
        layer_parallel(_specs()["mlp"], OPTIMIZERS["sgd"])


# ---------------------------------------------------------------------------------------------
# In this process: refusals on one JAX device, and the bytes per step.
# ---------------------------------------------------------------------------------------------


def test_jax_bad_setups_are_refused():
    import jax

    import dfa_jax
    from dfa_jax.layer_parallel import layer_parallel

    spec, opt = _specs()["mlp"], OPTIMIZERS["sgd"]
    with pytest.raises(ValueError, match="'dfa' only.*backward chain"):
        layer_parallel(spec, opt, 1, method="bp")
    with pytest.raises(ValueError, match="JAX device"):
        layer_parallel(spec, opt, len(jax.devices()) + 1)
    with pytest.raises(ValueError, match="microbatches"):
        layer_parallel(spec, opt, 1, microbatches=0)
    lp = layer_parallel(spec, opt, 1, microbatches=5)
    params = dfa_jax.asarray(init_params(spec, 0))
    staged = lp.place(
        params, dfa_jax.asarray(init_feedback(spec, 1)), dfa_jax.make_optimizer(opt, spec.dtype).init(params)
    )
    x, y = _batches(spec)
    with pytest.raises(ValueError, match="batch of 12 samples is not divisible by microbatches=5"):
        lp.step(staged, x[0], y[0])
    adam_state = dfa_jax.make_optimizer(OPTIMIZERS["adam"], spec.dtype).init(params)
    with pytest.raises(ValueError, match="opt_state must be make_optimizer"):
        lp.place(params, dfa_jax.asarray(init_feedback(spec, 1)), adam_state)


@pytest.mark.parametrize(
    "stages, mode, want",
    [
        # mlp (6, 8, 7, 5, 3), float64, batch 12: 2 stages cut before block 3 (h of width 7), 3 stages
        # also before block 4 (width 5); e is 12 x 3 per receiving stage, e' 1 x 3 or 3 x 3.
        (2, "sample", (12 * 7 * 8, 1 * 12 * 3 * 8)),
        (3, "sample", (12 * (7 + 5) * 8, 2 * 12 * 3 * 8)),
        (2, "batch_mean", (12 * 7 * 8, 1 * 1 * 3 * 8)),
        (4, "class_mean", (12 * (8 + 7 + 5) * 8, 3 * 3 * 3 * 8)),
        (4, "conv", (12 * (2 * 3 * 3 + 12 + 5) * 8, 3 * 12 * 3 * 8)),
    ],
)
def test_layer_parallel_bytes_counts_activations_and_error(stages, mode, want):
    from dfa_core.parallel import layer_parallel_bytes

    spec = _specs()["mlp"]
    if mode == "conv":  # u crosses a boundary: after the pool (2 x 3 x 3, not h's 2 x 6 x 6) and the flatten
        spec, mode = _specs()["conv"], "sample"
    got = layer_parallel_bytes(spec, BATCH, stages, mode)
    assert tuple(got) == want and got.total == sum(want)


if __name__ == "__main__":
    print(json.dumps(run_cases()))
