"""Architecture strings, RunConfig.arch and the CLI's --arch / summary on models of blocks."""

from __future__ import annotations

import json
import os

import pytest

from dfa_core import Conv2d, Dense, Flatten, MaxPool2d, ModelSpec, Residual, TransformerBlock, resnet_basic_block
from dfa_train.arch import ARCHS, describe_layers, format_arch, parse_arch
from dfa_train.checkpoint import load_checkpoint
from dfa_train.cli import main
from dfa_train.config import ConfigError, RunConfig


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_named_architectures_round_trip(name):
    layers = parse_arch(name)
    assert parse_arch(format_arch(layers)) == layers
    assert format_arch(layers) == ARCHS[name]


def test_tokens_parse_to_layers():
    assert parse_arch("conv6k5p2, conv8k3psame ,conv4k3s2,maxpool2,flatten,dense10") == (
        Conv2d(6, 5, padding=2),
        Conv2d(8, 3, padding="same"),
        Conv2d(4, 3, stride=2),
        MaxPool2d(2),
        Flatten(),
        Dense(10),
    )


def test_composite_tokens_round_trip():
    layers = parse_arch("conv8k3psame,res8,res16s2,transformer2h8")
    assert layers[1] == resnet_basic_block(8) and layers[2] == resnet_basic_block(16, stride=2)
    assert layers[3] == TransformerBlock(2, 8)
    assert format_arch(layers) == "conv8k3psame,res8,res16s2,transformer2h8"


def test_layers_without_a_token_are_described_in_full():
    odd = (Residual(Dense(4), Dense(4)), Dense(2))
    with pytest.raises(TypeError, match="no token"):
        format_arch(odd)
    assert describe_layers(odd).startswith("Residual(layers=(Dense(units=4)")


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "non-empty string"),
        ("conv6k5,pool2", "token 2: unknown layer 'pool2'"),
        ("dense0", "Dense.units must be an int >= 1"),
        ("conv6k4s2psame", "'same' needs stride 1"),
    ],
)
def test_bad_architectures_say_what_is_wrong(text, match):
    with pytest.raises(ValueError, match=match):
        parse_arch(text)


def test_run_config_builds_a_model_spec_from_the_dataset_shape():
    spec = RunConfig(arch="lenet5", dataset="mnist-slice").spec()
    assert isinstance(spec, ModelSpec) and spec.input_shape == (1, 28, 28) and spec.n_out == 10
    cifar = RunConfig(arch="convnet6", dataset="cifar10").spec()
    assert cifar.input_shape == (3, 32, 32)


def test_run_config_arch_errors_name_the_field():
    with pytest.raises(ConfigError, match="RunConfig.layers: expected None with arch"):
        RunConfig(arch="lenet5", layers=(784, 10))
    with pytest.raises(ConfigError, match=r"RunConfig.arch: .*Conv2d needs a \(C, H, W\) input.*dataset 'xor'"):
        RunConfig(arch="lenet5", dataset="xor")


def test_a_version_1_config_still_reads_as_an_mlp():
    data = RunConfig().to_dict()
    data.pop("arch")
    data["version"] = 1
    assert RunConfig.from_json(json.dumps(data)) == RunConfig()


def test_summary_prints_shapes_feedback_and_flops(capsys):
    assert main(["summary", "--arch", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert "(16, 10, 10)" in out and "(4704, 10)" in out
    assert "forward FLOPs per sample: 845,862" in out and "total parameters: 61706" in out


def test_summary_of_a_resnet(capsys):
    assert main(["summary", "--arch", "resnet8", "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert "res32s2" in out and "(32, 16, 16)" in out and "(64, 8, 8)" in out


def test_train_and_resume_a_conv_net(tmp_path, capsys):
    out = str(tmp_path / "run")
    common = [
        "--backend",
        "torch",
        "--arch",
        "conv4k5s2,res4,maxpool2,flatten,dense10",
        "--dataset",
        "mnist-slice",
        "--limit-train",
        "100",
        "--limit-test",
        "50",
        "--activation",
        "relu",
        "--output",
        "softmax",
        "--reduction",
        "mean",
        "--feedback-scale",
        "0.05",
        "--align-every",
        "1",
        "--no-plots",
        "--progress",
        "off",
    ]
    assert main(["train", *common, "--epochs", "1", "--out", out]) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["arch"] == "conv4k5s2,res4,maxpool2,flatten,dense10" and config["layers"] is None
    assert main(["train", "--resume", out, "--epochs", "2"]) == 0
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.npz"))
    assert ckpt.resume.epoch == 2
    assert ckpt.params[0][0].shape == (4, 1, 5, 5) and ckpt.feedback[0].shape == (4 * 12 * 12, 10)
    assert len(ckpt.params[1]) == 4  # the residual block's two convolutions
    history = [json.loads(line) for line in open(os.path.join(out, "history.jsonl"))]
    assert len(history[1]["alignment"]) == 1 and len(history[1]["alignment"][0]["weights"]) == 3
    assert "DFA: 2 epochs" in capsys.readouterr().out
