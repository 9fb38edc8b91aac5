"""The JAX backend on ModelSpec (dfa_jax.blocks): Dense-only models equal the MLP path, conv/pool
models match torch.nn's semantics, DFA meets BP where the math says it must, and the checked,
jitted entry points keep shapes, dtypes and their single trace."""

from __future__ import annotations

import numpy as np
import pytest

import dfa_jax as be
from dfa_core import (
    AvgPool2d,
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
from dfa_jax import blocks

MODES = ("sample", "batch_mean", "class_mean")
LABELS = np.array([0, 0, 1, 1, 1, 3, 3, 0, 1])  # class 2 absent: 'class_mean' has an empty group
EXACT = dict(rtol=1e-12, atol=1e-14)  # float64, same math, different programs


def _tree_close(actual, expected, what="", **tol):
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            _tree_close(a, e, f"{what}[{i}]", **tol)
        return
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, err_msg=what, **tol)


def _batch(spec, seed=0):
    rng = np.random.default_rng(50 + seed)
    x = rng.normal(size=(len(LABELS), *getattr(spec, "input_shape", (spec.n_in,)))).astype(spec.dtype)
    return x, np.eye(spec.n_out, dtype=spec.dtype)[LABELS]


def _case(spec, seed=0):
    """params (torch's default init), feedback and a batch, NumPy, spec.dtype."""
    return (init_params(spec, seed=seed), init_feedback(spec, seed=seed + 1), *_batch(spec, seed))


def _lenet(activation="tanh", output="softmax", reduction="sum", dtype="float64"):
    """A tiny LeNet: conv (same padding), max pool, strided conv, avg pool, flatten, two dense."""
    layers = (
        Conv2d(3, 3, padding="same"),
        MaxPool2d(2),
        Conv2d(4, 3, stride=2, padding=1),
        AvgPool2d(2),
        Flatten(),
        Dense(6),
        Dense(4),
    )
    return ModelSpec((2, 9, 9), layers, activation, output, reduction, dtype)


# -- a Dense-only ModelSpec is the MLP --------------------------------------------------------------

SIZES = (6, 5, 7, 4)
MLP_CASES = [
    ("tanh", "sigmoid", "sum"),
    ("relu", "softmax", "mean"),
    ("leaky_relu", "identity", "sum"),
    ("sigmoid", "softmax", "mean"),
]


def _twins(activation, output, reduction):
    mlp = MLPSpec(SIZES, activation=activation, output=output, reduction=reduction, dtype="float64")
    model = ModelSpec((SIZES[0],), tuple(Dense(n) for n in SIZES[1:]), activation, output, reduction, "float64")
    return mlp, model


@pytest.mark.parametrize("activation,output,reduction", MLP_CASES)
def test_dense_model_forward_and_loss_equal_the_mlp(activation, output, reduction):
    """forward, logits, loss and the kept activations of Dense(...) layers equal MLPSpec's, float64."""
    mlp, model = _twins(activation, output, reduction)
    params, _, x, y = _case(mlp)
    assert model.param_shapes == mlp.param_shapes and model.feedback_shapes == mlp.feedback_shapes
    for fn in (be.forward, be.logits):
        _tree_close(fn(model, params, x), fn(mlp, params, x), fn.__name__, **EXACT)
    _tree_close(be.loss(model, params, x, y), be.loss(mlp, params, x, y), "loss", **EXACT)
    acts, mlp_acts = be.forward_with_activations(model, params, x), be.forward_with_activations(mlp, params, x)
    assert isinstance(acts, blocks.BlockActivations)
    _tree_close(acts.a, mlp_acts.a, "a", **EXACT)
    _tree_close(acts.u, mlp_acts.h, "u = h_{l-1}", **EXACT)
    _tree_close(acts.y_hat, mlp_acts.y_hat, "y_hat", **EXACT)


# -- conv/pool semantics are torch.nn's ----------------------------------------------------------------


def _torch_model(spec, params):
    torch = pytest.importorskip("torch")
    import torch.nn as tnn

    modules, blocks_params = [], iter(params)
    act = {"tanh": tnn.Tanh, "relu": tnn.ReLU, "sigmoid": tnn.Sigmoid}[spec.activation]
    for i, layer in enumerate(spec.layers):
        if isinstance(layer, (Dense, Conv2d)):
            w, b = next(blocks_params)
            if isinstance(layer, Dense):
                m = tnn.Linear(w.shape[1], w.shape[0])
            else:
                m = tnn.Conv2d(w.shape[1], w.shape[0], layer.kernel_size, layer.stride, layer.pad)
            m = m.double()
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(w))
                m.bias.copy_(torch.from_numpy(b))
            modules.append(m)
            if i < len(spec.layers) - 1:
                modules.append(act())
        elif isinstance(layer, MaxPool2d):
            modules.append(tnn.MaxPool2d(layer.size))
        elif isinstance(layer, AvgPool2d):
            modules.append(tnn.AvgPool2d(layer.size))
        else:
            modules.append(tnn.Flatten())
    return tnn.Sequential(*modules)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_conv_model_logits_and_bp_match_torch_nn(activation):
    """logits and BP gradients of a LeNet-like model equal torch.nn.Sequential's (odd sizes: pools floor)."""
    torch = pytest.importorskip("torch")
    spec = _lenet(activation=activation, output="identity")
    params, _, x, y = _case(spec)
    net = _torch_model(spec, params)
    xt = torch.from_numpy(x)
    z = net(xt)
    _tree_close(be.logits(spec, params, x), z.detach().numpy(), "logits", **EXACT)
    (0.5 * ((z - torch.from_numpy(y)) ** 2).sum()).backward()
    expected = [p.grad.numpy() for p in net.parameters()]
    got = [g for pair in be.bp_grads(spec, params, x, y) for g in pair]
    _tree_close(got, expected, "bp", **EXACT)


# -- DFA against BP --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("output", ["sigmoid", "softmax", "identity"])
def test_conv_model_output_block_dfa_equals_bp(output, reduction):
    """In 'sample' mode the output block's DFA gradient is backprop's (delta_L = e)."""
    spec = _lenet(output=output, reduction=reduction)
    params, feedback, x, y = _case(spec)
    dfa = be.dfa_grads(spec, params, feedback, x, y, mode="sample")
    bp = be.bp_grads(spec, params, x, y)
    _tree_close(dfa[-1], bp[-1], "output block", **EXACT)
    assert not np.allclose(dfa[0][0], bp[0][0])  # random feedback: the hidden blocks differ


@pytest.mark.parametrize("prefix", [(), (MaxPool2d(2),), (AvgPool2d(3),)])
def test_single_block_model_dfa_equals_bp(prefix):
    """Without hidden blocks DFA is BP, whatever the (pool) prefix, in every reduction."""
    for reduction in ("sum", "mean"):
        spec = ModelSpec((2, 7, 7), (*prefix, Flatten(), Dense(4)), "tanh", "softmax", reduction, "float64")
        params, feedback, x, y = _case(spec)
        assert feedback == ()
        _tree_close(be.dfa_grads(spec, params, (), x, y), be.bp_grads(spec, params, x, y), reduction, **EXACT)


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
@pytest.mark.parametrize("conv", [Conv2d(3, 3), Conv2d(3, 2, stride=2, padding=1), Conv2d(2, 3, padding="same")])
def test_conv_block_dfa_with_transposed_weights_equals_bp(activation, conv):
    """conv -> Flatten -> Dense: with B_1 = W_2^T, DFA's conv gradient is BP's exactly.

    Flatten is the identity up to the (C, H, W) order, so BP's delta_1 = reshape(e W_2) * f'(a_1):
    this checks the conv VJP, the reshape order and f' together.
    """
    spec = ModelSpec((2, 6, 6), (conv, Flatten(), Dense(4)), activation, "sigmoid", "sum", "float64")
    params, _, x, y = _case(spec)
    feedback = (np.ascontiguousarray(params[1][0].T),)
    _tree_close(be.dfa_grads(spec, params, feedback, x, y), be.bp_grads(spec, params, x, y), "grads", **EXACT)


def test_deep_linear_conv_model_dfa_with_the_jacobian_equals_bp():
    """Identity activations make a_1 -> logits linear: with B_1 its Jacobian (and B_2 likewise), DFA is BP."""
    import jax

    layers = (Conv2d(3, 3, padding=1), AvgPool2d(2), Conv2d(2, 2), MaxPool2d(1), Flatten(), Dense(4))
    spec = ModelSpec((1, 6, 6), layers, "identity", "softmax", "mean", "float64")
    params, _, x, y = _case(spec)
    with be.precision_scope("float64"):
        p = be.asarray(params)
        b = spec.blocks

        def tail(start, a_flat):  # a_start (flat, one sample) -> logits
            h = a_flat.reshape(1, *b[start].a_shape)
            for blk, (w, bias) in zip(b[start + 1 :], p[start + 1 :]):
                h = blocks._apply_layer(blk.layer, w, bias, blocks._apply_prefix(blk.prefix, h))
            return h[0]

        feedback = tuple(np.asarray(jax.jacobian(lambda a, l=l: tail(l, a))(np.zeros(b[l].a_size))).T for l in range(2))
    _tree_close(be.dfa_grads(spec, params, feedback, x, y), be.bp_grads(spec, params, x, y), "grads", **EXACT)


def test_grouped_modes_equal_hand_grouping():
    """'class_mean' with reduction 'mean' equals the issue's recipe written out with NumPy grouping."""
    spec = _lenet(reduction="mean")
    params, feedback, x, y = _case(spec)
    acts = be.forward_with_activations(spec, params, x)
    classes = [c for c in range(spec.n_out) if (LABELS == c).any()]
    g = np.stack([(LABELS == c) / (LABELS == c).sum() for c in classes])  # (K, batch)
    grp = lambda t: np.tensordot(g, np.asarray(t), axes=1)  # noqa: E731
    e = (grp(acts.y_hat) - grp(y)) / len(classes)
    import jax

    expected = []
    with be.precision_scope("float64"):
        for l, (blk, (w, b)) in enumerate(zip(spec.blocks, be.asarray(params))):
            if l < spec.num_hidden:
                a = grp(acts.a[l])
                delta = (e @ feedback[l].T).reshape(len(classes), *blk.a_shape) * (1 - np.tanh(a) ** 2)
            else:
                delta = e
            _, pull = jax.vjp(lambda w_, b_, blk=blk, l=l: blocks._apply_layer(blk.layer, w_, b_, grp(acts.u[l])), w, b)
            expected.append(pull(delta))
    _tree_close(be.dfa_grads(spec, params, feedback, x, y, mode="class_mean"), expected, "class_mean", **EXACT)


# -- entry points -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grads_keep_shapes_and_dtype_and_trace_once(dtype):
    """dfa_grads/bp_grads return params-shaped arrays of spec.dtype; a second call does not retrace."""
    spec = _lenet(dtype=dtype)
    params, feedback, x, y = _case(spec)
    for mode in MODES:
        grads = be.dfa_grads(spec, params, feedback, x, y, mode=mode)
        before = dict(blocks.TRACE_COUNTS)
        be.dfa_grads(spec, params, feedback, x + 1, y, mode=mode)
        assert dict(blocks.TRACE_COUNTS) == before
        assert [(g.shape, str(g.dtype)) for pair in grads for g in pair] == [
            (s, dtype) for pair in spec.param_shapes for s in pair
        ]
        assert all(np.isfinite(np.asarray(g)).all() for pair in grads for g in pair)
    bp = be.bp_grads(spec, params, x, y)
    assert [str(g.dtype) for pair in bp for g in pair] == [dtype] * 2 * spec.num_layers
    assert be.forward(spec, params, x).shape == (len(LABELS), spec.n_out)


def test_bad_shapes_are_refused_before_tracing():
    spec = _lenet()
    params, feedback, x, y = _case(spec)
    with pytest.raises(ValueError, match="x must have shape"):
        be.dfa_grads(spec, params, feedback, x.reshape(len(x), -1), y)
    with pytest.raises(ValueError, match="B_1"):
        be.dfa_grads(spec, params, (feedback[0][:-1], *feedback[1:]), x, y)
    with pytest.raises(ValueError, match="W_1"):
        be.bp_grads(spec, ((params[0][0][:, :1], params[0][1]), *params[1:]), x, y)


@pytest.mark.parametrize("method", ["dfa", "bp"])
def test_train_step_takes_a_model_spec(method):
    """train_step on a ModelSpec: one SGD step moves params by -lr * the checked entry point's grads."""
    spec = _lenet(reduction="mean")
    params, feedback, x, y = _case(spec)
    opt = OptimizerSpec("sgd", learning_rate=0.1)
    with be.precision_scope("float64"):
        p, fb, xj, yj = be.asarray((params, feedback, x, y))
        step = be.train_step(spec, opt, method=method)
        new, _, batch_loss = step(p, fb, be.make_optimizer(opt, spec.dtype).init(p), xj, yj)
    grads = be.dfa_grads(spec, params, feedback, x, y) if method == "dfa" else be.bp_grads(spec, params, x, y)
    expected = [np.asarray(v) - 0.1 * np.asarray(g) for pv, pg in zip(params, grads) for v, g in zip(pv, pg)]
    _tree_close([v for pair in new for v in pair], expected, "params", **EXACT)
    _tree_close(batch_loss, be.loss(spec, params, x, y), "loss", **EXACT)
