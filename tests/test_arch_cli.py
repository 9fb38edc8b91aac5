"""Architecture strings, RunConfig.arch and the CLI's --arch / summary on models of blocks."""

from __future__ import annotations

import json
import os

import pytest

from dfa_core import Conv2d, Dense, Flatten, MaxPool2d, ModelSpec
from dfa_train.arch import ARCHS, format_arch, parse_arch
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


def test_train_and_resume_a_conv_net(tmp_path, capsys):
    out = str(tmp_path / "run")
    common = [
        "--backend",
        "torch",
        "--arch",
        "conv4k5s2,maxpool2,flatten,dense10",
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
        "0",
        "--no-plots",
        "--progress",
        "off",
    ]
    assert main(["train", *common, "--epochs", "1", "--out", out]) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["arch"] == "conv4k5s2,maxpool2,flatten,dense10" and config["layers"] is None
    assert main(["train", "--resume", out, "--epochs", "2"]) == 0
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.npz"))
    assert ckpt.resume.epoch == 2
    assert ckpt.params[0][0].shape == (4, 1, 5, 5) and ckpt.feedback[0].shape == (4 * 12 * 12, 10)
    assert "DFA: 2 epochs" in capsys.readouterr().out
