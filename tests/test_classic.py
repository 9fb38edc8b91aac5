"""The report's PyTorch API (dfa_torch.classic) against the functional core, in float64."""

import numpy as np
import pytest
import torch

import dfa_torch
from dfa_core import MLPSpec, init_feedback, init_params
from dfa_torch import classic

SPEC = MLPSpec((6, 5, 4, 3), activation="tanh", output="sigmoid", reduction="sum", dtype="float64")
N, BATCH, EPOCHS, LR, SEED = 23, 5, 3, 0.05, 3  # 23 = 4 full batches + one of 3
RTOL, ATOL = 1e-10, 1e-13  # atol only for entries that are ~0

LOOPS = {
    "sample": classic.train_dfa,
    "batch_mean": classic.train_dfa_batch_averaged,
    "class_mean": classic.train_dfa_class_averaged,
}


def _data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, SPEC.n_in))
    y = np.eye(SPEC.n_out)[rng.integers(0, SPEC.n_out, n)]
    return x, y


def _labels_wrong(y_hat, y):
    return int(np.sum(np.argmax(y_hat, axis=1) != np.argmax(y, axis=1)))


def _bce_mean(y_hat, y):
    return float(np.mean(-(y * np.log(y_hat) + (1 - y) * np.log(1 - y_hat))))


def _functional_run(mode, x, y, feedback, method="dfa"):
    """The same training written with the functional core: W -= lr * g per batch, same batches."""
    params = init_params(SPEC, seed=0)
    generator = torch.Generator().manual_seed(SEED)
    te, losses = [], []
    for _ in range(EPOCHS):
        perm = torch.randperm(N, generator=generator).numpy()
        wrong, loss = 0, 0.0
        for start in range(0, N, BATCH):
            idx = perm[start : start + BATCH]
            y_hat = dfa_torch.to_numpy(dfa_torch.forward(SPEC, dfa_torch.asarray(params), torch.from_numpy(x[idx])))
            wrong += _labels_wrong(y_hat, y[idx])
            loss += _bce_mean(y_hat, y[idx])
            if method == "dfa":
                grads = dfa_torch.dfa_grads(SPEC, params, feedback, x[idx], y[idx], mode)
            else:
                grads = dfa_torch.bp_grads(SPEC, params, x[idx], y[idx])
            grads = dfa_torch.to_numpy(grads)
            params = tuple((w - LR * gw, b - LR * gb) for (w, b), (gw, gb) in zip(params, grads))
        te.append(wrong / N)
        losses.append(loss)
    return params, te, losses


def _assert_params_close(got, want):
    for (w, b), (w_ref, b_ref) in zip(got, want):
        np.testing.assert_allclose(w, w_ref, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(b, b_ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", list(LOOPS))
def test_classic_dfa_loop_equals_functional_sgd(mode):
    """Each report loop makes the same weight updates as dfa_grads(mode, reduction 'sum') with
    W -= lr * g on the same batches; training error and loss lists agree too."""
    x, y = _data()
    feedback = init_feedback(SPEC, seed=1)
    model = classic.model_from_spec(SPEC, seed=0)
    te, losses = LOOPS[mode](model, x, y, n_epochs=EPOCHS, lr=LR, batch_size=BATCH, seed=SEED, feedback=feedback)
    params_ref, te_ref, losses_ref = _functional_run(mode, x, y, feedback)
    _assert_params_close(dfa_torch.to_numpy(classic.params_from_model(model)), params_ref)
    assert te == pytest.approx(te_ref, abs=0)
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-10)


def test_classic_backprop_loop_equals_functional_sgd():
    """train_backprop is SGD on the summed BCE: the same updates as bp_grads with W -= lr * g."""
    x, y = _data()
    model = classic.model_from_spec(SPEC, seed=0)
    te, losses = classic.train_backprop(model, x, y, n_epochs=EPOCHS, lr=LR, batch_size=BATCH, seed=SEED)
    params_ref, te_ref, losses_ref = _functional_run("sample", x, y, None, method="bp")
    _assert_params_close(dfa_torch.to_numpy(classic.params_from_model(model)), params_ref)
    assert te == pytest.approx(te_ref, abs=0)
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-10)


def test_dfa_backward_pass_is_minus_the_functional_gradient():
    """dfa_backward_pass in the features-major layout returns -dfa_grads ('sample', 'sum'),
    biases as columns."""
    x, y = _data(n=7)
    model = classic.model_from_spec(SPEC, seed=0)
    feedback = init_feedback(SPEC, seed=1)
    a, h, y_hat = model.forward_pass_train(torch.from_numpy(x))
    with torch.no_grad():
        dW, db = model.dfa_backward_pass(
            (y_hat - torch.from_numpy(y)).T, [t.T for t in h], [t.T for t in a], [torch.from_numpy(b) for b in feedback]
        )
    grads = dfa_torch.to_numpy(dfa_torch.dfa_grads(SPEC, init_params(SPEC, 0), feedback, x, y, "sample"))
    for dw, dbias, (gw, gb) in zip(dW, db, grads):
        assert dbias.shape == (gb.shape[0], 1)
        np.testing.assert_allclose(dw.numpy(), -gw, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(dbias.numpy()[:, 0], -gb, rtol=RTOL, atol=ATOL)


def test_forward_passes_match_the_functional_core():
    """forward_pass_train gives (hidden a, h with the input, y_hat) as forward_with_activations."""
    x, _ = _data(n=7)
    model = classic.model_from_spec(SPEC, seed=0)
    a, h, y_hat = model.forward_pass_train(torch.from_numpy(x))
    acts = dfa_torch.forward_with_activations(SPEC, dfa_torch.asarray(init_params(SPEC, 0)), torch.from_numpy(x))
    assert len(a) == SPEC.num_hidden and len(h) == SPEC.num_layers
    for got, want in zip(a + h, acts.a[:-1] + acts.h):
        np.testing.assert_allclose(got.detach().numpy(), want.numpy(), rtol=1e-12)
    np.testing.assert_allclose(y_hat.detach().numpy(), acts.y_hat.numpy(), rtol=1e-12)
    np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), acts.y_hat.numpy(), rtol=1e-12)


def test_params_round_trip():
    """params_from_model / model_from_params / load_params preserve the parameters and dtype."""
    params = init_params(SPEC, seed=5)
    model = classic.model_from_params(params, torch.tanh, lambda a: 1 - torch.tanh(a) ** 2)
    assert model.layer_sizes == list(SPEC.layer_sizes)
    assert model.layers[0].weight.dtype == torch.float64
    for (w, b), (w_ref, b_ref) in zip(dfa_torch.to_numpy(classic.params_from_model(model)), params):
        np.testing.assert_array_equal(w, w_ref)
        np.testing.assert_array_equal(b, b_ref)
    copied = classic.params_from_model(model)
    copied[0][0].zero_()  # a copy: the model is untouched
    assert torch.count_nonzero(model.layers[0].weight) > 0


def test_summary_prints_real_layer_indices(capsys):
    """summary's table has one row per layer, indexed 0..L-1 (the report printed a literal 'i')."""
    model = classic.model_from_spec(SPEC)
    model.summary((1, SPEC.n_in))
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    table = [r for r in rows if r and r[0].isdigit()]
    assert [r[0] for r in table] == ["0", "1", "2"]
    assert not any(r and r[0] == "i" for r in rows)
    assert [r[-1] for r in table] == ["tanh", "tanh", "sigmoid"]


def test_tol_compares_from_the_second_epoch():
    """With tol large, the loop stops after epoch 2, never after epoch 1 (the report compared
    epoch 1 with an initial 0); tol=None runs every epoch."""
    x, y = _data()
    for loop in list(LOOPS.values()) + [classic.train_backprop]:
        te, losses = loop(classic.model_from_spec(SPEC), x, y, n_epochs=5, lr=LR, batch_size=BATCH, tol=1.0)
        assert len(te) == len(losses) == 2
        te, _ = loop(classic.model_from_spec(SPEC), x, y, n_epochs=4, lr=LR, batch_size=BATCH, tol=None)
        assert len(te) == 4


@pytest.mark.parametrize("mode", list(LOOPS))
def test_training_error_is_counted_per_sample_over_classes(mode):
    """All loops count errors on the samples with argmax over the class axis: with a negligible
    lr, te equals the fraction the initial model misclassifies."""
    x, y = _data(n=40)
    model = classic.model_from_spec(SPEC)
    y_hat = model(torch.from_numpy(x)).detach().numpy()
    te, _ = LOOPS[mode](model, x, y, n_epochs=1, lr=1e-300, batch_size=8)
    assert te == [_labels_wrong(y_hat, y) / 40]


def test_shuffling_and_feedback_are_seeded():
    """The same seed gives the same run and feedback; another seed another one."""
    x, y = _data()
    runs = [
        classic.train_dfa(
            classic.model_from_spec(SPEC), x, y, n_epochs=2, lr=LR, batch_size=BATCH, seed=s, return_feedback=True
        )
        for s in (7, 7, 8)
    ]
    assert runs[0][:2] == runs[1][:2]
    for b0, b1, b2 in zip(runs[0][2], runs[1][2], runs[2][2]):
        assert torch.equal(b0, b1) and not torch.equal(b0, b2)
    assert [tuple(b.shape) for b in runs[0][2]] == list(SPEC.feedback_shapes)


def test_default_feedback_is_normal_with_std_1_9():
    """The report's B_l ~ N(0, 1.9^2), drawn by the seeded generator, shaped (n_l, n_L)."""
    model = classic.DynamicModel([3, 400, 50], torch.tanh, lambda a: 1 - torch.tanh(a) ** 2).double()
    x, y = np.zeros((2, 3)), np.eye(50)[:2]
    _, _, (b,) = classic.train_dfa(model, x, y, n_epochs=1, lr=1e-3, return_feedback=True)
    assert b.shape == (400, 50)
    assert float(b.std()) == pytest.approx(1.9, rel=0.03)
    assert abs(float(b.mean())) < 5 * 1.9 / np.sqrt(b.numel())  # 5 standard errors


def test_matrix_transfo_is_applied():
    """matrix_transfo transforms each drawn B_l (the report's hook)."""
    x, y = _data()
    _, _, b_plain = classic.train_dfa(classic.model_from_spec(SPEC), x, y, n_epochs=1, return_feedback=True)
    _, _, b_abs = classic.train_dfa(
        classic.model_from_spec(SPEC), x, y, n_epochs=1, matrix_transfo=torch.abs, return_feedback=True
    )
    for p, q in zip(b_plain, b_abs):
        assert torch.equal(p.abs(), q)


def test_xor_is_learned_by_the_basic_loop():
    """The report's XOR check: 2-8-1 tanh/sigmoid trained by DFA classifies all 4 points."""
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
    y = np.array([[0], [1], [1], [0]], dtype=np.float64)
    torch.manual_seed(0)  # only nn.Linear's initial draw; the loop itself is seeded
    model = classic.DynamicModel([2, 8, 1], torch.tanh, lambda a: 1 - torch.tanh(a) ** 2).double()
    te, _ = classic.train_dfa(model, x, y, n_epochs=1500, lr=0.1, batch_size=4, seed=0)
    assert te[-1] == 0.0
    pred = (model(torch.from_numpy(x)) > 0.5).double().numpy()
    np.testing.assert_array_equal(pred, y)


def _model():
    return classic.model_from_spec(SPEC)


BAD_CALLS = {
    "model_not_dynamic": (lambda x, y: classic.train_dfa(torch.nn.Linear(6, 3), x, y), TypeError, "DynamicModel"),
    "x_wrong_width": (lambda x, y: classic.train_dfa(_model(), x[:, :4], y), ValueError, r"x must have shape \(N, 6\)"),
    "y_wrong_rows": (lambda x, y: classic.train_dfa(_model(), x, y[:-1]), ValueError, r"y must have shape"),
    "x_nan": (lambda x, y: classic.train_dfa(_model(), np.full_like(x, np.nan), y), ValueError, "finite"),
    "n_epochs_zero": (lambda x, y: classic.train_dfa(_model(), x, y, n_epochs=0), ValueError, "n_epochs"),
    "lr_negative": (lambda x, y: classic.train_dfa(_model(), x, y, lr=-1.0), ValueError, "lr must be"),
    "batch_size_float": (lambda x, y: classic.train_dfa(_model(), x, y, batch_size=2.5), TypeError, "batch_size"),
    "tol_negative": (lambda x, y: classic.train_dfa(_model(), x, y, tol=-1), ValueError, "tol"),
    "error_function": (lambda x, y: classic.train_dfa(_model(), x, y, error_function=3), TypeError, "error_function"),
    "feedback_count": (
        lambda x, y: classic.train_dfa(_model(), x, y, feedback=[np.zeros((5, 3))]),
        ValueError,
        "expected 2 matrices",
    ),
    "feedback_shape": (
        lambda x, y: classic.train_dfa(_model(), x, y, feedback=[np.zeros((5, 3)), np.zeros((3, 3))]),
        ValueError,
        r"B_2 must be a tensor of shape \(4, 3\)",
    ),
    "seed_negative": (lambda x, y: classic.train_dfa(_model(), x, y, seed=-1), TypeError, "seed"),
    "layer_sizes_short": (lambda x, y: classic.DynamicModel([3], torch.tanh, torch.tanh), ValueError, "at least 2"),
    "layer_size_zero": (
        lambda x, y: classic.DynamicModel([3, 0, 2], torch.tanh, torch.tanh),
        ValueError,
        r"layer_sizes\[1\] must be positive",
    ),
    "act_not_callable": (lambda x, y: classic.DynamicModel([3, 2], "tanh", torch.tanh), TypeError, "act_function"),
    "summary_shape": (lambda x, y: _model().summary((1, 5)), ValueError, "input width 6"),
    "backward_lists": (
        lambda x, y: _model().dfa_backward_pass(torch.zeros(3, 1), [], [], []),
        ValueError,
        "2 hidden layers",
    ),
    "load_params_shape": (
        lambda x, y: classic.load_params(_model(), init_params(MLPSpec((6, 5, 3)))),
        ValueError,
        "expected 3",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_inputs_raise_clear_errors(case):
    """Bad models, data and hyper-parameters are refused before training, naming what was expected."""
    call, error, match = BAD_CALLS[case]
    x, y = _data()
    with pytest.raises(error, match=match):
        call(x, y)


# The report author's own names and defaults (issue 9, item 20).
AUTHOR_ALIASES = {
    "train_basic": (classic.train_dfa, classic.FEEDBACK_STD),
    "train_averaged": (classic.train_dfa_batch_averaged, 1.0),
    "MNIST_train_class_averaged": (classic.train_dfa_class_averaged, 1.0),
}


@pytest.mark.parametrize("name", list(AUTHOR_ALIASES))
def test_author_aliases_keep_signature_defaults_and_feedback_draw(name):
    """Each alias has the author's defaults (lr 1e-3, tol 0.1) and trains exactly like the project's
    loop given the author's B: std 1.9 for the basic loop, std 1 (torch.randn) for the averaged ones."""
    import inspect

    alias = getattr(classic, name)
    defaults = {k: p.default for k, p in inspect.signature(alias).parameters.items()}
    assert defaults["n_epochs"] == 10 and defaults["lr"] == 1e-3 and defaults["batch_size"] == 200
    assert defaults["tol"] == 0.1
    if name == "MNIST_train_class_averaged":
        assert defaults["classes"] == 10
    loop, std = AUTHOR_ALIASES[name]
    x, y = _data()
    model_a = classic.model_from_spec(SPEC, init_params(SPEC, seed=0))
    model_b = classic.model_from_spec(SPEC, init_params(SPEC, seed=0))
    extra = {"classes": SPEC.n_out} if name == "MNIST_train_class_averaged" else {}
    te_a, loss_a = alias(model_a, x, y, 2, 0.05, BATCH, None, **extra)
    # The loop's own draw (same generator stream, seed 0) rescaled from std 1.9 to the author's std.
    te_b, loss_b = loop(
        model_b, x, y, 2, 0.05, BATCH, None, seed=0, matrix_transfo=lambda b: b * (std / classic.FEEDBACK_STD)
    )
    assert te_a == te_b
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-12)
    for la, lb in zip(model_a.layers, model_b.layers):
        np.testing.assert_allclose(la.weight.detach().numpy(), lb.weight.detach().numpy(), rtol=1e-12)


def test_class_averaged_alias_checks_classes():
    model = classic.model_from_spec(SPEC, init_params(SPEC, seed=0))
    x, y = _data()
    with pytest.raises(ValueError, match="classes must equal the model's number of outputs"):
        classic.MNIST_train_class_averaged(model, x, y, classes=10)
