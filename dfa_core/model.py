"""Models beyond MLPs: a flat sequence of layers split into blocks, each with one feedback point.

A model is a sequence of layers. It splits into blocks after each parametrised layer (``Dense``,
``Conv2d``); the parameter-free layers before a parametrised one (``MaxPool2d``, ``AvgPool2d``,
``Flatten``) are that block's *prefix*. Block l computes

    u_l = prefix_l(h_{l-1}),   a_l = g_l(theta_l, u_l),   h_l = f(a_l)

and the last block's a_L gives y_hat = out(a_L). DFA puts a feedback point at every hidden
block's output: delta_l = reshape(e' B_l^T, shape of a_l) * f'(a'_l), with B_l of shape
(size of a_l per sample, n_L), a_l flattened in (C, H, W) order; the block's parameter
gradients are the vector-Jacobian product of g_l with respect to theta_l at (theta_l, u'_l),
applied to delta_l (exact backprop inside a block, nothing between blocks).

Conventions follow torch.nn: ``Conv2d`` is a cross-correlation with W (out, in, kh, kw) and
b (out,), symmetric zero padding; pools use stride = size and drop what does not fit
(floor); ``Flatten`` flattens (C, H, W) in that order. Imports NumPy only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import List, Tuple, Union

from dfa_core.spec import ACTIVATIONS, DTYPES, LOSS_OF_OUTPUT, OUTPUTS, REDUCTIONS, MLPSpec

Shape = Tuple[int, ...]


def _check_positive_int(owner: object, field: str, value) -> None:
    """Checks ``owner.field`` and stores it as a plain int (np.int64(5) and 5 make one spec)."""
    name = type(owner).__name__
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}.{field} must be an int >= 1, got {value!r}")
    object.__setattr__(owner, field, int(value))


@dataclasses.dataclass(frozen=True)
class Dense:
    """a = u W^T + b on a (features,) input; W (units, in_features), b (units,)."""

    units: int  # output features, >= 1

    def __post_init__(self):
        _check_positive_int(self, "units", self.units)


@dataclasses.dataclass(frozen=True)
class Conv2d:
    """torch.nn.Conv2d: a (C_out, H', W') from u (C_in, H, W); W (C_out, C_in, k, k), b (C_out,)."""

    out_channels: int  # C_out, >= 1
    kernel_size: int  # k: square kernels, >= 1
    stride: int = 1  # >= 1, both directions
    padding: Union[int, str] = 0  # zeros on every side, >= 0; "same" (stride 1, odd k) keeps H, W

    def __post_init__(self):
        for field in ("out_channels", "kernel_size", "stride"):
            _check_positive_int(self, field, getattr(self, field))
        if self.padding == "same":
            if self.stride != 1 or self.kernel_size % 2 == 0:
                raise ValueError(
                    "Conv2d padding 'same' needs stride 1 and an odd kernel_size (symmetric padding), got "
                    f"stride {self.stride}, kernel_size {self.kernel_size}"
                )
        elif isinstance(self.padding, bool) or not isinstance(self.padding, numbers.Integral) or self.padding < 0:
            raise ValueError(f"Conv2d.padding must be an int >= 0 or 'same', got {self.padding!r}")
        else:
            object.__setattr__(self, "padding", int(self.padding))

    @property
    def pad(self) -> int:
        """Zeros added on each side."""
        return (self.kernel_size - 1) // 2 if self.padding == "same" else int(self.padding)


@dataclasses.dataclass(frozen=True)
class MaxPool2d:
    """Max over size x size windows, stride = size, floor."""

    size: int  # >= 1

    def __post_init__(self):
        _check_positive_int(self, "size", self.size)


@dataclasses.dataclass(frozen=True)
class AvgPool2d:
    """Mean over size x size windows, stride = size, floor."""

    size: int  # >= 1

    def __post_init__(self):
        _check_positive_int(self, "size", self.size)


@dataclasses.dataclass(frozen=True)
class Flatten:
    """(C, H, W) -> (C * H * W,), in (C, H, W) order."""


Layer = Union[Dense, Conv2d, MaxPool2d, AvgPool2d, Flatten]
PARAMETRISED = (Dense, Conv2d)
LAYER_TYPES = (Dense, Conv2d, MaxPool2d, AvgPool2d, Flatten)


def output_shape(layer: Layer, shape: Shape, where: str) -> Shape:
    """The per-sample shape ``layer`` makes of ``shape``; ValueError naming ``where`` if it cannot."""
    name = type(layer).__name__
    if isinstance(layer, Dense):
        if len(shape) != 1:
            raise ValueError(
                f"{where}: Dense needs a flat (features,) input, got shape {shape}; put Flatten() before it"
            )
        return (layer.units,)
    if isinstance(layer, Flatten):
        return (math.prod(shape),)
    if len(shape) != 3:
        raise ValueError(f"{where}: {name} needs a (C, H, W) input, got shape {shape}")
    c, h, w = shape
    if isinstance(layer, Conv2d):
        k, s, p = layer.kernel_size, layer.stride, layer.pad
        if h + 2 * p < k or w + 2 * p < k:
            raise ValueError(f"{where}: Conv2d kernel {k}x{k} is larger than its padded input {h + 2 * p}x{w + 2 * p}")
        return (layer.out_channels, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
    if h < layer.size or w < layer.size:
        raise ValueError(f"{where}: {name}({layer.size}) is larger than its input {h}x{w}")
    return (c, h // layer.size, w // layer.size)


def layer_flops(layer: Layer, in_shape: Shape) -> int:
    """Forward floating-point operations per sample of ``layer`` on an ``in_shape`` input.

    A multiply-add counts 2: Dense 2 * in * units + units, Conv2d 2 * (C_in k k) * size of a
    + size of a (the bias), a pool one operation per input it reads (the window's compares
    or adds), Flatten none. The backward pass costs about twice the forward.
    """
    if isinstance(layer, Flatten):
        return 0
    out = output_shape(layer, in_shape, type(layer).__name__)
    if isinstance(layer, Dense):
        return 2 * in_shape[0] * layer.units + layer.units
    if isinstance(layer, Conv2d):
        return (2 * in_shape[0] * layer.kernel_size**2 + 1) * math.prod(out)
    return math.prod(out) * layer.size * layer.size


@dataclasses.dataclass(frozen=True)
class Block:
    """One block: its parameter-free prefix, its parametrised layer, and the shapes around them."""

    prefix: Tuple[Layer, ...]  # pools/flatten applied to h_{l-1}, in order
    layer: Union[Dense, Conv2d]  # g_l
    in_shape: Shape  # per-sample shape of h_{l-1} (before the prefix)
    u_shape: Shape  # per-sample shape of u_l = prefix_l(h_{l-1})
    a_shape: Shape  # per-sample shape of a_l

    @property
    def a_size(self) -> int:
        """Numbers in a_l per sample: the rows of this block's feedback matrix."""
        return math.prod(self.a_shape)

    @property
    def param_shapes(self) -> Tuple[Shape, Shape]:
        """(W shape, b shape): Dense (units, in), Conv2d (out, in, k, k); b (units or out,)."""
        if isinstance(self.layer, Dense):
            return (self.layer.units, self.u_shape[0]), (self.layer.units,)
        k = self.layer.kernel_size
        return (self.layer.out_channels, self.u_shape[0], k, k), (self.layer.out_channels,)

    def flops(self) -> int:
        """Forward FLOPs per sample of the prefix and the layer (``layer_flops``), activation excluded."""
        total, shape = 0, self.in_shape
        for layer in self.prefix:
            total += layer_flops(layer, shape)
            shape = output_shape(layer, shape, type(layer).__name__)
        return total + layer_flops(self.layer, self.u_shape)

    @property
    def fan_in(self) -> int:
        """Inputs per output unit (torch's init bound is 1 / sqrt(fan_in))."""
        w_shape = self.param_shapes[0]
        return math.prod(w_shape[1:])


def _choice(what: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"ModelSpec.{what} must be one of {list(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model of layers (see the module docstring); frozen, hashable, validated at construction.

    ``input_shape`` is one sample's shape: (features,) for a flat input or (C, H, W) for images.
    x arrives as (batch, *input_shape). The last layer must be parametrised (its output is
    a_L, (n_L,) per sample, after Flatten if it is a Conv2d).
    """

    input_shape: Shape  # per-sample input shape: (n_0,) or (C, H, W)
    layers: Tuple[Layer, ...]  # the model, in order
    activation: str = "tanh"  # hidden activation f, one of dfa_core.ACTIVATIONS
    output: str = "sigmoid"  # output function g and its paired loss, one of dfa_core.OUTPUTS
    reduction: str = "sum"  # 'sum' or 'mean' over the K groups
    dtype: str = "float32"  # 'float32' or 'float64'

    def __post_init__(self):
        shape = self.input_shape
        if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list)) or len(shape) not in (1, 3):
            raise ValueError(f"ModelSpec.input_shape must be (features,) or (C, H, W), got {shape!r}")
        for n in shape:
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise ValueError(f"ModelSpec.input_shape must hold ints >= 1, got {shape!r}")
        object.__setattr__(self, "input_shape", tuple(int(n) for n in shape))
        if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, (tuple, list)) or not self.layers:
            raise ValueError(f"ModelSpec.layers must be a non-empty sequence of layers, got {self.layers!r}")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, LAYER_TYPES):
                raise TypeError(
                    f"ModelSpec.layers[{i}] must be one of {[t.__name__ for t in LAYER_TYPES]}, got {layer!r}"
                )
        object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.layers[-1], PARAMETRISED):
            raise ValueError(
                f"ModelSpec.layers must end in a parametrised layer (Dense or Conv2d), got {self.layers[-1]!r}"
            )
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("output", self.output, OUTPUTS)
        _choice("reduction", self.reduction, REDUCTIONS)
        _choice("dtype", self.dtype, DTYPES)
        if len(self.blocks[-1].a_shape) != 1:
            raise ValueError(
                f"the last layer's output must be flat (n_L,), got {self.blocks[-1].a_shape}; end with "
                "Flatten() and Dense(n_L)"
            )

    # Cached: validation reads param_shapes/n_out on every checked call. The cache lives in the
    # instance __dict__, outside the dataclass fields, so equality and hashing ignore it.
    @functools.cached_property
    def blocks(self) -> Tuple[Block, ...]:
        """The blocks, in order (computed from the layers; shapes checked on the way)."""
        blocks: List[Block] = []
        prefix: List[Layer] = []
        shape = in_shape = self.input_shape
        for i, layer in enumerate(self.layers):
            shape_after = output_shape(layer, shape, f"layers[{i}] ({type(layer).__name__})")
            if isinstance(layer, PARAMETRISED):
                blocks.append(Block(tuple(prefix), layer, in_shape, shape, shape_after))
                prefix, in_shape = [], shape_after
            else:
                prefix.append(layer)
            shape = shape_after
        return tuple(blocks)

    # -- the MLPSpec-like view that shared code reads ---------------------------------------------

    @property
    def num_layers(self) -> int:
        """L, the number of blocks (parametrised layers)."""
        return len(self.blocks)

    @property
    def num_hidden(self) -> int:
        """L - 1, the number of hidden blocks (each has one feedback matrix)."""
        return self.num_layers - 1

    @property
    def n_in(self) -> int:
        """Numbers per input sample."""
        return math.prod(self.input_shape)

    @property
    def n_out(self) -> int:
        """n_L, the output width."""
        return self.blocks[-1].a_shape[0]

    @property
    def loss(self) -> str:
        """Name of the loss paired with ``output``."""
        return LOSS_OF_OUTPUT[self.output]

    @property
    def param_shapes(self) -> Tuple[Tuple[Shape, Shape], ...]:
        """((W_1 shape, b_1 shape), ..., (W_L shape, b_L shape))."""
        return tuple(block.param_shapes for block in self.blocks)

    @property
    def feedback_shapes(self) -> Tuple[Tuple[int, int], ...]:
        """(size of a_l per sample, n_L) for each hidden block l = 1..L-1."""
        return tuple((block.a_size, self.n_out) for block in self.blocks[:-1])

    def num_params(self) -> int:
        """Weights and biases in all blocks."""
        return sum(math.prod(w) + math.prod(b) for w, b in self.param_shapes)


NetSpec = Union[MLPSpec, ModelSpec]
"""What the spec-taking functions of dfa_core accept."""
SPEC_TYPES = (MLPSpec, ModelSpec)


__all__ = [
    "AvgPool2d",
    "Block",
    "Conv2d",
    "Dense",
    "Flatten",
    "LAYER_TYPES",
    "Layer",
    "MaxPool2d",
    "ModelSpec",
    "NetSpec",
    "PARAMETRISED",
    "SPEC_TYPES",
    "layer_flops",
    "output_shape",
]
