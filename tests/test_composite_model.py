"""Composite blocks (Sequential, Residual, resnet_basic_block) in a ModelSpec: shapes, flat params,
init, FLOPs, validation, and one training step on each backend."""

import math
import pickle

import numpy as np
import pytest

from dfa_core import (
    Conv2d,
    Dense,
    Flatten,
    MaxPool2d,
    ModelSpec,
    OptimizerSpec,
    Residual,
    Sequential,
    get_backend,
    init_feedback,
    init_params,
    resnet_basic_block,
    validation,
)
from dfa_core.model import layer_flops


def small_resnet(**kwargs):
    layers = (Conv2d(4, 3, padding=1), resnet_basic_block(4), resnet_basic_block(8, stride=2), Flatten(), Dense(3))
    return ModelSpec((1, 8, 8), layers, **kwargs)


def test_composites_are_one_block_each_with_flat_params():
    """Each composite is ONE block (one feedback matrix); its params are the inner pairs concatenated."""
    spec = small_resnet()
    assert spec.num_layers == 4 and spec.num_hidden == 3
    identity, projected = spec.blocks[1], spec.blocks[2]
    assert identity.a_shape == (4, 8, 8) and projected.a_shape == (8, 4, 4)
    assert identity.param_shapes == ((4, 4, 3, 3), (4,), (4, 4, 3, 3), (4,))
    assert identity.plan.shortcut is None  # shapes match: identity shortcut, no params
    assert projected.plan.shortcut == Conv2d(8, 1, stride=2)  # built automatically
    assert projected.param_shapes == ((8, 4, 3, 3), (8,), (8, 8, 3, 3), (8,), (8, 4, 1, 1), (8,))
    assert projected.param_names == ("W1", "b1", "W2", "b2", "W_proj", "b_proj")
    assert spec.feedback_shapes == ((256, 3), (256, 3), (128, 3))
    assert spec.num_params() == sum(math.prod(s) for block in spec.param_shapes for s in block)
    torch = pytest.importorskip("torch")
    count = sum(  # the same block in torch.nn: two 3x3 convs and the 1x1 projection
        p.numel()
        for m in (torch.nn.Conv2d(4, 8, 3, 2, 1), torch.nn.Conv2d(8, 8, 3, 1, 1), torch.nn.Conv2d(4, 8, 1, 2))
        for p in m.parameters()
    )
    assert count == sum(math.prod(s) for s in projected.param_shapes)


def test_residual_shortcuts_explicit_and_flat():
    """An explicit shortcut is used as given; a flat input gets an automatic Dense projection."""
    explicit = Residual(Conv2d(4, 3, stride=2, padding=1), shortcut=Conv2d(4, 3, stride=2, padding=1))
    spec = ModelSpec((2, 6, 6), (explicit, Flatten(), Dense(2)))
    assert spec.blocks[0].plan.shortcut == explicit.shortcut and spec.blocks[0].param_shapes[-2] == (4, 2, 3, 3)
    flat = ModelSpec((5,), (Residual(Dense(4), Dense(3)), Dense(2)))
    assert flat.blocks[0].plan.shortcut == Dense(3) and flat.blocks[0].param_shapes[-2:] == ((3, 5), (3,))


def test_specs_with_composites_are_frozen_hashable_and_picklable():
    a, b = small_resnet(), small_resnet()
    assert a == b and hash(a) == hash(b) and pickle.loads(pickle.dumps(a)) == a
    assert Sequential(Dense(2), Dense(3)) == Sequential((Dense(2), Dense(3)))
    assert Residual(Dense(2)) != Residual(Dense(2), out_activation="identity")
    with pytest.raises(Exception):
        a.layers[1].layers = ()


def test_out_activation_defaults_to_the_spec_f():
    spec = ModelSpec((4,), (Sequential(Dense(4), Dense(4)), Residual(Dense(4), out_activation="identity"), Dense(2)))
    assert [b.out_activation(spec.activation) for b in spec.blocks] == ["tanh", "identity", "tanh"]


def test_init_draws_each_inner_layer_with_torchs_default_in_order():
    """init_params draws W1, b1, W2, b2, W_proj, b_proj in order, each U(+-1/sqrt(its fan_in))."""
    spec = small_resnet(dtype="float64")
    params = init_params(spec, seed=2)
    assert [tuple(t.shape for t in p) for p in params] == list(spec.param_shapes)
    rng = np.random.default_rng(2)
    for block, leaves in zip(spec.blocks, params):
        for shape, leaf, bound in zip(block.param_shapes, leaves, block.param_inits):
            np.testing.assert_array_equal(leaf, rng.uniform(-bound, bound, size=shape))
    fans = [1 / b**2 for b in spec.blocks[2].param_inits[::2]]
    np.testing.assert_allclose(fans, [4 * 9, 8 * 9, 4])
    validation.check_params(spec, params)
    assert [f.shape for f in init_feedback(spec)] == list(spec.feedback_shapes)


def test_flops_cover_composites():
    """A composite's FLOPs: its layers (and projection) plus one add per output for the residual sum."""
    block = small_resnet().blocks[2]
    convs = layer_flops(Conv2d(8, 3, 2, 1), (4, 8, 8)) + layer_flops(Conv2d(8, 3, 1, 1), (8, 4, 4))
    assert block.flops() == convs + layer_flops(Conv2d(8, 1, 2), (4, 8, 8)) + 8 * 4 * 4
    seq = ModelSpec((2, 6, 6), (Sequential(Conv2d(3, 3), MaxPool2d(2), Flatten(), Dense(2)),)).blocks[0]
    assert seq.flops() == layer_flops(Conv2d(3, 3), (2, 6, 6)) + layer_flops(MaxPool2d(2), (3, 4, 4)) + 2 * 12 * 2 + 2


@pytest.mark.parametrize(
    "make,error,fragment",
    [
        (lambda: Sequential(), ValueError, "Sequential needs at least one layer"),
        (lambda: Sequential(Dense(2), Flatten()), ValueError, "must end in a parametrised layer"),
        (lambda: Sequential(Sequential(Dense(2))), TypeError, "composites do not nest"),
        (lambda: Residual(Dense(2), shortcut=MaxPool2d(2)), TypeError, "Residual.shortcut must be None"),
        (lambda: Residual(Dense(2), out_activation="gelu"), ValueError, "out_activation must be None"),
        (
            lambda: ModelSpec((2, 6, 6), (Sequential(Conv2d(2, 3), Dense(2)),)),
            ValueError,
            "layers[0] (Sequential): Sequential layer 1: Dense needs a flat",
        ),
        (
            lambda: ModelSpec((2, 6, 6), (Residual(Conv2d(3, 3)), Flatten(), Dense(2))),
            ValueError,
            "no 1x1 projection maps the input (2, 6, 6)",
        ),
        (
            lambda: ModelSpec(
                (2, 6, 6), (Residual(Conv2d(3, 3, padding=1), shortcut=Conv2d(3, 3)), Flatten(), Dense(2))
            ),
            ValueError,
            "gives shape (3, 4, 4), the body gives (3, 6, 6)",
        ),
    ],
)
def test_bad_composites_are_refused(make, error, fragment):
    with pytest.raises(error) as info:
        make()
    assert fragment in str(info.value)


def test_check_params_names_composite_leaves():
    spec = small_resnet()
    params = list(init_params(spec))
    with pytest.raises(ValueError, match=r"params\[2\]: expected a flat tuple of 6 arrays .*got 2 arrays"):
        validation.check_params(spec, params[:2] + [params[2][:2]] + params[3:])
    bad = params[2][:4] + (np.zeros((8, 4, 3, 3), np.float32), params[2][5])
    with pytest.raises(ValueError, match=r"W_proj_3 must have shape \(8, 4, 1, 1\) \(Residual block 3"):
        validation.check_params(spec, params[:2] + [bad] + params[3:])
    names = [n for n, _ in validation.named_leaves(params)]
    assert names[:2] == ["params W_1", "params b_1"] and "params[2][5]" in names


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("method", ["dfa", "bp"])
def test_train_step_on_composites_moves_params_by_minus_lr_grads(backend, method):
    """One SGD step of be.train_step on a ResNet-like model equals params - lr * the block grads."""
    import importlib

    be = get_backend(backend)
    blocks = importlib.import_module(f"dfa_{backend}.blocks")
    spec = small_resnet(activation="relu", output="softmax", reduction="mean", dtype="float64")
    params, feedback = init_params(spec, 0), init_feedback(spec, 1)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 1, 8, 8)), np.eye(3)[[0, 1, 2, 0, 1, 2]]
    opt = OptimizerSpec("sgd", learning_rate=0.1)
    with be.precision_scope("float64"):
        P, F, X, Y = be.asarray((params, feedback, x, y))
        step = be.train_step(spec, opt, method=method)
        new, _, _ = step(P, F, be.make_optimizer(opt, spec.dtype).init(P), X, Y)
        if method == "dfa":
            grads = blocks.dfa_grads_unchecked(spec, P, F, X, Y, "sample")
        else:
            grads = blocks.bp_grads_unchecked(spec, P, X, Y)
        grads = be.to_numpy(grads)
    new = be.to_numpy(new)
    for l, (p_new, p_old, g) in enumerate(zip(new, params, grads)):
        assert len(p_new) == len(p_old) == len(g)
        for a, b, c in zip(p_new, p_old, g):
            np.testing.assert_allclose(a, b - 0.1 * c, rtol=1e-12, atol=1e-14, err_msg=f"block {l}")
    assert not np.allclose(new[2][4], params[2][4])  # the projection learns too
