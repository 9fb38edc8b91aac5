"""torch data parallel (dfa_torch.parallel): 2 gloo processes train as one process does; bad setups are refused.

Every method in dfa_core.METHODS and every mode it accepts, on a tiny MLPSpec (reduction 'mean',
nesterov) and a tiny conv ModelSpec (conv + pool + flatten + dense, reduction 'sum', sgd),
float64: two epochs of ``train_epoch(..., parallel=dp)`` end within rtol 1e-10 of the
single-process ``train_epoch``, on both ranks. The MLP's 9 samples in batches of 4 leave a last
batch of 1, so rank 1 gets no rows of it; the conv model's 11 leave a last batch of 3 (2 + 1),
and it trains with donate=True (updates written in place). The DFA-vs-BP angles
(``align_every``, ``with_alignment``) of dfa in every mode and of bp equal one process's within
rtol 1e-8 on both models.
All cases run in one spawn of 2 processes (a spawn costs seconds, a case milliseconds).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_helpers import run_ranks

from dfa_core import (
    METHODS,
    MODES,
    Conv2d,
    Dense,
    Flatten,
    MaxPool2d,
    MLPSpec,
    ModelSpec,
    OptimizerSpec,
    init_feedback,
    init_params,
)
from dfa_core.backend import RuleState
from dfa_core.hardware import Projection
from dfa_core.parallel import shard_bounds
from dfa_core.validation import DIRECT_RULES
from dfa_torch.epoch import train_epoch
from dfa_torch.optim import make_optimizer
from dfa_torch.parallel import DataParallel, data_parallel
from dfa_torch.rules import init_rule_state
from dfa_torch.train import train_step

ANGLE_RTOL, ANGLE_ATOL = 1e-8, 1e-9  # degrees; atol for the angles that are 0 up to rounding (output layer)
RTOL = 1e-10  # float64: the shards' partial sums round differently from one batch's sums, nothing more
# No adam: it divides by sqrt(v), so a gradient entry that nearly cancels over the batch turns
# rounding-level differences into relative ones far above RTOL (seen: 3e-9 for usf); the optimizer
# is the same code with or without parallel.
SETUPS = {
    # name: (spec, optimizer, samples, batch_size)
    "mlp": (
        MLPSpec((5, 6, 4, 3), activation="tanh", output="softmax", reduction="mean", dtype="float64"),
        OptimizerSpec("momentum", 0.05, nesterov=True),
        9,
        4,
    ),
    "conv": (
        ModelSpec(
            (1, 6, 6),
            (Conv2d(2, 3, padding="same"), MaxPool2d(2), Flatten(), Dense(5), Dense(3)),
            activation="relu",
            output="sigmoid",
            reduction="sum",
            dtype="float64",
        ),
        OptimizerSpec("sgd", 0.05),
        11,
        4,
    ),
}
METHOD_MODES = tuple((m, mode) for m in METHODS for mode in (MODES if m in DIRECT_RULES else ("sample",)))
CASES = tuple(f"{name}-{m}-{mode}" for name in SETUPS for m, mode in METHOD_MODES)
ALIGN_EVERY = 2  # global steps 0, 2, 4 of the two epochs' 6 (step0 = 0, 3): both ragged last batches of epoch 1
ALIGN_CASES = tuple(f"{name}-{m}-{mode}" for name in SETUPS for m, mode in METHOD_MODES if m in ("dfa", "bp")) + (
    "mlp-fa-sample",  # other rules: the angles of their own update (alignment.update_angles)
    "mlp-kp-sample",
    "mlp-brsf-sample",
    "mlp-drtp-class_mean",
    "conv-fa-sample",
)


def _data(name):
    spec, _, n, _ = SETUPS[name]
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, *getattr(spec, "input_shape", (spec.n_in,))))
    y = np.eye(3)[np.arange(n) % 3]  # every class present in most batches
    orders = [rng.permutation(n) for _ in range(2)]
    return torch.as_tensor(x), torch.as_tensor(y), orders


def _start(name, method):
    spec, opt, _, _ = SETUPS[name]
    params = tuple(tuple(torch.as_tensor(t) for t in block) for block in init_params(spec, 0))
    feedback = tuple(torch.as_tensor(b) for b in init_feedback(spec, 1, method=method))
    state = init_rule_state(spec, method, make_optimizer(opt, spec.dtype).init(params), feedback, seed=3)
    return params, feedback, state


def _result(params, state, losses):
    """(params, KP's trained B or (), losses) as NumPy."""
    kp = state.kp_feedback if isinstance(state, RuleState) else ()
    return (
        [[t.numpy().copy() for t in block] for block in params],
        [b.numpy().copy() for b in kp],
        np.concatenate([loss.numpy() for loss in losses]),
    )


def _train(case, parallel=None, align_every=0):
    """Two epochs of train_epoch (each a ragged last batch), from the same start on every process;
    with align_every > 0, the angles of both epochs too, (6, 2, L)."""
    name, method, mode = case.split("-")
    spec, opt, _, batch_size = SETUPS[name]
    x, y, orders = _data(name)
    params, feedback, state = _start(name, "dfa" if align_every and method == "bp" else method)  # against DFA's B
    donate = name == "conv"  # the in-place update too, on one model
    epoch = train_epoch(
        spec, opt, method, mode, batch_size=batch_size, donate=donate, align_every=align_every, parallel=parallel
    )
    losses, angles = [], []
    for i, order in enumerate(orders):
        params, state, loss, measured = epoch(params, feedback, state, x, y, order, i * 3)
        assert (measured is None) == (align_every == 0)
        losses.append(loss)
        angles.append(measured)
    if align_every:
        return _result(params, state, losses), torch.cat(angles).numpy()
    return _result(params, state, losses)


def _steps(parallel, method, mode, with_alignment=False):
    """train_step on this rank's shards of uneven batches (5 rows, then 1), the global rows unknown;
    with_alignment: the steps' angles too, (2, 2, L)."""
    spec, opt, _, _ = SETUPS["mlp"]
    x, y, _ = _data("mlp")
    params, feedback, state = _start("mlp", "dfa" if with_alignment else method)
    step = train_step(spec, opt, method, mode, with_alignment=with_alignment, parallel=parallel)
    losses, angles = [], []
    for rows in (slice(0, 5), slice(5, 6)):
        xb, yb = x[rows], y[rows]
        if parallel is not None:
            start, stop = shard_bounds(len(xb), parallel.size, parallel.rank)
            xb, yb = xb[start:stop], yb[start:stop]
        params, state, loss, *measured = step(params, feedback, state, xb, yb)
        losses.append(loss.reshape(1))
        angles += [torch.stack(tuple(m)).numpy() for m in measured]
    return _result(params, state, losses), np.array(angles)


STEP_CASES = (("dfa", "class_mean", False), ("bp", "sample", False), ("dfa", "sample", True), ("bp", "sample", True))


def _all_cases(rank, world):
    dp = data_parallel()
    assert dp is not None and (dp.size, dp.rank, dp.is_main) == (world, rank, rank == 0)
    assert data_parallel(world) == dp
    with pytest.raises(ValueError, match="has 2 processes"):
        data_parallel(world + 1)
    out = {case: _train(case, dp) for case in CASES}
    out.update({f"align-{case}": _train(case, dp, ALIGN_EVERY) for case in ALIGN_CASES})
    out.update({f"step-{m}-{mode}-{a}": _steps(dp, m, mode, a) for m, mode, a in STEP_CASES})
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_all_cases, 2)


def _assert_close(got, want):
    (params, kp, losses), (params_ref, kp_ref, losses_ref) = got, want
    for block, block_ref in zip(params, params_ref, strict=True):
        for t, t_ref in zip(block, block_ref, strict=True):
            np.testing.assert_allclose(t, t_ref, rtol=RTOL, atol=1e-13)
    for b, b_ref in zip(kp, kp_ref, strict=True):
        np.testing.assert_allclose(b, b_ref, rtol=RTOL, atol=1e-13)
    np.testing.assert_allclose(losses, losses_ref, rtol=RTOL)


@pytest.mark.parametrize("case", CASES)
def test_two_processes_train_as_one(ranks, case):
    """Both ranks end with the single-process params, KP feedback and per-batch global losses."""
    want = _train(case)
    assert not np.allclose(want[0][-1][0], init_params(SETUPS[case.split("-")[0]][0], 0)[-1][0])  # it trained
    for rank in (0, 1):
        _assert_close(ranks[rank][case], want)


def _assert_angles_close(got, want):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=ANGLE_RTOL, atol=ANGLE_ATOL)  # NaN where NaN


@pytest.mark.parametrize("case", ALIGN_CASES)
def test_two_processes_measure_the_angles_of_one(ranks, case):
    """train_epoch(align_every=2, parallel=dp): both ranks get one process's angles of the global
    batches (NaN rows where unmeasured), and still its params and losses."""
    want, want_angles = _train(case, align_every=ALIGN_EVERY)
    measured = ~np.isnan(want_angles[:, 0, 0])
    assert measured.tolist() == [True, False, True, False, True, False]
    assert np.all(want_angles[measured][:, 1, :-1] > 1)  # hidden deltas: DFA is not BP, angles to compare
    for rank in (0, 1):
        got, angles = ranks[rank][f"align-{case}"]
        _assert_close(got, want)
        _assert_angles_close(angles, want_angles)


@pytest.mark.parametrize("method, mode, with_alignment", STEP_CASES)
def test_train_step_on_shards_equals_the_global_batch(ranks, method, mode, with_alignment):
    """train_step(parallel=dp) on uneven shards (one empty), global rows all-reduced: one process's
    steps, and with with_alignment its angles."""
    want, want_angles = _steps(None, method, mode, with_alignment)
    assert want_angles.shape == ((2, 2, 3) if with_alignment else (0,))
    for rank in (0, 1):
        got, angles = ranks[rank][f"step-{method}-{mode}-{with_alignment}"]
        _assert_close(got, want)
        _assert_angles_close(angles, want_angles)


# -- clear errors, no spawn ----------------------------------------------------------------------------

FAKE = DataParallel(2, 0, torch.device("cpu"))  # never reaches a collective in these tests


def test_alone_data_parallel_is_none_and_more_devices_need_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert data_parallel() is None and data_parallel(1) is None
    with pytest.raises(ValueError, match="torchrun --standalone --nproc-per-node 2"):
        data_parallel(2)
    with pytest.raises(ValueError, match="devices"):
        data_parallel(0)


def test_bad_parallel_setups_are_refused_before_anything_runs():
    spec, opt, _, _ = SETUPS["mlp"]
    with pytest.raises(ValueError, match="batch_size=5 is not divisible by devices=2"):
        train_epoch(spec, opt, "dfa", batch_size=5, parallel=FAKE)
    with pytest.raises(TypeError, match="parallel must be None or dfa_torch.parallel"):
        train_epoch(spec, opt, "dfa", batch_size=4, parallel=2)
    with pytest.raises(TypeError, match="parallel must be None"):
        train_step(spec, opt, "dfa", parallel="data")
    noisy = Projection(noise="additive", sigma=0.1)
    with pytest.raises(ValueError, match="projection.*not supported under torch data parallel"):
        train_epoch(spec, opt, "dfa", batch_size=4, projection=noisy, parallel=FAKE)
    with pytest.raises(ValueError, match="projection.*not supported under torch data parallel"):
        train_step(spec, opt, "dfa", projection=Projection(quantize="sign"), parallel=FAKE)


def test_replicate_is_the_identity_on_torch():
    tree = ((torch.ones(2),), ())
    assert FAKE.replicate(tree) is tree and FAKE.is_main
