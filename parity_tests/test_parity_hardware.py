"""DFA under hardware effects (quantised error, projection noise, a plug-in device): torch vs JAX vs NumPy.

Noise is passed in explicitly (the same standard-normal draws to every implementation), so the
comparisons are exact: float64, rtol 1e-10, atol 1e-12, both backends, every mode and reduction,
an MLP and a conv ModelSpec. The quantisers are also checked against their defining properties,
and the device path against the in-program projection when the device computes e B^T exactly.
"""

import dataclasses
import importlib
import itertools
import types

import numpy as np
import pytest

from dfa_core import MODES, REDUCTIONS, Conv2d, Dense, Flatten, MaxPool2d, MLPSpec, ModelSpec, hardware
from dfa_core.hardware import Projection
from parity_tests import numpy_blocks as nb
from parity_tests import numpy_hardware as hw_ref
from parity_tests.helpers import BACKENDS, assert_tree_close, make_case

RTOL, ATOL = 1e-10, 1e-12  # float64

PROJECTIONS = {
    "ternary": Projection(quantize="ternary", threshold=0.3),
    "sign": Projection(quantize="sign"),
    "kbit3": Projection(quantize="kbit:3"),
    "additive": Projection(noise="additive", sigma=0.618, mu=0.05),
    "multiplicative": Projection(noise="multiplicative", sigma=0.3),
    "ternary+additive": Projection(quantize="ternary", threshold=0.2, noise="additive", sigma=0.3),
    "kbit4+multiplicative": Projection(quantize="kbit:4", noise="multiplicative", sigma=0.1, mu=-0.02),
}


def be(name):
    """The backend's modules, imported directly (arrays, dfa, blocks): the same functions the registry serves."""
    arrays = importlib.import_module(f"dfa_{name}.arrays")
    dfa = importlib.import_module(f"dfa_{name}.dfa")
    return types.SimpleNamespace(
        asarray=arrays.asarray,
        to_numpy=arrays.to_numpy,
        precision_scope=arrays.precision_scope,
        dfa=dfa,
        blocks=importlib.import_module(f"dfa_{name}.blocks"),
    )


def conv_case(reduction="sum", activation="tanh", seed=0):
    """A conv ModelSpec (conv, max pool, two dense blocks) with params, feedback, x (5, 2, 6, 6), y (5, 4)."""
    layers = (Conv2d(3, 3, padding=1), MaxPool2d(2), Flatten(), Dense(5), Dense(4))
    spec = ModelSpec((2, 6, 6), layers, activation, "softmax", reduction, "float64")
    rng = np.random.default_rng(300 + seed)
    x = rng.normal(size=(5, 2, 6, 6))
    y = np.eye(4)[[0, 2, 2, 0, 1]]  # class 3 absent: 'class_mean' keeps an all-zero row
    return spec, nb.draw_params(spec, seed), nb.draw_feedback(spec, seed + 1), x, y


def exact_device(feedback):
    """A device that computes (q B_1^T, ..., q B_{L-1}^T) exactly, in NumPy float64."""
    fb = [np.asarray(b, np.float64) for b in feedback]

    def project(q):
        return tuple(q @ b.T for b in fb)

    return project


# Every projection in every mode; the reduction alternates so that both appear with each projection.
GRID = [(p, m, REDUCTIONS[(i + j) % 2]) for i, p in enumerate(PROJECTIONS) for j, m in enumerate(MODES)]


@pytest.mark.parametrize("proj_name,mode,reduction", GRID, ids=["-".join(c) for c in GRID])
def test_mlp_dfa_grads_match_closed_form_with_explicit_noise(proj_name, mode, reduction):
    """dfa_grads(projection, noise) of both backends equals the NumPy closed form (MLP, 3 hidden layers)."""
    spec, params, feedback, x, y = make_case(3, "tanh", "softmax", reduction, "float64")
    projection = PROJECTIONS[proj_name]
    noise = hardware.draw_noise(spec, len(x), mode, seed=7) if projection.noise else None
    want = hw_ref.mlp_dfa_grads(spec, params, feedback, x, y, mode, projection, noise)
    for name in BACKENDS:
        b = be(name)
        got = b.dfa.dfa_grads(
            spec, b.asarray(params), b.asarray(feedback), x, y, mode, projection=projection, noise=noise
        )
        assert_tree_close(b.to_numpy(got), want, RTOL, ATOL, f"{name} {proj_name} {mode} {reduction}")


@pytest.mark.parametrize("proj_name", ["ternary+additive", "kbit4+multiplicative"])
@pytest.mark.parametrize("mode", MODES)
def test_conv_model_dfa_grads_match_closed_form_with_explicit_noise(proj_name, mode):
    """A conv ModelSpec under hardware effects: both backends equal the closed form; noise for the conv block
    given in the block's own shape (K, C, H, W) and as the flat projection (K, C*H*W) gives the same grads."""
    spec, params, feedback, x, y = conv_case("mean")
    projection = PROJECTIONS[proj_name]
    noise = hardware.draw_noise(spec, len(x), mode, seed=11) if projection.noise else None
    want = hw_ref.block_dfa_grads(spec, params, feedback, x, y, mode, projection, noise)
    shaped = None
    if noise is not None:  # the conv block's draws in its (K, *a_shape) layout
        shaped = (noise[0].reshape(noise[0].shape[0], *spec.blocks[0].a_shape),) + noise[1:]
    for name in BACKENDS:
        b = be(name)
        P, F = b.asarray(params), b.asarray(feedback)
        for z in (noise, shaped):
            got = b.dfa.dfa_grads(spec, P, F, x, y, mode, projection=projection, noise=z)
            assert_tree_close(b.to_numpy(got), want, RTOL, ATOL, f"{name} conv {proj_name} {mode}")


def test_backends_agree_with_the_same_noise_in_float32():
    """What users run: float32, same explicit noise, both backends agree to float32 rounding."""
    spec, params, feedback, x, y = make_case(3, "relu", "sigmoid", "mean", "float32")
    projection = PROJECTIONS["ternary+additive"]
    noise = hardware.draw_noise(spec, len(x), "sample", seed=2)
    got = []
    for name in BACKENDS:
        b = be(name)
        g = b.dfa.dfa_grads(spec, b.asarray(params), b.asarray(feedback), x, y, projection=projection, noise=noise)
        got.append(b.to_numpy(g))
    assert_tree_close(got[0], [[t.astype(np.float64) for t in pair] for pair in got[1]], 1e-5, 1e-6, "float32")


DEVICE_CASES = [("mlp", m, Projection(quantize="kbit:5", noise="additive", sigma=0.2)) for m in MODES]
DEVICE_CASES += [("conv", "class_mean", Projection()), ("mlp", "sample", Projection())]


@pytest.mark.parametrize("kind,mode,base", DEVICE_CASES, ids=[f"{k}-{m}-{b.quantize}" for k, m, b in DEVICE_CASES])
def test_device_path_equals_in_program_projection(kind, mode, base):
    """A device computing e B^T exactly gives the in-program grads (float64), MLP and conv model, with and
    without quantisation and noise, on both backends (jax.pure_callback / a plain call)."""
    spec, params, feedback, x, y = make_case(1, "tanh", "sigmoid", "sum", "float64") if kind == "mlp" else conv_case()
    noise = hardware.draw_noise(spec, len(x), mode, seed=5) if base.noise else None
    on_device = dataclasses.replace(base, device=exact_device(feedback))
    for name in BACKENDS:
        b = be(name)
        P, F = b.asarray(params), b.asarray(feedback)
        want = b.to_numpy(b.dfa.dfa_grads(spec, P, F, x, y, mode, projection=base, noise=noise))
        got = b.to_numpy(b.dfa.dfa_grads(spec, P, F, x, y, mode, projection=on_device, noise=noise))
        assert_tree_close(got, want, RTOL, ATOL, f"{name} device {kind} {mode}")


def test_identity_projection_is_bit_for_bit_plain_dfa():
    """projection=None and Projection() give exactly (==) today's grads on both backends, MLP and conv."""
    for spec, params, feedback, x, y in (make_case(3, "tanh", "softmax", "mean", "float64"), conv_case("mean")):
        for name in BACKENDS:
            b = be(name)
            P, F = b.asarray(params), b.asarray(feedback)
            for mode in MODES if isinstance(spec, MLPSpec) else ("class_mean",):
                plain = b.to_numpy(b.dfa.dfa_grads(spec, P, F, x, y, mode))
                for projection in (None, Projection()):
                    got = b.to_numpy(b.dfa.dfa_grads(spec, P, F, x, y, mode, projection=projection))
                    for g, w in zip(itertools.chain(*got), itertools.chain(*plain)):
                        assert np.array_equal(g, w), f"{name} {mode} {projection}"


# -- the quantisers' defining properties ------------------------------------------------------------------


def _quantized(name, projection, e):
    b = be(name)
    with b.precision_scope("float64"):
        return np.asarray(b.to_numpy(b.blocks._quantize(projection, b.asarray(e))))


@pytest.mark.parametrize("name", BACKENDS)
def test_sign_and_ternary_quantisers(name):
    """sign: q = sign(e) in {-1, 0, 1}; ternary: q = 0 exactly where |e| <= t, else sign(e)."""
    e = np.random.default_rng(0).normal(size=(7, 5)) * 0.5
    e[0, 0], e[1, 1], e[2, 2] = 0.0, 0.25, -0.25  # zero, and both signs exactly at the threshold
    q = _quantized(name, Projection(quantize="sign"), e)
    assert set(np.unique(q)) <= {-1.0, 0.0, 1.0} and q[0, 0] == 0
    np.testing.assert_array_equal(q, np.sign(e))
    t = 0.25
    q = _quantized(name, Projection(quantize="ternary", threshold=t), e)
    assert set(np.unique(q)) == {-1.0, 0.0, 1.0}
    np.testing.assert_array_equal(q == 0, np.abs(e) <= t)
    np.testing.assert_array_equal(q[q != 0], np.sign(e)[q != 0])
    np.testing.assert_array_equal(q, hw_ref.quantize(Projection(quantize="ternary", threshold=t), e))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_kbit_quantiser(name, bits):
    """kbit:N: at most 2^N - 1 levels, evenly spaced by s/m (s = max|e|, m = 2^(N-1) - 1), error at most
    half a step, max|q| = max|e|, odd, scale-equivariant (Q(c e) = c Q(e), c > 0), and Q(0) = 0."""
    projection = Projection(quantize=f"kbit:{bits}")
    m = 2 ** (bits - 1) - 1
    e = np.random.default_rng(bits).normal(size=(9, 6))
    s = np.abs(e).max()
    q = _quantized(name, projection, e)
    steps = q * m / s
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
    assert len(np.unique(np.round(steps))) <= 2 * m + 1
    assert np.abs(q - e).max() <= s / (2 * m) + 1e-12
    np.testing.assert_allclose(np.abs(q).max(), s, rtol=1e-12)
    np.testing.assert_allclose(_quantized(name, projection, -e), -q, rtol=1e-12, atol=0)
    np.testing.assert_allclose(_quantized(name, projection, 3.5 * e), 3.5 * q, rtol=1e-12, atol=0)
    np.testing.assert_allclose(q, hw_ref.quantize(projection, e), rtol=1e-12, atol=0)
    assert not np.any(_quantized(name, projection, np.zeros((3, 4))))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("kind", ["additive", "multiplicative"])
def test_noise_drawn_from_a_key_has_the_model_s_statistics(name, kind):
    """Drawn in the step (from a key), the noise is N(mu, sigma) scaled by max|q| (additive) or a gain
    1 + N(mu, sigma) (multiplicative): mean and spread over 40,000 draws within 4 standard errors."""
    b = be(name)
    sigma, mu = 0.3, 0.1
    projection = Projection(noise=kind, sigma=sigma, mu=mu)
    e = np.zeros((200, 3))
    e[:, 0] = 2.0  # max|q| = 2
    e[0, 1] = -0.5
    key = _key(name, 0)
    with b.precision_scope("float64"):
        if kind == "additive":  # zero feedback: p = max|q| (mu + sigma z)
            feedback = b.asarray((np.zeros((100, 3)), np.zeros((100, 3))))
            p = b.to_numpy(b.blocks.hardware_projections(projection, feedback, b.asarray(e), None, None, None, key))
            samples = np.concatenate([t.ravel() for t in p]) / 2.0
        else:  # B = 1: p = q B^T (1 + mu + sigma z), with q B^T = 2 in every row but the first
            feedback = b.asarray((np.ones((100, 3)), np.ones((100, 3))))
            p = b.to_numpy(b.blocks.hardware_projections(projection, feedback, b.asarray(e), None, None, None, key))
            samples = np.concatenate([t[1:].ravel() for t in p]) / 2.0 - 1.0
    n = samples.size
    assert abs(samples.mean() - mu) < 4 * sigma / np.sqrt(n)
    assert abs(samples.std() - sigma) < 4 * sigma / np.sqrt(2 * n)
    p0, p1 = p
    assert not np.allclose(p0, p1)  # one draw per layer


def _key(name, seed):
    if name == "jax":
        import jax

        return jax.random.key(seed)
    return seed


@pytest.mark.parametrize("name", BACKENDS)
def test_class_mean_absent_rows_get_no_noise(name):
    """In 'class_mean' the all-zero row of an absent class stays zero after additive noise."""
    spec, params, feedback, x, y = make_case(1, "tanh", "softmax", "sum", "float64")
    b = be(name)
    projection = Projection(noise="additive", sigma=1.0, mu=0.5)
    with b.precision_scope("float64"):
        Y = b.asarray(y)
        present = b.blocks.present_rows("class_mean", Y)
        np.testing.assert_array_equal(b.to_numpy(present), [1, 1, 0, 1])
        e_np = np.full((4, 4), 0.1)
        e_np[2] = 0.0  # the grouped error's row of the absent class 2
        e = b.asarray(e_np)
        p = b.to_numpy(
            b.blocks.hardware_projections(projection, b.asarray(feedback), e, None, present, None, _key(name, 1))
        )
    assert np.all(p[0][2] == 0) and np.all(p[0][[0, 1, 3]] != 0)
