"""dfa_torch on ModelSpec (conv/pool/dense blocks): MLP equivalence, DFA/BP properties, mirror with JAX.

The independent NumPy parity of block models lives in parity_tests/test_parity_blocks.py; these
tests check properties of the torch backend that need no second implementation.
"""

import inspect
from typing import Any

import numpy as np
import pytest
import torch

from dfa_core import ACTIVATIONS, MODES, OUTPUTS, REDUCTIONS, MLPSpec, OptimizerSpec, init_feedback, init_params
from dfa_core.model import AvgPool2d, Conv2d, Dense, Flatten, MaxPool2d, ModelSpec
from dfa_torch import blocks
from dfa_torch import dfa as tdfa
from dfa_torch import mlp as tmlp
from dfa_torch.arrays import asarray, to_numpy
from dfa_torch.train import train_step

RTOL_EXACT = 1e-12  # float64: a Dense-only model must compute what the MLP path computes
LABELS = np.array([0, 2, 2, 0, 1, 2])  # class 3 of 4 absent: 'class_mean' has an empty group


def _batch(input_shape, n_out, dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(LABELS), *input_shape)).astype(dtype)
    return x, np.eye(n_out, dtype=dtype)[LABELS]


def _close(got, want, rtol, atol=0.0):
    for g, w in zip(_leaves(got), _leaves(want)):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
    assert len(_leaves(got)) == len(_leaves(want))


def _leaves(tree):
    if isinstance(tree, (tuple, list)):
        return [leaf for t in tree for leaf in _leaves(t)]
    return [tree.detach().cpu().numpy() if isinstance(tree, torch.Tensor) else np.asarray(tree)]


# -- a Dense-only ModelSpec is the MLPSpec ------------------------------------------------------------

DENSE_SIZES = (7, 6, 5, 4)


def _dense_pair(activation, output, reduction, dtype="float64"):
    mlp = MLPSpec(DENSE_SIZES, activation, output, reduction, dtype)
    model = ModelSpec((DENSE_SIZES[0],), tuple(Dense(n) for n in DENSE_SIZES[1:]), activation, output, reduction, dtype)
    return mlp, model


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_only_model_equals_mlp_forward_and_loss(activation, output):
    """forward, logits, loss and forward_with_activations (u = h, a, y_hat) agree to rtol 1e-12 in float64."""
    mlp, model = _dense_pair(activation, output, "mean")
    params = init_params(mlp, seed=3)
    x, y = _batch((DENSE_SIZES[0],), DENSE_SIZES[-1])
    for fn in (tmlp.forward, tmlp.logits):
        _close(fn(model, params, x), fn(mlp, params, x), RTOL_EXACT)
    _close(tmlp.loss(model, params, x, y), tmlp.loss(mlp, params, x, y), RTOL_EXACT)
    acts_m: Any = tmlp.forward_with_activations(model, params, x)  # a BlockActivations
    acts = tmlp.forward_with_activations(mlp, params, x)
    _close((acts_m.u, acts_m.a, acts_m.y_hat), (acts.h, acts.a, acts.y_hat), RTOL_EXACT)  # no prefix: u_l = h_{l-1}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_only_model_equals_mlp_grads(activation, output, reduction):
    """dfa_grads in every mode and bp_grads agree with the MLP path to rtol 1e-12 in float64."""
    mlp, model = _dense_pair(activation, output, reduction)
    params, feedback = init_params(mlp, seed=4), init_feedback(mlp, seed=5)
    x, y = _batch((DENSE_SIZES[0],), DENSE_SIZES[-1], seed=1)
    for mode in MODES:
        _close(
            tdfa.dfa_grads(model, params, feedback, x, y, mode),
            tdfa.dfa_grads(mlp, params, feedback, x, y, mode),
            RTOL_EXACT,
        )
    _close(tdfa.bp_grads(model, params, x, y), tdfa.bp_grads(mlp, params, x, y), RTOL_EXACT)


# -- a small LeNet-like conv model --------------------------------------------------------------------

LENET = (
    Conv2d(3, 3, padding="same"),
    MaxPool2d(2),
    Conv2d(4, 3, stride=2, padding=1),
    AvgPool2d(1),
    Flatten(),
    Dense(6),
    Dense(4),
)
ONE_BLOCK = (MaxPool2d(2), Flatten(), Dense(4))  # a single block: pools and flatten as its prefix
INPUT = (2, 8, 9)  # odd width: the pool drops a column


def _conv_case(layers=LENET, activation="tanh", output="softmax", reduction="sum", dtype="float64", seed=0):
    spec = ModelSpec(INPUT, layers, activation, output, reduction, dtype)
    x, y = _batch(INPUT, spec.n_out, dtype, seed)
    return spec, init_params(spec, seed=seed), init_feedback(spec, seed=seed + 1), x, y


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("output", OUTPUTS)
def test_output_block_dfa_equals_bp(output, reduction):
    """In 'sample' mode delta_L = e' is the exact gradient at the logits, so DFA's last block is BP's."""
    spec, params, feedback, x, y = _conv_case(output=output, reduction=reduction)
    dfa = tdfa.dfa_grads(spec, params, feedback, x, y, "sample")
    bp = tdfa.bp_grads(spec, params, x, y)
    _close(dfa[-1], bp[-1], 1e-12, 1e-14)
    assert not np.allclose(_leaves(dfa[0])[0], _leaves(bp[0])[0])  # the hidden blocks do differ


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("output", OUTPUTS)
def test_one_block_model_dfa_equals_bp(output, reduction):
    """A model of one block (pool + flatten + dense) has no feedback: DFA is BP."""
    spec, params, feedback, x, y = _conv_case(ONE_BLOCK, output=output, reduction=reduction)
    assert feedback == ()
    _close(tdfa.dfa_grads(spec, params, (), x, y), tdfa.bp_grads(spec, params, x, y), 1e-12, 1e-14)


def test_conv_layer_vjp_is_the_adjoint_of_the_forward():
    """conv is linear in (W, b): <gW, dW> + <gb, db> = <delta, conv(u; dW, db)>, from the forward alone."""
    layer = Conv2d(3, 3, stride=2, padding=1)
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    w, b, u = rand(3, 2, 3, 3), rand(3), rand(4, 2, 7, 6)
    delta = rand(*blocks._apply_layer(layer, w, b, u).shape)
    dw, db = rand(3, 2, 3, 3), rand(3)
    gw, gb = blocks._layer_vjp(layer, w, b, u, delta)
    lhs = torch.sum(gw * dw) + torch.sum(gb * db)
    rhs = torch.sum(delta * blocks._apply_layer(layer, dw, db, u))
    np.testing.assert_allclose(lhs.item(), rhs.item(), rtol=1e-12)


def _grouping_matrix(y, mode):
    """G (K, batch) written out in NumPy; K counts present classes for 'class_mean'."""
    if mode == "sample":
        return np.eye(len(y)), len(y)
    if mode == "batch_mean":
        return np.full((1, len(y)), 1 / len(y)), 1
    labels = y.argmax(1)
    rows = [(labels == c) / (labels == c).sum() for c in range(y.shape[1]) if (labels == c).any()]
    return np.array(rows), len(rows)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_hidden_conv_block_grads_are_the_surrogate_gradient(mode, reduction):
    """Each block's DFA grads are d/dtheta_l <delta_l, g_l(theta_l, u'_l)> with delta_l from e' B_l^T.

    delta_l and the grouping are rebuilt here in NumPy from ``forward_with_activations``; the
    gradient of the surrogate is taken by autograd through the forward (not through layer_vjp).
    """
    spec, params, feedback, x, y = _conv_case(activation="sigmoid", output="sigmoid", reduction=reduction)
    acts = blocks._forward_with_activations(spec, asarray(params), torch.from_numpy(x))
    g_kb, k = _grouping_matrix(y, mode)
    group = lambda t: np.tensordot(g_kb, t.numpy(), axes=1)  # noqa: E731
    e = group(acts.y_hat) - g_kb @ y
    if reduction == "mean":
        e = e / k
    got = tdfa.dfa_grads(spec, params, feedback, x, y, mode)
    for l, block in enumerate(spec.blocks):
        if l < spec.num_hidden:
            h = 1 / (1 + np.exp(-group(acts.a[l])))
            delta = (e @ feedback[l].T).reshape(-1, *block.a_shape) * h * (1 - h)
        else:
            delta = e
        w, b = (torch.tensor(t, requires_grad=True) for t in params[l])
        a = blocks._apply_layer(block.layer, w, b, torch.from_numpy(group(acts.u[l])))
        want = torch.autograd.grad(torch.sum(a * torch.from_numpy(delta)), (w, b))
        _close(got[l], want, 1e-11, 1e-13)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_shapes_dtypes_and_no_autograd_state(dtype):
    """Grads are shaped like params, of spec.dtype, carry no graph; the caller's tensors are untouched."""
    spec, params, feedback, x, y = _conv_case(dtype=dtype)
    params_t, feedback_t = asarray(params), asarray(feedback)
    for grads in (tdfa.dfa_grads(spec, params_t, feedback_t, x, y, "class_mean"), tdfa.bp_grads(spec, params_t, x, y)):
        for (gw, gb), (w, b) in zip(grads, params_t):
            assert gw.shape == w.shape and gb.shape == b.shape
            assert gw.dtype == gb.dtype == getattr(torch, dtype)
            assert gw.grad_fn is None and not gw.requires_grad
    for w, b in params_t:
        assert not w.requires_grad and w.grad is None
    _close(params_t, params, 0.0)
    assert tmlp.forward(spec, params, x).shape == (len(LABELS), spec.n_out)


def test_dfa_builds_no_graph_even_with_grad_enabled_params():
    """Params that require grad still give graph-free DFA grads (no autograd between blocks)."""
    spec, params, feedback, x, y = _conv_case()
    params_t = tuple((w.requires_grad_(), b.requires_grad_()) for w, b in asarray(params))
    grads, batch_loss = tdfa.dfa_grads_and_loss(
        spec, params_t, asarray(feedback), torch.from_numpy(x), torch.from_numpy(y), "sample"
    )
    assert all(g.grad_fn is None for g in _leaves_t(grads)) and batch_loss.grad_fn is None


def _leaves_t(tree):
    return [t for pair in tree for t in pair]


@pytest.mark.parametrize("method", ["dfa", "bp"])
def test_train_step_runs_on_a_model_spec(method):
    """train_step's SGD step on a ModelSpec is params - lr * grads, and returns the pre-step loss."""
    spec, params, feedback, x, y = _conv_case(reduction="mean")
    opt = OptimizerSpec("sgd", learning_rate=0.1)
    step = train_step(spec, opt, method, "sample")
    params_t = asarray(params)
    from dfa_torch.optim import make_optimizer

    state = make_optimizer(opt, spec.dtype).init(params_t)
    new, _, batch_loss = step(params_t, asarray(feedback), state, torch.from_numpy(x), torch.from_numpy(y))
    grads = tdfa.dfa_grads(spec, params, feedback, x, y) if method == "dfa" else tdfa.bp_grads(spec, params, x, y)
    want = [p - 0.1 * g for p, g in zip(_leaves(params), _leaves(grads))]
    _close(new, want, 1e-12, 1e-14)
    np.testing.assert_allclose(batch_loss.item(), tmlp.loss(spec, params, x, y).item(), rtol=1e-12)


def test_bad_mode_and_shapes_are_refused_before_compute():
    """Validation runs on ModelSpec too: bad mode, flat images, wrong feedback rows."""
    spec, params, feedback, x, y = _conv_case()
    with pytest.raises(ValueError, match="mode"):
        tdfa.dfa_grads(spec, params, feedback, x, y, "bogus")
    with pytest.raises(ValueError, match="x must have shape"):
        tdfa.dfa_grads(spec, params, feedback, x.reshape(len(x), -1), y)
    with pytest.raises(ValueError, match="B_1"):
        tdfa.dfa_grads(spec, params, (feedback[0][:-1], *feedback[1:]), x, y)


def test_blocks_mirror_dfa_jax_blocks():
    """dfa_torch.blocks and dfa_jax.blocks export the same names with the same arguments."""
    jblocks = pytest.importorskip("dfa_jax.blocks")
    assert blocks.__all__ == jblocks.__all__
    private = (
        "_apply_prefix",
        "_apply_layer",
        "_layer_vjp",
        "_composite",
        "_transformer_block",
        "_apply_block",
        "_block_vjp",
        "_forward_with_activations",
        "_logits",
        "_forward",
        "_loss",
    )
    for name in (*blocks.__all__, *private):
        fn, twin = getattr(blocks, name), getattr(jblocks, name)
        if inspect.isfunction(fn) and inspect.isfunction(inspect.unwrap(twin)):
            params = list(inspect.signature(fn).parameters)
            assert params == list(inspect.signature(inspect.unwrap(twin)).parameters), name
    assert blocks.BlockActivations._fields == jblocks.BlockActivations._fields


def test_numpy_round_trip_of_grads():
    spec, params, feedback, x, y = _conv_case(dtype="float32")
    grads = to_numpy(tdfa.dfa_grads(spec, params, feedback, x, y, "batch_mean"))
    assert [tuple(g.shape) for pair in grads for g in pair] == [s for pair in spec.param_shapes for s in pair]


@pytest.mark.parametrize("size,hw", [(2, (7, 6)), (3, (9, 10)), (1, (4, 4))])
def test_forward_only_max_pool_equals_max_pool2d(size, hw):
    """DFA's forward-only max pool (strided maxima) gives F.max_pool2d's values, floor crop included."""
    from dfa_torch import blocks

    h = torch.from_numpy(np.random.default_rng(size).normal(size=(3, 2, *hw)))
    want = torch.nn.functional.max_pool2d(h, size)
    assert torch.equal(blocks._max_pool_forward_only(MaxPool2d(size), h), want)
