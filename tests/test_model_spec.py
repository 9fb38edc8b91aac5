"""ModelSpec (layers split into blocks): shapes, validation, hashing, seeded init and the checks."""

import dataclasses
import math
import pickle

import numpy as np
import pytest

from dfa_core import (
    AvgPool2d,
    Conv2d,
    Dense,
    Flatten,
    MaxPool2d,
    MLPSpec,
    ModelSpec,
    init_feedback,
    init_params,
    validation,
)

LENET_LAYERS = (
    Conv2d(6, 5, padding=2),
    MaxPool2d(2),
    Conv2d(16, 5),
    MaxPool2d(2),
    Flatten(),
    Dense(120),
    Dense(84),
    Dense(10),
)


def lenet(**kwargs):
    return ModelSpec((1, 28, 28), LENET_LAYERS, **kwargs)


def test_pinned_import_line():
    """The import line the issue pins works, and get_backend is the registry's."""
    from dfa_core import AvgPool2d, Conv2d, Dense, Flatten, MaxPool2d, ModelSpec, get_backend  # noqa: F401

    assert callable(get_backend)


def test_lenet5_blocks_shapes_and_parameter_count():
    """LeNet-5 on MNIST: 5 blocks, torch's layer shapes, 61,706 parameters counted from the layers."""
    spec = lenet()
    assert spec.num_layers == 5 and spec.num_hidden == 4 and spec.n_in == 784 and spec.n_out == 10
    blocks = spec.blocks
    assert [b.u_shape for b in blocks] == [(1, 28, 28), (6, 14, 14), (400,), (120,), (84,)]
    assert [b.a_shape for b in blocks] == [(6, 28, 28), (16, 10, 10), (120,), (84,), (10,)]
    assert [b.in_shape for b in blocks] == [(1, 28, 28), (6, 28, 28), (16, 10, 10), (120,), (84,)]
    assert blocks[1].prefix == (MaxPool2d(2),) and blocks[2].prefix == (MaxPool2d(2), Flatten())
    assert [b.fan_in for b in blocks] == [25, 150, 400, 120, 84]
    assert spec.param_shapes == (
        ((6, 1, 5, 5), (6,)),
        ((16, 6, 5, 5), (16,)),
        ((120, 400), (120,)),
        ((84, 120), (84,)),
        ((10, 84), (10,)),
    )
    assert spec.feedback_shapes == ((6 * 28 * 28, 10), (16 * 10 * 10, 10), (120, 10), (84, 10))
    assert spec.num_params() == 61_706
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5, padding=2),
        torch.nn.Tanh(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 16, 5),
        torch.nn.Tanh(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(400, 120),
        torch.nn.Tanh(),
        torch.nn.Linear(120, 84),
        torch.nn.Tanh(),
        torch.nn.Linear(84, 10),
    )
    assert sum(p.numel() for p in net.parameters()) == spec.num_params()
    assert [tuple(p.shape) for p in net.parameters()] == [s for pair in spec.param_shapes for s in pair]


@pytest.mark.parametrize(
    "layer,in_shape,out_shape",
    [
        (Conv2d(4, 3), (2, 9, 7), (4, 7, 5)),
        (Conv2d(4, 3, stride=2), (2, 9, 7), (4, 4, 3)),
        (Conv2d(4, 3, stride=2, padding=1), (2, 9, 7), (4, 5, 4)),
        (Conv2d(4, 5, padding="same"), (2, 9, 7), (4, 9, 7)),
        (MaxPool2d(2), (3, 9, 7), (3, 4, 3)),
        (AvgPool2d(3), (3, 9, 7), (3, 3, 2)),
    ],
)
def test_layer_output_shapes_follow_torch(layer, in_shape, out_shape):
    """Each layer's output shape is torch.nn's (floor for strides and pools), checked on torch."""
    spec = ModelSpec(in_shape, (layer, Flatten(), Dense(2)))
    assert spec.blocks[-1].u_shape == (math.prod(out_shape),)
    torch = pytest.importorskip("torch")
    modules = {
        Conv2d: lambda c: torch.nn.Conv2d(in_shape[0], c.out_channels, c.kernel_size, c.stride, c.padding),
        MaxPool2d: lambda p: torch.nn.MaxPool2d(p.size),
        AvgPool2d: lambda p: torch.nn.AvgPool2d(p.size),
    }
    got = modules[type(layer)](layer)(torch.zeros((1, *in_shape)))
    assert tuple(got.shape[1:]) == out_shape


def test_spec_is_frozen_hashable_and_normalised():
    """Specs key compiled functions: equal specs hash equal, lists become tuples, fields are frozen."""
    a = lenet()
    b = ModelSpec([1, 28, 28], list(LENET_LAYERS), "tanh", "sigmoid", "sum", "float32")
    assert a == b and hash(a) == hash(b) and a.input_shape == (1, 28, 28) and isinstance(b.layers, tuple)
    assert {a: 1}[b] == 1
    assert ModelSpec((4,), (Dense(np.int64(3)),)) == ModelSpec((np.int64(4),), (Dense(3),))
    assert type(Dense(np.int64(3)).units) is int and type(Conv2d(2, 3, padding=np.int64(1)).padding) is int
    assert lenet(activation="relu") != a and hash(lenet(dtype="float64")) != hash(a)
    with pytest.raises(Exception):
        a.activation = "relu"
    with pytest.raises(Exception):
        a.layers[0].out_channels = 3
    assert pickle.loads(pickle.dumps(a)) == a
    # The cached blocks are not a field: they change neither equality nor the field list.
    assert a.blocks is a.blocks and "blocks" not in [f.name for f in dataclasses.fields(a)]


@pytest.mark.parametrize(
    "make,error,fragment",
    [
        # shapes that do not fit
        (lambda: ModelSpec((1, 4, 4), (Conv2d(2, 5), Flatten(), Dense(2))), ValueError, "kernel 5x5 is larger"),
        (lambda: ModelSpec((1, 4, 4), (MaxPool2d(5), Flatten(), Dense(2))), ValueError, "MaxPool2d(5) is larger"),
        (lambda: ModelSpec((1, 8, 8), (Conv2d(2, 3), Dense(2))), ValueError, "put Flatten() before it"),
        (lambda: ModelSpec((1, 8, 8), (Dense(2),)), ValueError, "Dense needs a flat (features,) input"),
        (lambda: ModelSpec((8,), (MaxPool2d(2), Dense(2))), ValueError, "needs a (C, H, W) input, got shape (8,)"),
        (lambda: ModelSpec((8,), (Conv2d(2, 3),)), ValueError, "needs a (C, H, W) input"),
        (lambda: ModelSpec((1, 8, 8), (Flatten(), MaxPool2d(2), Dense(2))), ValueError, "needs a (C, H, W)"),
        # how the model ends
        (lambda: ModelSpec((8,), (Dense(4), Flatten())), ValueError, "must end in a parametrised layer"),
        (lambda: ModelSpec((1, 8, 8), (Conv2d(2, 3), MaxPool2d(2))), ValueError, "must end in a parametrised"),
        (lambda: ModelSpec((1, 8, 8), (Conv2d(2, 3),)), ValueError, "last layer's output must be flat (n_L,)"),
        (lambda: ModelSpec((8,), ()), ValueError, "non-empty sequence of layers"),
        (lambda: ModelSpec((8,), Dense(2)), ValueError, "non-empty sequence of layers"),
        # layer fields
        (lambda: Conv2d(2, 3, padding=-1), ValueError, "Conv2d.padding must be an int >= 0 or 'same', got -1"),
        (lambda: Conv2d(2, 3, padding="valid"), ValueError, "Conv2d.padding must be an int >= 0 or 'same'"),
        (lambda: Conv2d(2, 3, padding=1.5), ValueError, "Conv2d.padding must be an int >= 0"),
        (lambda: Conv2d(2, 3, padding=True), ValueError, "Conv2d.padding must be an int >= 0"),
        (lambda: Conv2d(2, 3, stride=0), ValueError, "Conv2d.stride must be an int >= 1, got 0"),
        (lambda: Conv2d(2, 0), ValueError, "Conv2d.kernel_size must be an int >= 1, got 0"),
        (lambda: Conv2d(2.0, 3), ValueError, "Conv2d.out_channels must be an int >= 1, got 2.0"),
        (lambda: Conv2d(2, 4, padding="same"), ValueError, "needs stride 1 and an odd kernel_size"),
        (lambda: Conv2d(2, 3, stride=2, padding="same"), ValueError, "got stride 2, kernel_size 3"),
        (lambda: Dense(0), ValueError, "Dense.units must be an int >= 1, got 0"),
        (lambda: Dense(True), ValueError, "Dense.units must be an int >= 1"),
        (lambda: MaxPool2d(0), ValueError, "MaxPool2d.size must be an int >= 1"),
        (lambda: AvgPool2d(-2), ValueError, "AvgPool2d.size must be an int >= 1"),
        # input_shape
        (
            lambda: ModelSpec((1, 1, 28, 28), (Flatten(), Dense(2))),
            ValueError,
            "(T, D) or (C, H, W), got (1, 1, 28, 28)",
        ),
        (lambda: ModelSpec((), (Dense(2),)), ValueError, "(features,), (T, D) or (C, H, W)"),
        (lambda: ModelSpec(784, (Dense(2),)), ValueError, "(T, D) or (C, H, W), got 784"),
        (lambda: ModelSpec("784", (Dense(2),)), ValueError, "(features,), (T, D) or (C, H, W)"),
        (lambda: ModelSpec((1, 0, 28), (Flatten(), Dense(2))), ValueError, "must hold ints >= 1, got (1, 0, 28)"),
        (lambda: ModelSpec((4.0,), (Dense(2),)), ValueError, "must hold ints >= 1"),
        # unknown layers
        (lambda: ModelSpec((8,), (Dense(4), "relu", Dense(2))), TypeError, "layers[1] must be one of"),
        (lambda: ModelSpec((8,), ((8, 2),)), TypeError, "got (8, 2)"),
        # choices
        (lambda: ModelSpec((8,), (Dense(2),), activation="gelu"), ValueError, "activation must be one of"),
        (lambda: ModelSpec((8,), (Dense(2),), output="tanh"), ValueError, "output must be one of"),
        (lambda: ModelSpec((8,), (Dense(2),), reduction="max"), ValueError, "reduction must be one of"),
        (lambda: ModelSpec((8,), (Dense(2),), dtype="float16"), ValueError, "dtype must be one of ['float32', "),
    ],
)
def test_bad_models_and_layers_are_refused_with_a_message(make, error, fragment):
    """Each bad model or layer is refused at construction with a message naming what was wrong."""
    with pytest.raises(error) as info:
        make()
    assert fragment in str(info.value)


def test_dense_only_model_reads_like_the_mlp():
    """A Dense-only ModelSpec has the MLPSpec's shapes, counts and loss."""
    model = ModelSpec((7,), (Dense(5), Dense(4), Dense(3)), "relu", "softmax", "mean", "float64")
    mlp = MLPSpec((7, 5, 4, 3), "relu", "softmax", "mean", "float64")
    for name in ("num_layers", "num_hidden", "n_in", "n_out", "loss", "param_shapes", "feedback_shapes"):
        assert getattr(model, name) == getattr(mlp, name), name
    assert model.num_params() == mlp.num_params()


@pytest.mark.parametrize("init", ["default", "zeros"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dense_only_model_gets_the_mlps_exact_params_and_feedback(init, dtype):
    """Same seed, same draws: a Dense-only ModelSpec's params and feedback equal the MLPSpec's bit for bit."""
    model = ModelSpec((7,), (Dense(5), Dense(4), Dense(3)), dtype=dtype)
    mlp = MLPSpec((7, 5, 4, 3), dtype=dtype)
    for got, want in zip(init_params(model, 11, init), init_params(mlp, 11, init)):
        for g, w in zip(got, want):
            assert g.dtype == w.dtype == np.dtype(dtype) and np.array_equal(g, w)
    for kwargs in (dict(), dict(dist="uniform", scale=0.3), dict(transform=np.tanh)):
        got, want = init_feedback(model, 5, **kwargs), init_feedback(mlp, 5, **kwargs)
        assert len(got) == len(want) == 2
        assert all(g.dtype == np.dtype(dtype) and np.array_equal(g, w) for g, w in zip(got, want))


def test_conv_init_is_torchs_default_distribution_drawn_in_block_order():
    """W_l, b_l ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C_in * k * k for convs, drawn W then b per block."""
    spec = lenet(dtype="float64")
    params = init_params(spec, seed=3)
    assert [(w.shape, b.shape) for w, b in params] == list(spec.param_shapes)
    rng = np.random.default_rng(3)
    for (w, b), block in zip(params, spec.blocks):
        bound = 1 / np.sqrt(block.fan_in)
        assert w.dtype == b.dtype == np.float64
        assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
        # Uniform on [-c, c] has std c/sqrt(3): the width, not only the bound (W_1 has 150 numbers).
        np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.15)
        np.testing.assert_array_equal(w, rng.uniform(-bound, bound, size=w.shape))
        np.testing.assert_array_equal(b, rng.uniform(-bound, bound, size=b.shape))
    again = init_params(spec, seed=3)
    assert all(np.array_equal(p, q) for pair, qair in zip(params, again) for p, q in zip(pair, qair))
    assert not np.array_equal(params[0][0], init_params(spec, seed=4)[0][0])
    f32 = init_params(lenet(), seed=3)
    assert all(a.dtype == np.float32 for pair in f32 for a in pair)
    np.testing.assert_array_equal(f32[0][0], params[0][0].astype(np.float32))
    zeros = init_params(spec, init="zeros")
    assert zeros[0][0].shape == (6, 1, 5, 5) and not any(a.any() for pair in zeros for a in pair)


def test_conv_init_matches_torchs_bound():
    """torch.nn.Conv2d's own default init stays inside the same bound, and fills it (same distribution)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 16, 5)
    fan_in = lenet().blocks[1].fan_in
    assert fan_in == 6 * 5 * 5
    bound = 1 / np.sqrt(fan_in)
    w = conv.weight.detach().numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert np.abs(conv.bias.detach().numpy()).max() <= bound


def test_conv_feedback_one_matrix_per_hidden_block():
    """B_l is (size of a_l, n_L) for each hidden block, drawn in block order from one generator."""
    spec = lenet(dtype="float64")
    fb = init_feedback(spec, seed=1)
    assert [b.shape for b in fb] == [(4704, 10), (1600, 10), (120, 10), (84, 10)]
    rng = np.random.default_rng(1)
    for b in fb:
        np.testing.assert_array_equal(b, rng.normal(0.0, 1.9, size=b.shape))
    np.testing.assert_allclose(fb[0].std(), 1.9, rtol=0.03)
    assert all(np.array_equal(p, q) for p, q in zip(fb, init_feedback(spec, seed=1)))
    assert init_feedback(ModelSpec((1, 8, 8), (Flatten(), Dense(3))), seed=1) == ()
    with pytest.raises(ValueError, match=r"B_1 must have shape \(4704, 10\), got \(10, 4704\)"):
        init_feedback(spec, matrices=[np.ones((10, 4704))] + [np.ones(s) for s in spec.feedback_shapes[1:]])
    with pytest.raises(ValueError, match="expected 4 feedback matrices"):
        init_feedback(spec, matrices=[np.ones((4704, 10))])


def test_init_refuses_other_specs():
    for make in (init_params, init_feedback):
        with pytest.raises(TypeError, match="spec must be a dfa_core.MLPSpec or dfa_core.ModelSpec, got tuple"):
            make((784, 10))


SMALL = ModelSpec((2, 6, 6), (Conv2d(3, 3), AvgPool2d(2), Flatten(), Dense(5), Dense(4)), dtype="float64")


def _good(spec=SMALL, batch=3):
    x = np.zeros((batch, *spec.input_shape), spec.dtype)
    y = np.eye(spec.n_out, dtype=spec.dtype)[np.arange(batch) % spec.n_out]
    return init_params(spec, 0), init_feedback(spec, 1), x, y


def test_checks_accept_a_good_model_batch():
    params, feedback, x, y = _good()
    validation.check_spec(SMALL)
    validation.check_params(SMALL, params)
    validation.check_feedback(SMALL, feedback)
    assert validation.check_x(SMALL, x) == 3 and validation.check_batch(SMALL, x, y) == 3
    flat = ModelSpec((6,), (Dense(4), Dense(2)))
    assert validation.check_batch(flat, np.zeros((5, 6)), np.zeros((5, 2))) == 5


def _swap_first(params, w):
    return ((w, params[0][1]),) + tuple(params[1:])


@pytest.mark.parametrize(
    "check,error,fragment",
    [
        (lambda p, f, x, y: validation.check_spec("lenet"), TypeError, "spec must be a dfa_core.MLPSpec or"),
        (
            lambda p, f, x, y: validation.check_params(SMALL, p[:2]),
            ValueError,
            "expected 3 (W, b) pairs for the model's 3 Dense/Conv2d layers, got 2",
        ),
        (
            lambda p, f, x, y: validation.check_params(SMALL, _swap_first(p, np.zeros((3, 2, 9)))),
            ValueError,
            "W_1 must have shape (3, 2, 3, 3) (Conv2d: out_channels, in_channels, k, k), got (3, 2, 9)",
        ),
        (
            lambda p, f, x, y: validation.check_params(SMALL, _swap_first(p, p[0][0].astype(np.float32))),
            TypeError,
            "W_1 must have dtype float64 (spec.dtype), got float32",
        ),
        (
            lambda p, f, x, y: validation.check_params(SMALL, (p[0], (np.zeros((5, 3)), p[1][1]), p[2])),
            ValueError,
            "W_2 must have shape (5, 12) (Dense: units, in_features), got (5, 3)",
        ),
        (
            lambda p, f, x, y: validation.check_feedback(SMALL, f[:1]),
            ValueError,
            "expected 2 matrices (one per hidden layer, shapes [(48, 4), (5, 4)]), got 1",
        ),
        (
            lambda p, f, x, y: validation.check_feedback(SMALL, (np.zeros((12, 4)), f[1])),
            ValueError,
            "B_1 must have shape (48, 4) (size of a_1 = 3 * 4 * 4, n_L), got (12, 4)",
        ),
        (
            lambda p, f, x, y: validation.check_feedback(SMALL, (f[0], np.zeros((4, 5)))),
            ValueError,
            "B_2 must have shape (5, 4) (n_2, n_L), got (4, 5)",
        ),
        (
            lambda p, f, x, y: validation.check_x(SMALL, x.reshape(3, 72)),
            ValueError,
            "x must have shape (batch, 2, 6, 6) with batch >= 1, got (3, 72); flat images need "
            "x.reshape(-1, 2, 6, 6) first",
        ),
        (
            lambda p, f, x, y: validation.check_x(SMALL, x[:, :1]),
            ValueError,
            "x must have shape (batch, 2, 6, 6) with batch >= 1, got (3, 1, 6, 6)",
        ),
        (
            lambda p, f, x, y: validation.check_x(SMALL, x[:0]),
            ValueError,
            "x must have shape (batch, 2, 6, 6) with batch >= 1, got (0, 2, 6, 6)",
        ),
        (lambda p, f, x, y: validation.check_x(SMALL, x[0, 0, 0, 0]), ValueError, "got ()"),
        (lambda p, f, x, y: validation.check_x(SMALL, x.tolist()), TypeError, "x must be an array"),
        (lambda p, f, x, y: validation.check_x(SMALL, x.astype(complex)), TypeError, "real numeric dtype"),
        (
            lambda p, f, x, y: validation.check_batch(SMALL, x, y[:2]),
            ValueError,
            "y must have shape (batch, n_L) = (3, 4) to match x, got (2, 4)",
        ),
        (
            lambda p, f, x, y: validation.check_x(ModelSpec((6,), (Dense(2),)), np.zeros((2, 1, 6))),
            ValueError,
            "x must have shape (batch, 6) with batch >= 1, got (2, 1, 6)",
        ),
    ],
)
def test_checks_refuse_bad_model_inputs_naming_expected_and_got(check, error, fragment):
    """Every check says what it expected and what arrived, in the model's own terms."""
    params, feedback, x, y = _good()
    with pytest.raises(error) as info:
        check(params, feedback, x, y)
    assert fragment in str(info.value)


def test_mlp_messages_are_unchanged():
    """The MLP wording stays as it was (tests/test_bad_input.py matches on it)."""
    spec = MLPSpec((6, 5, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 6\) with batch >= 1, got \(2, 5\)$"):
        validation.check_x(spec, np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"expected 2 \(W, b\) pairs for layer_sizes \(6, 5, 3\), got 1"):
        validation.check_params(spec, init_params(spec)[:1])
    with pytest.raises(ValueError, match=r"params: W_1 must have shape \(5, 6\), got \(6, 5\)$"):
        validation.check_params(
            spec, ((np.zeros((6, 5), np.float32), np.zeros(5, np.float32)),) + init_params(spec)[1:]
        )
    with pytest.raises(ValueError, match=r"B_1 must have shape \(5, 3\) \(n_1, n_L\), got \(3, 5\)$"):
        validation.check_feedback(spec, (np.zeros((3, 5), np.float32),))
    with pytest.raises(TypeError, match="spec must be a dfa_core.MLPSpec or dfa_core.ModelSpec, got str"):
        validation.check_spec("mlp")
