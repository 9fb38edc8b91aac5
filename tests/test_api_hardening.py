"""Python API faults a user can cause (issue 9, items 15-19): each ends in a clear error or the right dtype."""

import numpy as np
import pytest

from dfa_core import MLPSpec, get_backend, init_feedback, init_params

BACKENDS = ("torch", "jax")
SPEC = MLPSpec((4, 5, 3), dtype="float64")


def _batch(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)), np.eye(3)[rng.integers(0, 3, n)]


@pytest.mark.parametrize("sizes", [{784, 200, 10}, {3: 1, 4: 1}, frozenset((3, 4))])
def test_unordered_layer_sizes_are_refused(sizes):
    """A set would be silently reordered into another network."""
    with pytest.raises(TypeError, match="ordered sequence"):
        MLPSpec(sizes)


def test_ordered_sequences_are_accepted():
    assert MLPSpec([4, 5, 3]).layer_sizes == MLPSpec(np.array([4, 5, 3])).layer_sizes == (4, 5, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["dfa_grads", "alignment"])
def test_missing_feedback_is_a_clear_error(backend, fn):
    be = get_backend(backend)
    x, y = _batch()
    call = be.dfa_grads if fn == "dfa_grads" else be.alignment.alignment_angles
    with pytest.raises(ValueError, match="feedback: expected 1 matrices"):
        call(SPEC, init_params(SPEC), None, x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["W_1", "b_2", "B_1"])
def test_non_finite_params_and_feedback_are_refused(backend, where):
    be = get_backend(backend)
    params = [list(p) for p in init_params(SPEC)]
    feedback = list(init_feedback(SPEC))
    if where == "W_1":
        params[0][0][1, 2] = np.nan
    elif where == "b_2":
        params[1][1][0] = np.inf
    else:
        feedback[0][0, 0] = -np.inf
    x, y = _batch()
    with pytest.raises(ValueError, match=f"{where} has non-finite values"):
        be.dfa_grads(SPEC, tuple(map(tuple, params)), tuple(feedback), x, y)
    if where != "B_1":
        with pytest.raises(ValueError, match=f"{where} has non-finite values"):
            be.bp_grads(SPEC, tuple(map(tuple, params)), x, y)


def test_unchecked_paths_stay_unchecked():
    """check_values=False skips the value checks (the fast path pays nothing)."""
    be = get_backend("jax")
    params = [list(p) for p in init_params(SPEC)]
    params[0][0][0, 0] = np.nan
    x, y = _batch()
    g = be.to_numpy(be.dfa_grads(SPEC, tuple(map(tuple, params)), init_feedback(SPEC), x, y, check_values=False))
    assert np.isnan(g[0][0]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["forward", "logits", "loss"])
def test_public_functions_keep_float64_and_take_numpy(backend, fn):
    """Given NumPy float64 arrays outside any precision scope, both backends compute in float64
    and agree to rtol 1e-12 (JAX used to fall back to float32, torch to raise TypeError)."""
    be = get_backend(backend)
    x, y = _batch()
    args = (SPEC, init_params(SPEC), x) + ((y,) if fn == "loss" else ())
    out = getattr(be, fn)(*args)
    assert "float64" in str(out.dtype)
    ref = getattr(get_backend("jax" if backend == "torch" else "torch"), fn)(*args)
    np.testing.assert_allclose(np.asarray(be.to_numpy(out)), np.asarray(ref.tolist()), rtol=1e-12)


def test_torch_mismatched_devices_name_both():
    torch = pytest.importorskip("torch")
    be = get_backend("torch")
    params = be.asarray(init_params(SPEC))
    x = torch.zeros((2, 4), dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="x is on meta but the params are on cpu"):
        be.forward(SPEC, params, x)


@pytest.mark.parametrize("source", ["matrices", "transform"])
def test_complex_feedback_is_refused(source):
    """Casting to float would silently drop the imaginary part."""
    shape = SPEC.feedback_shapes[0]
    complex_matrix = np.ones(shape) * (1 + 2j)
    with pytest.raises(TypeError, match="real numbers, got dtype complex128"):
        if source == "matrices":
            init_feedback(SPEC, matrices=[complex_matrix])
        else:
            init_feedback(SPEC, transform=lambda m: m * (1 + 1j))


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step_takes_numpy_on_both_backends(backend):
    """torch's step converts NumPy inputs as JAX's jit does; both give the same float64 update."""
    from dfa_core import OptimizerSpec

    opt = OptimizerSpec("momentum", 0.1)
    x, y = _batch()
    out = {}
    for name in BACKENDS:
        be = get_backend(name)
        params = init_params(SPEC)
        state = be.make_optimizer(opt, SPEC.dtype).init(be.asarray(params))
        step = be.train_step(SPEC, opt, "dfa", "sample")
        with be.precision_scope(SPEC.dtype):
            new, _, loss = step(params, init_feedback(SPEC), state, x, y)
        out[name] = be.to_numpy(new)
    for (w, b), (w_ref, b_ref) in zip(out[backend], out["jax" if backend == "torch" else "torch"]):
        np.testing.assert_allclose(w, w_ref, rtol=1e-10)
        np.testing.assert_allclose(b, b_ref, rtol=1e-10)
