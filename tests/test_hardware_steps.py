"""Hardware effects inside the DFA step on both backends: keys and generators, compiled-program reuse,
checked-entry errors, the device callback, and the optical-projection example."""

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from dfa_core import MLPSpec, OptimizerSpec, init_feedback, init_params
from dfa_core.hardware import Projection

BACKENDS = ("torch", "jax")
NOISY = Projection(quantize="ternary", noise="additive", sigma=0.5)


def be(name):
    arrays = importlib.import_module(f"dfa_{name}.arrays")
    return types.SimpleNamespace(
        asarray=arrays.asarray, to_numpy=arrays.to_numpy, dfa=importlib.import_module(f"dfa_{name}.dfa")
    )


def case(dtype="float32"):
    spec = MLPSpec((6, 5, 7, 4), activation="tanh", output="softmax", dtype=dtype)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6)).astype(dtype)
    y = np.eye(4, dtype=dtype)[[0, 1, 2, 3, 0, 1, 2, 3]]
    return spec, init_params(spec, seed=0), init_feedback(spec, seed=1), x, y


def grads(name, key, projection=NOISY, **kw):
    spec, params, feedback, x, y = case()
    b = be(name)
    return b.to_numpy(
        b.dfa.dfa_grads(spec, b.asarray(params), b.asarray(feedback), x, y, projection=projection, key=key, **kw)
    )


def _same(a, b):
    return all(np.array_equal(s, t) for p, q in zip(a, b) for s, t in zip(p, q))


def test_jax_key_draws_are_reproducible_and_vary_with_the_key():
    """The same PRNG key gives the same grads; another key other grads; the output layer's are exact."""
    g0, g0_again, g1 = (grads("jax", jax.random.key(s)) for s in (0, 0, 1))
    assert _same(g0, g0_again) and not _same(g0, g1)
    np.testing.assert_array_equal(g0[-1][0], g1[-1][0])  # only the hidden layers' projections are noisy
    legacy = grads("jax", jax.random.PRNGKey(0))  # a raw uint32 key works as well
    assert all(np.isfinite(t).all() for pair in legacy for t in pair)


def test_torch_generator_advances_and_int_seeds_reproduce():
    """A torch.Generator's state advances from step to step; the same int seed gives the same grads."""
    gen = torch.Generator().manual_seed(0)
    first, second = grads("torch", gen), grads("torch", gen)
    assert not _same(first, second)
    assert _same(first, grads("torch", torch.Generator().manual_seed(0)))
    assert _same(grads("torch", 5), grads("torch", 5)) and not _same(grads("torch", 5), grads("torch", 6))


def test_jax_step_compiles_once_per_projection_and_not_per_key():
    """New keys and new explicit noise reuse the compiled program; a new Projection compiles a new one."""
    dfa = importlib.import_module("dfa_jax.dfa")
    spec, params, feedback, x, y = case()
    b = be("jax")
    P, F = b.asarray(params), b.asarray(feedback)
    X, Y = jax.numpy.asarray(x), jax.numpy.asarray(y)
    projection = Projection(quantize="kbit:3", noise="multiplicative", sigma=0.2)
    before = dfa.TRACE_COUNTS["dfa_grads"]
    for seed in range(3):
        dfa.dfa_grads_unchecked(spec, P, F, X, Y, "sample", projection, None, jax.random.key(seed))
    assert dfa.TRACE_COUNTS["dfa_grads"] == before + 1
    other = Projection(quantize="kbit:4", noise="multiplicative", sigma=0.2)
    dfa.dfa_grads_unchecked(spec, P, F, X, Y, "sample", other, None, jax.random.key(0))
    assert dfa.TRACE_COUNTS["dfa_grads"] == before + 2


@pytest.mark.parametrize("name", BACKENDS)
def test_checked_entry_refuses_bad_noise_and_keys(name):
    """Errors name what was expected, before any compute."""
    spec, params, feedback, x, y = case()
    b = be(name)
    P, F = b.asarray(params), b.asarray(feedback)
    with pytest.raises(ValueError, match="needs its standard-normal draws"):
        b.dfa.dfa_grads(spec, P, F, x, y, projection=NOISY)
    with pytest.raises(ValueError, match="projection has no noise"):
        b.dfa.dfa_grads(spec, P, F, x, y, noise=(np.zeros((8, 5)), np.zeros((8, 7))))
    with pytest.raises(ValueError, match=r"noise\[0\] must have shape \(8, 5\)"):
        b.dfa.dfa_grads(spec, P, F, x, y, projection=NOISY, noise=(np.zeros((8, 4)), np.zeros((8, 7))))
    with pytest.raises(TypeError, match="key must be"):
        b.dfa.dfa_grads(spec, P, F, x, y, projection=NOISY, key="seed")
    with pytest.raises(TypeError, match="Projection or None"):
        b.dfa.dfa_grads(spec, P, F, x, y, projection="ternary")


def test_jax_key_must_be_a_prng_key():
    """An int seed is torch's convention; JAX asks for jax.random.key(seed)."""
    with pytest.raises(TypeError, match=r"jax.random.key\(seed\)"):
        grads("jax", 0)


@pytest.mark.parametrize("name", BACKENDS)
def test_a_float64_device_in_a_compiled_epoch_is_exact(name):
    """A device answering e B_l^T exactly gives exact DFA, float64 kept end to end, in the compiled epoch
    (on JAX XLA runs the callback on a thread of its own, where float64 used to be cast to float32)."""
    spec, params, feedback, x, y = case("float64")
    x, y = np.concatenate([x, x[:3]]), np.concatenate([y, y[:3]])  # 11 rows: a ragged last batch
    seen = []

    def project(q):
        seen.append(q.dtype)
        return tuple(q @ np.asarray(b).T for b in feedback)

    backend = importlib.import_module(f"dfa_{name}")
    opt = OptimizerSpec("sgd", 0.1)
    out = {}
    for label, projection in (("device", Projection(device=project)), ("exact", None)):
        with backend.precision_scope("float64"):
            p, f = backend.asarray(params), backend.asarray(feedback)
            state = backend.make_optimizer(opt, "float64").init(p)
            epoch = backend.train_epoch(
                spec, opt, "dfa", "sample", 4, **({"projection": projection} if projection else {})
            )
            p, _, losses, _ = epoch(p, f, state, backend.asarray(x), backend.asarray(y), np.arange(11))
            out[label] = backend.to_numpy((p, losses))
    assert seen and set(seen) == {np.dtype("float64")}
    for got, want in zip(jax.tree_util.tree_leaves(out["device"]), jax.tree_util.tree_leaves(out["exact"])):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", BACKENDS)
def test_device_gets_the_quantised_error_and_bad_answers_fail(name):
    """The device is called with q = Q(e') as NumPy (once per step); a wrong answer raises its message."""
    spec, params, feedback, x, y = case()
    seen = []

    def project(q):
        seen.append(q.copy())
        return tuple(q @ np.asarray(b, q.dtype).T for b in feedback)

    g = grads(name, None, Projection(quantize="sign", device=project))
    assert len(seen) == 1 and seen[0].shape == (8, 4) and seen[0].dtype == np.float32
    assert set(np.unique(seen[0])) <= {-1.0, 0.0, 1.0}
    np.testing.assert_allclose(g[0][0], grads(name, None, Projection(quantize="sign"))[0][0], rtol=1e-5, atol=1e-6)

    def wrong(q):
        return (q @ np.asarray(feedback[0], q.dtype).T,)

    with pytest.raises(Exception, match="returned 1 arrays, expected 2"):
        grads(name, None, Projection(device=wrong))


def test_optical_projection_example_trains_xor():
    """examples/optical_projection.py: its device matches the in-program projection and XOR is solved."""
    example = Path(__file__).resolve().parents[1] / "examples" / "optical_projection.py"
    out = subprocess.run(
        [sys.executable, str(example), "--backend", "torch", "--ternary"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr
    diff = float(out.stdout.split("max relative difference ")[1].split()[0])
    assert diff < 1e-9
    assert "XOR by DFA through the optical device (ternarised error) on torch: 4/4 correct" in out.stdout
