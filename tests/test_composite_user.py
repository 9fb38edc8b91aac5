"""User blocks: a torch nn.Module (functional_call) and a JAX (init, apply) pair as one block each:
exact against the same block built from dfa_core layers, seeded init, clear errors, and training."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dfa_core import (
    MODES,
    Conv2d,
    Dense,
    Flatten,
    ModelSpec,
    OptimizerSpec,
    Sequential,
    get_backend,
    init_feedback,
    init_params,
)
from dfa_core.model import UserBlock
from parity_tests.helpers import assert_tree_close

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sequence_transformer.py"
LABELS = [0, 1, 2, 0, 1, 1]


def _torch_conv_block():
    torch = pytest.importorskip("torch")
    from dfa_torch import blocks

    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(3, 3, 3, padding=1))
    return blocks.user_block(net)


def _jax_dense_pair():
    import jax
    import jax.numpy as jnp

    def init(key, x):
        k1, k2 = jax.random.split(key)
        n = x.shape[1]
        return (
            (jax.random.normal(k1, (5, n)) / n**0.5, jnp.zeros(5)),
            (jax.random.normal(k2, (4, 5)) / 5**0.5, jnp.zeros(4)),
        )

    def apply(params, u):
        (w1, b1), (w2, b2) = params
        return jnp.tanh(u @ w1.T + b1[None, :]) @ w2.T + b2[None, :]

    return init, apply


def _twins(backend):
    """A model with a user block and the same model with a Sequential in its place (tanh, float64)."""
    if backend == "torch":
        user, seq, head = _torch_conv_block(), Sequential(Conv2d(3, 3, padding=1), Conv2d(3, 3, padding=1)), Flatten()
        shape = (2, 5, 5)
    else:
        from dfa_jax import blocks

        user, seq, head, shape = blocks.user_block(_jax_dense_pair()), Sequential(Dense(5), Dense(4)), Dense(6), (7,)
    return tuple(ModelSpec(shape, (b, head, Dense(3)), "tanh", "softmax", "mean", "float64") for b in (user, seq))


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_user_block_equals_the_same_sequential_block(backend):
    """Same params: forward, BP grads and DFA grads (every mode) of the user block equal the Sequential's."""
    import importlib

    user_spec, seq_spec = _twins(backend)
    assert user_spec.param_shapes == seq_spec.param_shapes and user_spec.feedback_shapes == seq_spec.feedback_shapes
    be, blocks = get_backend(backend), importlib.import_module(f"dfa_{backend}.blocks")
    params, feedback = init_params(seq_spec, 0), init_feedback(seq_spec, 1)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(len(LABELS), *seq_spec.input_shape)), np.eye(3)[LABELS]
    with be.precision_scope("float64"):
        P, F, X, Y = be.asarray((params, feedback, x, y))
        got, want = (be.to_numpy(blocks._logits(s, P, X)) for s in (user_spec, seq_spec))
        assert_tree_close(got, want, 1e-12, 1e-14, "logits")
        got, want = (be.to_numpy(blocks.bp_grads_unchecked(s, P, X, Y)) for s in (user_spec, seq_spec))
        assert_tree_close(got, want, 1e-12, 1e-14, "bp")
        for mode in MODES:
            got, want = (be.to_numpy(blocks.dfa_grads_unchecked(s, P, F, X, Y, mode)) for s in (user_spec, seq_spec))
            assert_tree_close(got, want, 1e-12, 1e-14, f"dfa {mode}")


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_user_block_init_is_seeded_and_shaped(backend):
    user_spec, _ = _twins(backend)
    a, b, c = init_params(user_spec, 0), init_params(user_spec, 0), init_params(user_spec, 1)
    assert [tuple(t.shape for t in block) for block in a] == list(user_spec.param_shapes)
    assert all(np.array_equal(p, q) for pa, pb in zip(a, b) for p, q in zip(pa, pb))
    assert not np.array_equal(a[0][0], c[0][0])
    assert all(t.dtype == np.float64 for t in a[0])
    assert not any(t.any() for t in init_params(user_spec, 0, init="zeros")[0])


def test_user_block_errors():
    torch = pytest.importorskip("torch")
    from dfa_jax import blocks as jblocks
    from dfa_torch import blocks as tblocks

    with pytest.raises(TypeError, match="needs a torch.nn.Module, got tuple"):
        tblocks.user_block(_jax_dense_pair())
    with pytest.raises(TypeError, match="has no parameters"):
        tblocks.user_block(torch.nn.Tanh())
    with pytest.raises(TypeError, match="needs a pure \\(init, apply\\) pair"):
        jblocks.user_block(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="user block does not run on a \\(3,\\) input"):
        ModelSpec((3,), (tblocks.user_block(torch.nn.Linear(4, 2)), Dense(2)))
    spec = ModelSpec((4,), (tblocks.user_block(torch.nn.Linear(4, 2)), Dense(2)), dtype="float64")
    be = get_backend("jax")
    from dfa_jax import blocks

    with pytest.raises(TypeError, match="built for torch"):
        blocks._logits(spec, be.asarray(init_params(spec)), be.asarray(np.zeros((1, 4))))
    a, b = tblocks.user_block(torch.nn.Linear(4, 2)), tblocks.user_block(torch.nn.Linear(4, 2))
    assert isinstance(a, UserBlock) and a != b and hash(a) != hash(b)  # identity


def _which_first():
    spec = importlib.util.spec_from_file_location("sequence_transformer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.which_first


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_user_block_trains_by_dfa(backend):
    """A user MLP block (Flatten, Linear, tanh, Linear) + Dense(2) learns the which-first task by DFA."""
    be = get_backend(backend)
    if backend == "torch":
        import torch

        from dfa_torch import blocks

        mlp = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(128, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32)
        )
        user = blocks.user_block(mlp)
    else:
        import jax
        import jax.numpy as jnp

        from dfa_jax import blocks

        def init(key, x):
            k1, k2 = jax.random.split(key)
            return {"w1": jax.random.normal(k1, (128, 32)) / 128**0.5, "w2": jax.random.normal(k2, (32, 32)) / 32**0.5}

        def apply(p, u):
            return jnp.tanh(u.reshape(u.shape[0], -1) @ p["w1"]) @ p["w2"]

        user = blocks.user_block((init, apply))
    spec = ModelSpec((8, 16), (user, Dense(2)), "tanh", "softmax", "mean")
    x, y = _which_first()(60 * 64, 0)
    x_test, y_test = _which_first()(500, 1)
    opt = OptimizerSpec("adam", learning_rate=3e-3)
    params, feedback = be.asarray(init_params(spec, 0)), be.asarray(init_feedback(spec, 1))
    state = be.make_optimizer(opt, spec.dtype).init(params)
    step = be.train_step(spec, opt, method="dfa")
    first = None
    for i in range(60):
        rows = slice(i * 64, (i + 1) * 64)
        params, state, loss = step(params, feedback, state, be.asarray(x[rows]), be.asarray(y[rows]))
        first = float(be.to_numpy(loss)) if first is None else first
    acc = np.mean(np.argmax(be.to_numpy(be.forward(spec, params, x_test)), 1) == np.argmax(y_test, 1))
    assert acc > 0.8 and float(be.to_numpy(loss)) < first, (acc, first, loss)
