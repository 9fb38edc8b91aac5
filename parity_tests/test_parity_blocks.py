"""Block models (conv, pool, flatten, dense): torch vs JAX vs the NumPy closed form ``numpy_blocks``.

The reference is first checked against itself (BP against central finite differences of its
loss; a Dense-only model against the MLP closed form), then both backends are compared with it:
forward, loss, dfa_grads in every mode and bp_grads, over a pruned grid in which every
architecture, activation, output, reduction and dtype appears (not the full product), in
float64 (rtol 1e-10, atol 1e-12) and float32 (rtol 1e-5, atol 1e-6).
"""

import importlib
import itertools

import numpy as np
import pytest

from dfa_core import ACTIVATIONS, MODES, OUTPUTS, REDUCTIONS, MLPSpec, init_feedback, init_params
from dfa_core.model import (
    AvgPool2d,
    Conv2d,
    Dense,
    Flatten,
    MaxPool2d,
    ModelSpec,
    Residual,
    Sequential,
    TransformerBlock,
    resnet_basic_block,
)
from parity_tests import numpy_blocks as nb
from parity_tests import numpy_reference as ref
from parity_tests.helpers import BACKENDS, TOLERANCES, assert_tree_close, backend

INPUT_SHAPE = (2, 6, 6)
N_OUT = 4
LABELS = np.array([0, 2, 2, 0, 1])  # class 3 absent, so 'class_mean' has an empty group

# Each layer type and option appears in at least one architecture; all end in Dense(N_OUT).
ARCHS = {
    # int padding, max pool, flatten
    "conv_pad1_maxpool": (Conv2d(3, 3, padding=1), MaxPool2d(2), Flatten(), Dense(N_OUT)),
    # 'same' padding, avg pool, then a stride-2 conv after the pool, two dense blocks
    "same_avgpool_stride2": (
        Conv2d(3, 3, padding="same"),
        AvgPool2d(2),
        Conv2d(2, 2, stride=2),
        Flatten(),
        Dense(5),
        Dense(N_OUT),
    ),
    # stride 2 with padding, conv after conv
    "stride2_pad_conv_conv": (Conv2d(2, 3, stride=2, padding=1), Conv2d(3, 2), Flatten(), Dense(N_OUT)),
    # a pool in the first block's prefix, and a pool that drops a row and column (3x3 -> 1x1)
    "pool_first_floor": (MaxPool2d(2), Conv2d(3, 3, padding=1), MaxPool2d(2), Flatten(), Dense(N_OUT)),
    # images through dense blocks only, with an avg pool in the prefix
    "avgpool_dense": (AvgPool2d(2), Flatten(), Dense(5), Dense(N_OUT)),
}


def make_block_case(arch, activation="tanh", output="sigmoid", reduction="sum", dtype="float64", seed=0):
    """A ModelSpec with NumPy params, feedback, x (5, 2, 6, 6) and one-hot y (5, 4)."""
    spec = ModelSpec(INPUT_SHAPE, ARCHS[arch], activation, output, reduction, dtype)
    rng = np.random.default_rng(200 + seed)
    x = rng.normal(size=(len(LABELS), *INPUT_SHAPE)).astype(dtype)
    y = np.eye(N_OUT, dtype=dtype)[LABELS]
    return spec, nb.draw_params(spec, seed), nb.draw_feedback(spec, seed + 1), x, y


def _grid():
    """10 cases: each architecture twice, each activation twice (on two architectures), every
    output, reduction and dtype (3 cases in float32, one per output)."""
    archs = list(ARCHS)
    cases = []
    for i in range(10):
        activation = ACTIVATIONS[(2 * i + i // 5) % 5]
        dtype = "float32" if i % 4 == 1 else "float64"
        cases.append((archs[i % 5], activation, OUTPUTS[i % 3], REDUCTIONS[(i // 3) % 2], dtype))
    return cases


GRID = _grid()


def _id(case):
    return "-".join(str(c) for c in case)


def test_grid_covers_every_value_of_every_axis():
    """The pruned grid (not the full product) holds every architecture, activation, output, reduction, dtype."""
    for axis, values in enumerate((ARCHS, ACTIVATIONS, OUTPUTS, REDUCTIONS, ("float64", "float32"))):
        assert {case[axis] for case in GRID} == set(values)
    assert len({(case[0], case[1]) for case in GRID}) == len(GRID)  # no (architecture, activation) twice


# -- the reference against itself ----------------------------------------------------------------


def _finite_differences(spec, params, x, y, eps=1e-6):
    """Central differences of the reference loss for every leaf of every block (any number per block)."""
    params = [[np.array(t, np.float64) for t in pair] for pair in params]
    out = []
    for pair in params:
        grads = []
        for t in pair:
            fd = np.zeros_like(t)
            for idx in np.ndindex(t.shape):
                old = t[idx]
                t[idx] = old + eps
                up = nb.loss(spec, params, x, y)
                t[idx] = old - eps
                down = nb.loss(spec, params, x, y)
                t[idx] = old
                fd[idx] = (up - down) / (2 * eps)
            grads.append(fd)
        out.append(grads)
    return out


@pytest.mark.parametrize(
    "arch,activation,output,reduction",
    [
        ("conv_pad1_maxpool", "tanh", "softmax", "sum"),
        ("same_avgpool_stride2", "sigmoid", "sigmoid", "mean"),
        ("stride2_pad_conv_conv", "leaky_relu", "identity", "sum"),
        ("pool_first_floor", "tanh", "sigmoid", "sum"),
        ("avgpool_dense", "relu", "softmax", "mean"),
    ],
)
def test_reference_bp_equals_finite_differences(arch, activation, output, reduction):
    """The hand-written backward pass equals central differences of the reference loss (float64)."""
    spec, params, _, x, y = make_block_case(arch, activation, output, reduction)
    grads = nb.bp_grads(spec, params, x, y)
    fd = _finite_differences(spec, params, x, y)
    for l, (got, want) in enumerate(zip(grads, fd)):
        for name, g_, w_ in zip(("W", "b"), got, want):
            np.testing.assert_allclose(g_, w_, rtol=1e-6, atol=1e-8, err_msg=f"block {l} {name}")


def _dense_only(activation, output, reduction, dtype="float64"):
    """The same network as an MLPSpec and as a ModelSpec of Dense layers, with MLP params/feedback."""
    sizes = (6, 5, 7, 3, N_OUT)
    mlp = MLPSpec(sizes, activation=activation, output=output, reduction=reduction, dtype=dtype)
    model = ModelSpec((sizes[0],), tuple(Dense(n) for n in sizes[1:]), activation, output, reduction, dtype)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(len(LABELS), sizes[0])).astype(dtype)
    y = np.eye(N_OUT, dtype=dtype)[LABELS]
    return mlp, model, init_params(mlp, seed=3), init_feedback(mlp, seed=4), x, y


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_dense_only_equals_mlp_reference(activation, output):
    """A Dense-only ModelSpec gives the MLP closed form's forward, loss, DFA (every mode) and BP grads."""
    for reduction in REDUCTIONS:
        mlp, model, params, feedback, x, y = _dense_only(activation, output, reduction)
        np.testing.assert_allclose(
            nb.forward(model, params, x)[3], ref.forward_with_activations(mlp, params, x)[2], rtol=1e-12
        )
        np.testing.assert_allclose(nb.loss(model, params, x, y), ref.loss(mlp, params, x, y), rtol=1e-12)
        assert_tree_close(nb.bp_grads(model, params, x, y), ref.bp_grads(mlp, params, x, y), 1e-12, 1e-14, "bp")
        for mode in MODES:
            want = ref.dfa_grads(mlp, params, feedback, x, y, mode)
            assert_tree_close(nb.dfa_grads(model, params, feedback, x, y, mode), want, 1e-12, 1e-14, mode)


@pytest.mark.parametrize("arch", ["conv_pad1_maxpool", "pool_first_floor"])
def test_reference_output_block_dfa_equals_bp(arch):
    """Per sample, the output block's DFA gradient is BP's (delta_L = e is dLoss/da_L for one-hot y)."""
    for output, reduction in itertools.product(OUTPUTS, REDUCTIONS):
        spec, params, feedback, x, y = make_block_case(arch, "tanh", output, reduction)
        dfa = nb.dfa_grads(spec, params, feedback, x, y, "sample")
        assert_tree_close(dfa[-1], nb.bp_grads(spec, params, x, y)[-1], 1e-12, 1e-14, f"{output} {reduction}")


# -- both backends against the reference ---------------------------------------------------------


@pytest.mark.parametrize("arch,activation,output,reduction,dtype", GRID, ids=[_id(c) for c in GRID])
def test_forward_and_loss_match_reference(arch, activation, output, reduction, dtype):
    """be.forward (y_hat) and be.loss equal the closed form."""
    spec, params, _, x, y = make_block_case(arch, activation, output, reduction, dtype)
    rtol, atol = TOLERANCES[dtype]
    y_hat = nb.forward(spec, params, x)[3]
    want_loss = nb.loss(spec, params, x, y)
    for name in BACKENDS:
        be = backend(name)
        with be.precision_scope(dtype):
            P, X, Y = be.asarray(params), be.asarray(x), be.asarray(y)
            assert_tree_close(be.to_numpy(be.forward(spec, P, X)), y_hat, rtol, atol, f"{name} forward")
            got_loss = be.to_numpy(be.loss(spec, P, X, Y))
        np.testing.assert_allclose(got_loss, want_loss, rtol=rtol, atol=atol, err_msg=f"{name} loss")


@pytest.mark.parametrize("arch,activation,output,reduction,dtype", GRID, ids=[_id(c) for c in GRID])
def test_dfa_grads_match_reference_in_every_mode(arch, activation, output, reduction, dtype):
    """dfa_grads of both backends equal the closed form in 'sample', 'batch_mean' and 'class_mean'."""
    spec, params, feedback, x, y = make_block_case(arch, activation, output, reduction, dtype)
    rtol, atol = TOLERANCES[dtype]
    for mode in MODES:
        want = nb.dfa_grads(spec, params, feedback, x, y, mode)
        for name in BACKENDS:
            be = backend(name)
            got = be.to_numpy(be.dfa_grads(spec, be.asarray(params), be.asarray(feedback), x, y, mode=mode))
            assert_tree_close(got, want, rtol, atol, f"{name} dfa_grads mode={mode}")


@pytest.mark.parametrize("arch,activation,output,reduction,dtype", GRID, ids=[_id(c) for c in GRID])
def test_bp_grads_match_reference(arch, activation, output, reduction, dtype):
    """bp_grads (autodiff through the whole model) equals the hand-written backward pass."""
    spec, params, _, x, y = make_block_case(arch, activation, output, reduction, dtype)
    rtol, atol = TOLERANCES[dtype]
    want = nb.bp_grads(spec, params, x, y)
    for name in BACKENDS:
        be = backend(name)
        got = be.to_numpy(be.bp_grads(spec, be.asarray(params), x, y))
        assert_tree_close(got, want, rtol, atol, f"{name} bp_grads")


@pytest.mark.parametrize("output,reduction", [("sigmoid", "sum"), ("softmax", "mean"), ("identity", "sum")])
def test_output_block_dfa_equals_bp_output_grad(output, reduction):
    """Per sample, each backend's output-block DFA gradient is its own BP output-block gradient."""
    spec, params, feedback, x, y = make_block_case("same_avgpool_stride2", "tanh", output, reduction)
    rtol, atol = TOLERANCES["float64"]
    for name in BACKENDS:
        be = backend(name)
        P = be.asarray(params)
        dfa = be.to_numpy(be.dfa_grads(spec, P, be.asarray(feedback), x, y, mode="sample"))
        bp = be.to_numpy(be.bp_grads(spec, P, x, y))
        assert_tree_close(dfa[-1], bp[-1], rtol, atol, f"{name} output block")


ONE_BLOCK = {
    "dense": (Flatten(), Dense(N_OUT)),
    "pools_dense": (MaxPool2d(2), AvgPool2d(1), Flatten(), Dense(N_OUT)),
}


ONE_BLOCK_GRID = [("dense", "sigmoid", "mean"), ("dense", "softmax", "sum"), ("pools_dense", "identity", "mean")]


@pytest.mark.parametrize("arch,output,reduction", ONE_BLOCK_GRID, ids=[_id(c) for c in ONE_BLOCK_GRID])
def test_one_block_model_dfa_equals_bp(arch, output, reduction):
    """With a single block there is no feedback matrix: per-sample DFA is exactly BP."""
    spec = ModelSpec(INPUT_SHAPE, ONE_BLOCK[arch], "tanh", output, reduction, "float64")
    assert spec.feedback_shapes == ()
    params = nb.draw_params(spec, seed=5)
    x = np.random.default_rng(6).normal(size=(len(LABELS), *INPUT_SHAPE))
    y = np.eye(N_OUT)[LABELS]
    rtol, atol = TOLERANCES["float64"]
    for name in BACKENDS:
        be = backend(name)
        P = be.asarray(params)
        dfa = be.to_numpy(be.dfa_grads(spec, P, (), x, y, mode="sample"))
        assert_tree_close(dfa, be.to_numpy(be.bp_grads(spec, P, x, y)), rtol, atol, f"{name} {reduction}")
        assert_tree_close(dfa, nb.bp_grads(spec, params, x, y), rtol, atol, f"{name} {reduction} vs reference")


# Each activation once, every output and reduction (the closed-form grid above covers the rest).
DENSE_ONLY_GRID = [(a, OUTPUTS[i % 3], REDUCTIONS[i % 2]) for i, a in enumerate(ACTIVATIONS)]


@pytest.mark.parametrize("activation,output,reduction", DENSE_ONLY_GRID, ids=[_id(c) for c in DENSE_ONLY_GRID])
def test_dense_only_modelspec_equals_mlpspec_path(activation, output, reduction):
    """A ModelSpec of Dense layers gives each backend's MLPSpec results (float64, rtol 1e-12)."""
    mlp, model, params, feedback, x, y = _dense_only(activation, output, reduction)
    for name in BACKENDS:
        be = backend(name)
        P, F = be.asarray(params), be.asarray(feedback)
        with be.precision_scope("float64"):
            X, Y = be.asarray(x), be.asarray(y)
            for fn, args in (("forward", (P, X)), ("loss", (P, X, Y))):
                got = be.to_numpy(getattr(be, fn)(model, *args))
                want = be.to_numpy(getattr(be, fn)(mlp, *args))
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=f"{name} {fn}")
        bp = be.to_numpy(be.bp_grads(model, P, x, y))
        assert_tree_close(bp, be.to_numpy(be.bp_grads(mlp, P, x, y)), 1e-12, 1e-15, f"{name} bp {reduction}")
        for mode in MODES:
            got = be.to_numpy(be.dfa_grads(model, P, F, x, y, mode=mode))
            want = be.to_numpy(be.dfa_grads(mlp, P, F, x, y, mode=mode))
            assert_tree_close(got, want, 1e-12, 1e-15, f"{name} dfa {mode} {reduction}")


# -- composite blocks (Sequential, Residual): one feedback point, exact backprop inside --------------

COMPOSITE_ARCHS = {
    # f between the inner convs, a pool inside the block, conv -> pool -> conv
    "sequential_conv_pool": (
        Sequential(Conv2d(3, 3, padding=1), MaxPool2d(2), Conv2d(2, 2)),
        Flatten(),
        Dense(N_OUT),
    ),
    # ResNet basic blocks: identity shortcut, then the automatic strided 1x1 projection
    "resnet_blocks": (
        Conv2d(3, 3, padding=1),
        resnet_basic_block(3),
        resnet_basic_block(4, stride=2),
        Flatten(),
        Dense(N_OUT),
    ),
    # flat composites: Sequential of Dense, Residual with an automatic Dense projection and its own
    # out_activation, Residual with an explicit shortcut, a composite as the output block
    "dense_composites": (
        Flatten(),
        Sequential(Dense(6), Dense(5)),
        Residual(Dense(5), Dense(4), out_activation="identity"),
        Residual(Dense(3), shortcut=Dense(3)),
        Sequential(Dense(5), Dense(N_OUT)),
    ),
}


def make_composite_case(arch, activation="tanh", output="sigmoid", reduction="sum", dtype="float64"):
    spec = ModelSpec(INPUT_SHAPE, COMPOSITE_ARCHS[arch], activation, output, reduction, dtype)
    rng = np.random.default_rng(300)
    x = rng.normal(size=(len(LABELS), *INPUT_SHAPE)).astype(dtype)
    y = np.eye(N_OUT, dtype=dtype)[LABELS]
    return spec, nb.draw_params(spec, 0), nb.draw_feedback(spec, 1), x, y


# Every architecture, activation, output, reduction and both dtypes, in 5 cases.
COMPOSITE_GRID = [
    ("sequential_conv_pool", "tanh", "softmax", "sum", "float64"),
    ("resnet_blocks", "relu", "sigmoid", "mean", "float64"),
    ("dense_composites", "sigmoid", "identity", "sum", "float64"),
    ("dense_composites", "leaky_relu", "softmax", "mean", "float32"),
    ("resnet_blocks", "identity", "identity", "sum", "float32"),
]


def test_composite_grid_covers_every_value():
    for axis, values in enumerate((COMPOSITE_ARCHS, ACTIVATIONS, OUTPUTS, REDUCTIONS, ("float64", "float32"))):
        assert {case[axis] for case in COMPOSITE_GRID} == set(values)


@pytest.mark.parametrize("arch", list(COMPOSITE_ARCHS))
def test_reference_composite_bp_equals_finite_differences(arch):
    """The hand-written backward pass through composites equals central differences (float64)."""
    spec, params, _, x, y = make_composite_case(arch, "tanh", "softmax", "mean")
    assert [len(p) for p in params] == [len(s) for s in spec.param_shapes]
    assert_tree_close(nb.bp_grads(spec, params, x, y), _finite_differences(spec, params, x, y), 1e-6, 1e-8, arch)


@pytest.mark.parametrize("arch,activation,output,reduction,dtype", COMPOSITE_GRID, ids=[_id(c) for c in COMPOSITE_GRID])
def test_composite_models_match_reference(arch, activation, output, reduction, dtype):
    """forward, loss, dfa_grads in every mode and bp_grads of both backends equal the closed form.

    Runs the backends' unchecked block functions: the checked entry points' ``prepare`` reads
    params as (W, b) pairs (dfa_jax.dfa / dfa_torch.dfa, not owned here).
    """
    spec, params, feedback, x, y = make_composite_case(arch, activation, output, reduction, dtype)
    rtol, atol = TOLERANCES[dtype]
    y_hat, want_loss = nb.forward(spec, params, x)[3], nb.loss(spec, params, x, y)
    want_bp = nb.bp_grads(spec, params, x, y)
    want_dfa = {mode: nb.dfa_grads(spec, params, feedback, x, y, mode) for mode in MODES}
    for name in BACKENDS:
        be = backend(name)
        blocks = importlib.import_module(f"dfa_{name}.blocks")
        with be.precision_scope(dtype):
            P, F, X, Y = be.asarray((params, feedback, x, y))
            assert_tree_close(be.to_numpy(blocks._forward(spec, P, X)), y_hat, rtol, atol, f"{name} forward")
            assert_tree_close(be.to_numpy(blocks._loss(spec, P, X, Y)), want_loss, rtol, atol, f"{name} loss")
            got_bp = be.to_numpy(blocks.bp_grads_unchecked(spec, P, X, Y))
            assert_tree_close(got_bp, want_bp, rtol, atol, f"{name} bp_grads")
            for mode in MODES:
                got = be.to_numpy(blocks.dfa_grads_unchecked(spec, P, F, X, Y, mode))
                assert_tree_close(got, want_dfa[mode], rtol, atol, f"{name} dfa_grads mode={mode}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_one_composite_block_model_dfa_equals_bp(reduction):
    """A model that is one Sequential block has no feedback matrix: per-sample DFA is exactly BP
    (backprop inside the block), on both backends and the reference."""
    layers = (Sequential(Conv2d(2, 3, padding=1), AvgPool2d(2), Flatten(), Dense(5), Dense(N_OUT)),)
    spec = ModelSpec(INPUT_SHAPE, layers, "tanh", "softmax", reduction, "float64")
    assert spec.num_layers == 1 and spec.feedback_shapes == ()
    params = nb.draw_params(spec, seed=5)
    x = np.random.default_rng(6).normal(size=(len(LABELS), *INPUT_SHAPE))
    y = np.eye(N_OUT)[LABELS]
    rtol, atol = TOLERANCES["float64"]
    want = nb.bp_grads(spec, params, x, y)
    assert_tree_close(nb.dfa_grads(spec, params, (), x, y, "sample"), want, rtol, atol, "reference")
    for name in BACKENDS:
        be = backend(name)
        blocks = importlib.import_module(f"dfa_{name}.blocks")
        with be.precision_scope("float64"):
            P, X, Y = be.asarray((params, x, y))
            assert_tree_close(
                be.to_numpy(blocks.dfa_grads_unchecked(spec, P, (), X, Y, "sample")), want, rtol, atol, name
            )


# -- the pre-norm transformer block: NumPy forward, grads across backends ----------------------------

SEQ_SHAPE = (5, 8)  # T tokens of width D


def make_transformer_case(activation="relu", output="softmax", reduction="mean", dtype="float64", two=True):
    layers = (TransformerBlock(2, 6),) + ((TransformerBlock(4, 3),) if two else ()) + (Flatten(), Dense(N_OUT))
    spec = ModelSpec(SEQ_SHAPE, layers, activation, output, reduction, dtype)
    x = np.random.default_rng(400).normal(size=(len(LABELS), *SEQ_SHAPE)).astype(dtype)
    y = np.eye(N_OUT, dtype=dtype)[LABELS]
    return spec, nb.draw_params(spec, 0), nb.draw_feedback(spec, 1), x, y


def _blocks_module(name):
    return importlib.import_module(f"dfa_{name}.blocks")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_transformer_forward_matches_numpy(dtype):
    """Both backends' logits of two stacked transformer blocks equal the head-by-head NumPy forward."""
    spec, params, _, x, y = make_transformer_case("tanh", dtype=dtype)
    rtol, atol = TOLERANCES[dtype]
    want = nb.forward(spec, params, x)[3]
    for name in BACKENDS:
        be = backend(name)
        with be.precision_scope(dtype):
            P, X = be.asarray((params, x))
            assert_tree_close(be.to_numpy(_blocks_module(name)._forward(spec, P, X)), want, rtol, atol, name)


@pytest.mark.parametrize("output,reduction", [("sigmoid", "sum")])  # softmax, mean: the test below
def test_transformer_grads_agree_across_backends(output, reduction):
    """BP grads and DFA grads in every mode (VJP of the whole block) agree between torch and JAX (float64)."""
    spec, params, feedback, x, y = make_transformer_case("relu", output, reduction)
    rtol, atol = TOLERANCES["float64"]
    got = {}
    for name in BACKENDS:
        be, blocks = backend(name), _blocks_module(name)
        with be.precision_scope("float64"):
            P, F, X, Y = be.asarray((params, feedback, x, y))
            got[name] = [be.to_numpy(blocks.bp_grads_unchecked(spec, P, X, Y))] + [
                be.to_numpy(blocks.dfa_grads_unchecked(spec, P, F, X, Y, mode)) for mode in MODES
            ]
    for what, t, j in zip(("bp",) + MODES, got["torch"], got["jax"]):
        assert [len(b) for b in t] == [12, 12, 2]
        assert_tree_close(t, j, rtol, atol, what)


def test_transformer_dfa_with_transposed_output_weights_equals_bp():
    """Block -> Flatten -> Dense with an identity out_activation: with B_1 = W_2^T, BP's delta at the
    block's output is DFA's, so the block's DFA grads (the VJP of the whole block) equal BP's."""
    spec, params, _, x, y = make_transformer_case("tanh", two=False)
    feedback = (np.ascontiguousarray(params[-1][0].T),)
    rtol, atol = TOLERANCES["float64"]
    for name in BACKENDS:
        be, blocks = backend(name), _blocks_module(name)
        with be.precision_scope("float64"):
            P, F, X, Y = be.asarray((params, feedback, x, y))
            dfa = be.to_numpy(blocks.dfa_grads_unchecked(spec, P, F, X, Y, "sample"))
            bp = be.to_numpy(blocks.bp_grads_unchecked(spec, P, X, Y))
        assert_tree_close(dfa, bp, rtol, atol, name)
