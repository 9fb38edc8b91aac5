"""Model architectures as short strings, for the command line and config.json.

    parse_arch("conv6k5p2,maxpool2,conv16k5,maxpool2,flatten,dense120,dense84,dense10")
    parse_arch("lenet5")                      # a named architecture (ARCHS)
    format_arch(layers)                       # the inverse: layers -> the canonical string

Tokens, comma-separated, in order:

    conv<C>k<K>[s<S>][p<P>|psame]   Conv2d(C, K, stride=S, padding=P or 'same')  (S 1, P 0 unless given)
    maxpool<N>, avgpool<N>          MaxPool2d(N), AvgPool2d(N)
    flatten                         Flatten()
    dense<N>                        Dense(N)
    res<C>[s<S>]                    resnet_basic_block(C, stride=S): one block, one feedback point
    transformer<H>h<M>              TransformerBlock(heads=H, mlp_hidden=M) on (T, D) tokens

The input shape is not part of the string: it comes from the dataset (``INPUT_SHAPES``).
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Tuple

from dfa_core.model import AvgPool2d, Conv2d, Dense, Flatten, Layer, MaxPool2d, TransformerBlock, resnet_basic_block

ARCHS: Dict[str, str] = {
    "lenet5": "conv6k5p2,maxpool2,conv16k5,maxpool2,flatten,dense120,dense84,dense10",
    "convnet6": (
        "conv32k3psame,conv32k3psame,maxpool2,conv64k3psame,conv64k3psame,maxpool2,"
        "conv64k3psame,conv64k3psame,maxpool2,flatten,dense256,dense10"
    ),
    "resnet8": "conv16k3psame,res16,res32s2,res64s2,avgpool8,flatten,dense10",
}
"""Named architectures: LeNet-5 (LeCun et al. 1998, as biotorch's and torch's tutorials build it: 28x28
inputs padded by 2, ReLU by the spec), a deeper six-conv net for 32x32 inputs (CIFAR-10), and a
ResNet-8 for 32x32 inputs (He et al. 2016's CIFAR layout with one basic block per stage, no BatchNorm):
each residual block is one DFA block with one feedback point at its output."""

INPUT_SHAPES: Dict[str, Tuple[int, ...]] = {
    "mnist": (1, 28, 28),
    "mnist-slice": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "xor": (2,),
}
"""Per-sample input shape of each dataset with a fixed one ('idx' takes its images' own size)."""

_CONV = re.compile(r"conv(\d+)k(\d+)(?:s(\d+))?(?:p(\d+|same))?")
_RES = re.compile(r"res(\d+)(?:s(\d+))?")
_TRANSFORMER = re.compile(r"transformer(\d+)h(\d+)")
_SIMPLE: Dict[str, Tuple["re.Pattern[str]", Callable[[int], Layer]]] = {
    "maxpool": (re.compile(r"maxpool(\d+)"), MaxPool2d),
    "avgpool": (re.compile(r"avgpool(\d+)"), AvgPool2d),
    "dense": (re.compile(r"dense(\d+)"), Dense),
}


def _token(token: str, where: str) -> Layer:
    if token == "flatten":
        return Flatten()
    m = _CONV.fullmatch(token)
    if m:
        out, k, stride, pad = m.groups()
        padding = "same" if pad == "same" else int(pad or 0)
        return Conv2d(int(out), int(k), stride=int(stride or 1), padding=padding)
    m = _RES.fullmatch(token)
    if m:
        return resnet_basic_block(int(m.group(1)), stride=int(m.group(2) or 1))
    m = _TRANSFORMER.fullmatch(token)
    if m:
        return TransformerBlock(int(m.group(1)), int(m.group(2)))
    for pattern, cls in _SIMPLE.values():
        m = pattern.fullmatch(token)
        if m:
            return cls(int(m.group(1)))
    raise ValueError(
        f"{where}: unknown layer {token!r}; expected conv<C>k<K>[s<S>][p<P>|psame], maxpool<N>, avgpool<N>, "
        f"flatten, dense<N>, res<C>[s<S>] or transformer<H>h<M> (or a named architecture: {sorted(ARCHS)})"
    )


def parse_arch(text: str) -> Tuple[Layer, ...]:
    """The layers an architecture string (or a name in ARCHS) describes.

    Raises:
      ValueError: an empty string or an unknown token (names the token and its position); a layer's
        own check (a zero size, 'same' with stride 2, ...).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"an architecture must be a non-empty string such as 'lenet5' or 'dense200,dense10', got {text!r}"
        )
    text = ARCHS.get(text.strip(), text)
    tokens = [t.strip().lower() for t in text.split(",")]
    layers = []
    for i, token in enumerate(tokens):
        try:
            layers.append(_token(token, f"token {i + 1}"))
        except ValueError as err:
            raise ValueError(f"architecture {text!r}: {err}") from None
    return tuple(layers)


def _composite_token(layer: Layer) -> str:
    for channels_stride in _res_params(layer):
        c, stride = channels_stride
        return f"res{c}" + (f"s{stride}" if stride != 1 else "")
    if isinstance(layer, TransformerBlock) and layer == TransformerBlock(layer.heads, layer.mlp_hidden):
        return f"transformer{layer.heads}h{layer.mlp_hidden}"
    raise TypeError(f"format_arch has no token for {layer!r}")


def _res_params(layer: Layer) -> Tuple[Tuple[int, int], ...]:
    """((channels, stride),) when ``layer`` is exactly a resnet_basic_block, else ()."""
    first = getattr(layer, "layers", (None,))[0]
    if isinstance(first, Conv2d):
        c, stride = first.out_channels, first.stride
        if layer == resnet_basic_block(c, stride):
            return ((c, stride),)
    return ()


def format_arch(layers: Tuple[Layer, ...]) -> str:
    """The canonical string of ``layers`` (``parse_arch(format_arch(layers)) == layers``).

    Raises:
      TypeError: a layer with no token (a composite built by hand, a user block); ``describe_layers``
        writes those out in full instead.
    """
    parts = []
    for layer in layers:
        if isinstance(layer, Conv2d):
            s = f"conv{layer.out_channels}k{layer.kernel_size}"
            s += f"s{layer.stride}" if layer.stride != 1 else ""
            s += (
                f"p{layer.padding}"
                if layer.padding not in (0, "same")
                else ("psame" if layer.padding == "same" else "")
            )
            parts.append(s)
        elif isinstance(layer, MaxPool2d):
            parts.append(f"maxpool{layer.size}")
        elif isinstance(layer, AvgPool2d):
            parts.append(f"avgpool{layer.size}")
        elif isinstance(layer, Dense):
            parts.append(f"dense{layer.units}")
        elif isinstance(layer, Flatten):
            parts.append("flatten")
        else:
            parts.append(_composite_token(layer))
    return ",".join(parts)


def describe_layers(layers: Tuple[Layer, ...]) -> str:
    """``format_arch(layers)``, or where a layer has no token, the layers' reprs (for records)."""
    try:
        return format_arch(layers)
    except TypeError:
        return ", ".join(repr(layer) for layer in layers)


__all__ = ["ARCHS", "INPUT_SHAPES", "describe_layers", "format_arch", "parse_arch"]
