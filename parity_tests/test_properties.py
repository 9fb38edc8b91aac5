"""Properties that tie DFA to BP and the compiled steps to their contract."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfa_core import MODES, OUTPUTS, REDUCTIONS, MLPSpec, OptimizerSpec, init_feedback, init_params
from parity_tests.helpers import BACKENDS, TOLERANCES, assert_tree_close, backend, make_case


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("output", OUTPUTS)
def test_output_layer_dfa_gradient_equals_bp(name, output, reduction):
    """In 'sample' mode the output layer's DFA gradient is exactly the BP gradient."""
    spec, params, feedback, x, y = make_case(3, "tanh", output, reduction, "float64")
    be = backend(name)
    P, F = be.asarray(params), be.asarray(feedback)
    dfa = be.to_numpy(be.dfa_grads(spec, P, F, x, y, mode="sample"))
    bp = be.to_numpy(be.bp_grads(spec, P, x, y))
    assert_tree_close(dfa[-1], bp[-1], 1e-12, 1e-13, f"{name} output layer")
    # ...while hidden layers differ: DFA is not BP.
    assert not np.allclose(dfa[0][0], bp[0][0], rtol=1e-3)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("output", OUTPUTS)
def test_network_without_hidden_layer_has_dfa_equal_bp(name, output, dtype):
    """With no hidden layer there is nothing to feed back: DFA == BP."""
    spec, params, feedback, x, y = make_case(0, "tanh", output, "mean", dtype)
    assert feedback == ()
    be = backend(name)
    P = be.asarray(params)
    rtol, atol = TOLERANCES[dtype]
    assert_tree_close(
        be.to_numpy(be.dfa_grads(spec, P, (), x, y)), be.to_numpy(be.bp_grads(spec, P, x, y)), rtol, atol, name
    )


def test_jax_entry_points_compile_once_per_spec_and_mode():
    """Repeated dfa_grads / bp_grads / train_step calls with new data reuse one compilation."""
    import dfa_jax

    spec = MLPSpec((12, 9, 8, 5), dtype="float32")
    P, F = dfa_jax.asarray(init_params(spec, 0)), dfa_jax.asarray(init_feedback(spec, 1))
    opt = OptimizerSpec("adam", learning_rate=1e-3)
    step = dfa_jax.train_step(spec, opt, "dfa", "class_mean")
    S = dfa_jax.make_optimizer(opt).init(P)
    before = dict(dfa_jax.TRACE_COUNTS)
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.normal(size=(16, 12)).astype("float32")
        y = np.eye(5, dtype="float32")[rng.integers(0, 5, 16)]
        dfa_jax.dfa_grads(spec, P, F, x, y, mode="class_mean")
        dfa_jax.bp_grads(spec, P, x, y)
        P, S, _ = step(P, F, S, jnp.asarray(x), jnp.asarray(y))
    after = dfa_jax.TRACE_COUNTS
    for key in ("dfa_grads", "bp_grads", "train_step_dfa"):
        assert after[key] - before.get(key, 0) == 1, f"{key} traced {after[key] - before.get(key, 0)} times"


def test_jax_step_function_passes_chex_max_traces():
    """The pure DFA gradient function, jitted with chex.assert_max_traces(n=1), traces once."""
    from dfa_jax import dfa

    spec, params, feedback, x, y = make_case(3, dtype="float32")
    counted = jax.jit(chex.assert_max_traces(dfa._dfa_grads, n=1), static_argnames=("spec", "mode"))
    for i in range(4):
        counted(spec, params, feedback, x + i, y, mode="sample")


def test_float64_is_scoped_not_global():
    """A float64 call gives float64 results and leaves JAX's global default at float32."""
    import dfa_jax

    spec, params, feedback, x, y = make_case(1, dtype="float64")
    g = dfa_jax.dfa_grads(spec, dfa_jax.asarray(params), dfa_jax.asarray(feedback), x, y)
    assert g[0][0].dtype == jnp.float64
    assert not jax.config.jax_enable_x64
    assert jnp.ones(2).dtype == jnp.float32


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_train_step_equals_sgd_on_dfa_grads(name, mode):
    """One plain-SGD train_step is W - lr * dfa_grads (the update the report's loops apply)."""
    spec, params, feedback, x, y = make_case(1, dtype="float64")
    be = backend(name)
    P, F = be.asarray(params), be.asarray(feedback)
    lr = 0.125
    opt = OptimizerSpec("sgd", learning_rate=lr)
    g = be.to_numpy(be.dfa_grads(spec, P, F, x, y, mode=mode))
    with be.precision_scope("float64"):
        new, _, _ = be.train_step(spec, opt, "dfa", mode)(
            P, F, be.make_optimizer(opt, "float64").init(P), be.asarray(x), be.asarray(y)
        )
    want = [(w - lr * gw, b - lr * gb) for (w, b), (gw, gb) in zip(params, g)]
    assert_tree_close(be.to_numpy(new), want, 1e-13, 1e-14, name)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_donating_step_gives_the_same_trajectory(name, opt_name):
    """donate=True (in-place on torch, buffer donation on JAX) changes speed, not results."""
    spec, params, feedback, x, y = make_case(3, dtype="float64")
    be = backend(name)
    opt = OptimizerSpec(opt_name, learning_rate=0.05)
    results = []
    for donate in (False, True):
        P, F = be.asarray(params), be.asarray(feedback)
        S = be.make_optimizer(opt, "float64").init(P)
        step = be.train_step(spec, opt, "dfa", "sample", donate=donate)
        with be.precision_scope("float64"):
            X, Y = be.asarray(x), be.asarray(y)
            for _ in range(5):
                P, S, _ = step(P, F, S, X, Y)
        results.append(be.to_numpy(P))
    assert_tree_close(results[1], results[0], 0, 0, f"{name} donate")


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_layer", [False, True], ids=["concatenated", "per_layer"])
def test_fused_step_projects_per_layer_or_concatenated_alike(name, mode, per_layer, monkeypatch):
    """The fused fast path gives the closed-form gradients and loss on both projection routes."""
    from parity_tests import numpy_reference as ref

    spec, params, feedback, x, y = make_case(3, "sigmoid", "softmax", "mean", "float64")
    be = backend(name)
    monkeypatch.setattr(be.dfa, "PROJECT_PER_LAYER_ELEMENTS", 0 if per_layer else 1 << 30)
    with be.precision_scope("float64"):
        grads, loss = be.dfa_grads_and_loss(
            spec, be.asarray(params), be.asarray(feedback), be.asarray(x), be.asarray(y), mode
        )
    assert_tree_close(be.to_numpy(grads), ref.dfa_grads(spec, params, feedback, x, y, mode), 1e-10, 1e-12, name)
    np.testing.assert_allclose(float(be.to_numpy(loss)), ref.loss(spec, params, x, y), rtol=1e-12)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("method", ["dfa", "bp"])
def test_step_with_alignment_measures_before_updating(name, method):
    """with_alignment=True returns the same update plus the angles alignment_angles gives."""
    spec, params, feedback, x, y = make_case(3, dtype="float64")
    be = backend(name)
    align = __import__(f"dfa_{name}.alignment", fromlist=["alignment_angles"])
    opt = OptimizerSpec("adam", learning_rate=0.01)
    P, F = be.asarray(params), be.asarray(feedback)
    want_angles = be.to_numpy(tuple(align.alignment_angles(spec, P, F, x, y)))
    with be.precision_scope("float64"):
        S = be.make_optimizer(opt, "float64").init(P)
        X, Y = be.asarray(x), be.asarray(y)
        plain = be.train_step(spec, opt, method)(P, F, S, X, Y)
        P2 = be.asarray(params)
        out = be.train_step(spec, opt, method, donate=True, with_alignment=True)(
            P2, F, be.make_optimizer(opt, "float64").init(P2), X, Y
        )
    assert len(out) == 4
    assert_tree_close(be.to_numpy(out[0]), be.to_numpy(plain[0]), 1e-13, 1e-14, f"{name} params")
    assert_tree_close(be.to_numpy(tuple(out[3])), want_angles, 1e-9, 1e-9, f"{name} angles")
    assert abs(float(want_angles[0][-1])) < 1e-5  # output layer: DFA == BP in 'sample' mode
