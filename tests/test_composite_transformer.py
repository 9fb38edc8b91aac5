"""TransformerBlock: (T, D) specs, torch.nn.TransformerEncoderLayer's math, and the sequence example
trained by DFA and BP on both backends."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dfa_core import Dense, Flatten, ModelSpec, init_params
from dfa_core.model import TransformerBlock, layer_flops

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sequence_transformer.py"


def test_token_specs_shapes_and_init():
    """(T, D) inputs, a (T, D) -> (T, D) block with 12 flat params, identity out_activation, LN at (1, 0)."""
    spec = ModelSpec((5, 8), (TransformerBlock(2, 6), Flatten(), Dense(3)), dtype="float64")
    block = spec.blocks[0]
    assert block.a_shape == (5, 8) and spec.feedback_shapes == ((40, 3),)
    assert block.param_shapes[2] == (24, 8) and block.param_shapes[8] == (6, 8) and len(block.param_shapes) == 12
    assert block.out_activation(spec.activation) == "identity"
    params = init_params(spec, seed=0)[0]
    assert np.all(params[0] == 1) and np.all(params[1] == 0) and np.abs(params[2]).max() <= 1 / np.sqrt(8)
    assert np.abs(params[10]).max() <= 1 / np.sqrt(6) and np.abs(params[10]).max() > 1 / np.sqrt(8)
    assert block.flops() == layer_flops(block.layer, (5, 8)) > 0


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda: ModelSpec((5, 8), (TransformerBlock(3, 6), Flatten(), Dense(3))), "heads 3 must divide"),
        (lambda: ModelSpec((1, 5, 8), (TransformerBlock(2, 6), Flatten(), Dense(3))), "needs a (T, D) token input"),
        (lambda: TransformerBlock(0, 6), "TransformerBlock.heads must be an int >= 1"),
        (lambda: ModelSpec((5, 8), (TransformerBlock(2, 6),)), "last layer's output must be flat"),
    ],
)
def test_bad_transformer_specs_are_refused(make, fragment):
    with pytest.raises(ValueError) as info:
        make()
    assert fragment in str(info.value)


def test_torch_block_is_torchs_pre_norm_encoder_layer():
    """Logits and BP grads equal torch.nn.TransformerEncoderLayer(norm_first=True, dropout=0) + Linear (float64)."""
    torch = pytest.importorskip("torch")
    from dfa_torch import blocks

    spec = ModelSpec((5, 8), (TransformerBlock(2, 6), Flatten(), Dense(3)), "relu", "identity", "sum", "float64")
    params = init_params(spec, seed=3)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 6, dropout=0.0, batch_first=True, norm_first=True).double()
    head = torch.nn.Linear(40, 3).double()
    g1, b1, wqkv, bqkv, wo, bo, g2, b2, w1, bb1, w2, bb2 = (torch.from_numpy(p) for p in params[0])
    named = {
        "self_attn.in_proj_weight": wqkv,
        "self_attn.in_proj_bias": bqkv,
        "self_attn.out_proj.weight": wo,
        "self_attn.out_proj.bias": bo,
        "linear1.weight": w1,
        "linear1.bias": bb1,
        "linear2.weight": w2,
        "linear2.bias": bb2,
        "norm1.weight": g1,
        "norm1.bias": b1,
        "norm2.weight": g2,
        "norm2.bias": b2,
    }
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(named[name])
        head.weight.copy_(torch.from_numpy(params[1][0]))
        head.bias.copy_(torch.from_numpy(params[1][1]))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 5, 8)), np.eye(3)[[0, 1, 2, 0]]
    z = head(layer(torch.from_numpy(x)).reshape(4, -1))
    P = tuple(tuple(torch.from_numpy(t) for t in block) for block in params)
    np.testing.assert_allclose(blocks._logits(spec, P, torch.from_numpy(x)).numpy(), z.detach().numpy(), rtol=1e-12)
    (0.5 * ((z - torch.from_numpy(y)) ** 2).sum()).backward()
    grads = blocks.bp_grads_unchecked(spec, P, torch.from_numpy(x), torch.from_numpy(y))
    for name, got in zip(
        ["norm1.weight", "norm1.bias", "self_attn.in_proj_weight", "self_attn.in_proj_bias"], grads[0][:4]
    ):
        np.testing.assert_allclose(
            got.numpy(), dict(layer.named_parameters())[name].grad.numpy(), rtol=1e-10, atol=1e-12
        )  # atol: the key bias has a zero gradient (softmax ignores it), here rounding noise
    np.testing.assert_allclose(grads[0][10].numpy(), layer.linear2.weight.grad.numpy(), rtol=1e-10)


def _example():
    spec = importlib.util.spec_from_file_location("sequence_transformer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_sequence_example_learns_by_dfa_and_bp(backend):
    """The example's transformer reaches far above chance (0.5) by DFA and by BP in a few seconds."""
    example = _example()
    for method in ("dfa", "bp"):
        acc = example.train(backend, method, steps=60)
        assert acc > 0.9, f"{method} on {backend}: accuracy {acc}"
