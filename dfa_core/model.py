"""Models beyond MLPs: a flat sequence of layers split into blocks, each with one feedback point.

A model is a sequence of layers. It splits into blocks after each parametrised layer (``Dense``,
``Conv2d``, or a composite: ``Sequential``, ``Residual``); the parameter-free layers before a
parametrised one (``MaxPool2d``, ``AvgPool2d``, ``Flatten``) are that block's *prefix*. Block l computes

    u_l = prefix_l(h_{l-1}),   a_l = g_l(theta_l, u_l),   h_l = f_l(a_l)

with f_l the spec's activation f, or a composite's own output activation (``out_activation``).
A composite is ONE block: one feedback point at its output, exact backprop inside it (TinyDFA's
per-block placement). Each block's theta_l is a flat tuple of arrays: (W, b) for Dense/Conv2d,
the inner layers' (W, b) concatenated in order for a composite (``Block.param_shapes``).

and the last block's a_L gives y_hat = out(a_L). DFA puts a feedback point at every hidden
block's output: delta_l = reshape(e' B_l^T, shape of a_l) * f'(a'_l), with B_l of shape
(size of a_l per sample, n_L), a_l flattened in (C, H, W) order; the block's parameter
gradients are the vector-Jacobian product of g_l with respect to theta_l at (theta_l, u'_l),
applied to delta_l (exact backprop inside a block, nothing between blocks).

Conventions follow torch.nn: ``Conv2d`` is a cross-correlation with W (out, in, kh, kw) and
b (out,), symmetric zero padding; pools use stride = size and drop what does not fit
(floor); ``Flatten`` flattens (C, H, W) (or (T, D)) in that order. Imports NumPy only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

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


SimpleLayer = Union[Dense, Conv2d, MaxPool2d, AvgPool2d, Flatten]
SIMPLE_LAYER_TYPES = (Dense, Conv2d, MaxPool2d, AvgPool2d, Flatten)


def _check_out_activation(owner: object, value) -> None:
    if value is not None and (not isinstance(value, str) or value not in ACTIVATIONS):
        raise ValueError(
            f"{type(owner).__name__}.out_activation must be None (the spec's f) or one of {list(ACTIVATIONS)}, "
            f"got {value!r}"
        )


def _check_inner_layers(owner: object, layers) -> Tuple[SimpleLayer, ...]:
    """The layers of a composite: Dense/Conv2d/pools/Flatten (no nesting), ending in Dense or Conv2d."""
    name = type(owner).__name__
    if len(layers) == 1 and isinstance(layers[0], (tuple, list)):
        layers = tuple(layers[0])  # Sequential((a, b)) reads as Sequential(a, b)
    if not layers:
        raise ValueError(f"{name} needs at least one layer, got none")
    for i, layer in enumerate(layers):
        if not isinstance(layer, SIMPLE_LAYER_TYPES):
            raise TypeError(
                f"{name} layer {i} must be one of {[t.__name__ for t in SIMPLE_LAYER_TYPES]} (composites do not "
                f"nest), got {layer!r}"
            )
    if not isinstance(layers[-1], (Dense, Conv2d)):
        raise ValueError(f"{name} must end in a parametrised layer (Dense, Conv2d or a composite), got {layers[-1]!r}")
    return tuple(layers)


@dataclasses.dataclass(frozen=True, init=False)
class Sequential:
    """A composite block: its layers in order, with the spec's f after every inner Dense/Conv2d but the last.

    ``Sequential(Conv2d(8, 3, padding=1), Conv2d(8, 3, padding=1))`` is one block
    a = conv2(f(conv1(u))), with ONE feedback point at a and exact backprop inside. Inner layers
    are Dense, Conv2d, MaxPool2d, AvgPool2d and Flatten (composites do not nest); the last one
    is parametrised. Its params are the inner (W, b) pairs concatenated: (W_1, b_1, W_2, b_2, ...).
    """

    layers: Tuple[SimpleLayer, ...]  # the inner layers, in order
    out_activation: Optional[str] = None  # h = out_activation(a); None: the spec's f

    def __init__(self, *layers: SimpleLayer, out_activation: Optional[str] = None):
        object.__setattr__(self, "layers", _check_inner_layers(self, layers))
        _check_out_activation(self, out_activation)
        object.__setattr__(self, "out_activation", out_activation)


@dataclasses.dataclass(frozen=True, init=False)
class Residual:
    """A residual composite block: a = body(u) + shortcut(u), the body read as a ``Sequential``.

    The shortcut is the identity when the body keeps u's shape. Otherwise it is a projection:
    the ``shortcut`` layer given (a Dense or Conv2d whose output has the body's shape), or, when
    ``shortcut`` is None, one built automatically: a 1x1 ``Conv2d(C_out, 1, stride=s)`` with the
    stride s that gives the body's H' x W' (``Dense(n_out)`` for a flat input). A projection's
    (W, b) come after the body's in the block's params: (W_1, b_1, ..., W_proj, b_proj).
    h = out_activation(a), by default the spec's f (ResNet applies f after the sum).
    """

    layers: Tuple[SimpleLayer, ...]  # the body, in order
    shortcut: Optional[Union[Dense, Conv2d]] = None  # None: identity, or an automatic projection
    out_activation: Optional[str] = None  # h = out_activation(a); None: the spec's f

    def __init__(
        self,
        *layers: SimpleLayer,
        shortcut: Optional[Union[Dense, Conv2d]] = None,
        out_activation: Optional[str] = None,
    ):
        object.__setattr__(self, "layers", _check_inner_layers(self, layers))
        if shortcut is not None and not isinstance(shortcut, (Dense, Conv2d)):
            raise TypeError(f"Residual.shortcut must be None, a Dense or a Conv2d, got {shortcut!r}")
        object.__setattr__(self, "shortcut", shortcut)
        _check_out_activation(self, out_activation)
        object.__setattr__(self, "out_activation", out_activation)


def resnet_basic_block(channels: int, stride: int = 1) -> Residual:
    """ResNet's basic block without BatchNorm: conv3x3(stride) - f - conv3x3, plus the shortcut.

    The shortcut is the identity when stride is 1 and the channels do not change, else the
    automatic 1x1 projection (see ``Residual``); h = f(a) after the sum, as in ResNet. There is
    no BatchNorm: its batch statistics are state that the framework does not carry yet.

    Args:
      channels: output channels of both convolutions, >= 1.
      stride: stride of the first convolution (and of the projection), >= 1.

    Returns:
      Residual(Conv2d(channels, 3, stride, padding=1), Conv2d(channels, 3, padding=1)).
    """
    return Residual(Conv2d(channels, 3, stride=stride, padding=1), Conv2d(channels, 3, padding=1))


@dataclasses.dataclass(frozen=True)
class TransformerBlock:
    """A pre-norm transformer block on T tokens of width D, (T, D) -> (T, D); one block, one feedback point.

        x1 = x + MHSA(LN_1(x)),   a = x1 + W_2 f(W_1 LN_2(x1) + b_1) + b_2

    MHSA is multi-head self-attention over all T tokens (no mask): qkv = LN_1(x) W_qkv^T + b_qkv
    split into ``heads`` heads of width D / heads, softmax(q k^T / sqrt(D / heads)) v, the heads
    concatenated and projected by (W_o, b_o). LayerNorm: (x - mean) / sqrt(var + 1e-5) * gamma
    + beta over D (torch.nn.LayerNorm's biased variance and eps). f is the spec's activation.
    The output is a residual stream, so h = out_activation(a) is the identity by default.
    Params, in order: (ln1_gamma (D,), ln1_beta (D,), W_qkv (3D, D), b_qkv (3D,), W_o (D, D),
    b_o (D,), ln2_gamma (D,), ln2_beta (D,), W1 (mlp_hidden, D), b1 (mlp_hidden,), W2 (D, mlp_hidden),
    b2 (D,)); ``init_params`` sets gammas to 1, betas to 0 (torch's LayerNorm) and draws the
    linear maps as torch.nn.Linear does, U(+-1/sqrt(fan_in)).
    """

    heads: int  # attention heads, >= 1; must divide D
    mlp_hidden: int  # width of the MLP's hidden layer, >= 1
    out_activation: Optional[str] = "identity"  # h = out_activation(a); None: the spec's f

    def __post_init__(self):
        _check_positive_int(self, "heads", self.heads)
        _check_positive_int(self, "mlp_hidden", self.mlp_hidden)
        _check_out_activation(self, self.out_activation)

    LN_EPS = 1e-5  # torch.nn.LayerNorm's default (a class constant, not a field)

    def output_shape(self, shape: Shape, where: str) -> Shape:
        if len(shape) != 2:
            raise ValueError(f"{where}: TransformerBlock needs a (T, D) token input, got shape {shape}")
        if shape[1] % self.heads:
            raise ValueError(f"{where}: TransformerBlock heads {self.heads} must divide the width D = {shape[1]}")
        return tuple(shape)

    def param_shapes(self, u_shape: Shape) -> Tuple[Shape, ...]:
        d, m = u_shape[1], self.mlp_hidden
        return ((d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (m, d), (m,), (d, m), (d,))

    def param_inits(self, u_shape: Shape) -> Tuple[Union[float, str], ...]:
        d, m = u_shape[1], self.mlp_hidden
        c, cm = 1.0 / math.sqrt(d), 1.0 / math.sqrt(m)
        return ("ones", "zeros", c, c, c, c, "ones", "zeros", c, c, cm, cm)

    PARAM_NAMES = (
        "ln1_gamma",
        "ln1_beta",
        "W_qkv",
        "b_qkv",
        "W_o",
        "b_o",
        "ln2_gamma",
        "ln2_beta",
        "W1",
        "b1",
        "W2",
        "b2",
    )

    def flops(self, u_shape: Shape) -> int:
        """Per sample: two LayerNorms (8 per number), the qkv, score, mix and output products, the
        softmax (3 per score), the MLP and both residual sums; f is not counted."""
        t, d, m = u_shape[0], u_shape[1], self.mlp_hidden
        norms = 2 * 8 * t * d
        attention = (2 * d + 1) * 3 * d * t + 2 * 2 * t * t * d + 3 * self.heads * t * t + (2 * d + 1) * d * t
        mlp = (2 * d + 1) * m * t + (2 * m + 1) * d * t
        return norms + attention + mlp + 2 * t * d


@dataclasses.dataclass(frozen=True, eq=False)
class UserBlock:
    """A user's block, one block with one feedback point: a torch ``nn.Module`` or a JAX ``(init, apply)`` pair.

    Build it with the backend that runs it: ``dfa_torch.blocks.user_block(module)`` or
    ``dfa_jax.blocks.user_block((init, apply))``. Only that backend can run it (cross-backend
    parity is not expected). Its params are the module's parameters (or the init's pytree
    leaves) as one flat tuple, in the module's (pytree's) order; the backend takes the block's
    DFA gradients as the VJP of the whole module with respect to them. Equality and hashing
    are by identity: one UserBlock object, one compiled program.
    """

    backend: str  # 'torch' or 'jax': the backend that runs ``fn``
    fn: object  # the torch nn.Module, or the JAX (init, apply) pair
    describe: Callable[[Shape], Tuple[Shape, Tuple[Shape, ...], Tuple[str, ...]]]  # u -> a, param shapes, names
    init: Callable[[Shape, int], Tuple[object, ...]]  # (u_shape, seed) -> flat NumPy params
    out_activation: Optional[str] = None  # h = out_activation(a); None: the spec's f

    def __post_init__(self):
        if self.backend not in ("torch", "jax"):
            raise ValueError(f"UserBlock.backend must be 'torch' or 'jax', got {self.backend!r}")
        _check_out_activation(self, self.out_activation)


@functools.lru_cache(maxsize=None)
def user_block_shapes(layer: UserBlock, u_shape: Shape) -> Tuple[Shape, Tuple[Shape, ...], Tuple[str, ...]]:
    """(a shape, param shapes, param names) of a UserBlock on a per-sample input ``u_shape`` (cached)."""
    a_shape, shapes, names = layer.describe(tuple(u_shape))
    return tuple(int(n) for n in a_shape), tuple(tuple(int(n) for n in s) for s in shapes), tuple(names)


Composite = Union[Sequential, Residual]
COMPOSITE_TYPES = (Sequential, Residual)
Layer = Union[Dense, Conv2d, MaxPool2d, AvgPool2d, Flatten, Sequential, Residual, TransformerBlock, UserBlock]
PARAMETRISED = (Dense, Conv2d, Sequential, Residual, TransformerBlock, UserBlock)
LAYER_TYPES = (Dense, Conv2d, MaxPool2d, AvgPool2d, Flatten, Sequential, Residual, TransformerBlock, UserBlock)


def _simple_output_shape(layer: SimpleLayer, shape: Shape, where: str) -> Shape:
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


def _simple_param_shapes(layer: Union[Dense, Conv2d], u_shape: Shape) -> Tuple[Shape, Shape]:
    """(W shape, b shape): Dense (units, in), Conv2d (out, in, k, k); b (units or out,)."""
    if isinstance(layer, Dense):
        return (layer.units, u_shape[0]), (layer.units,)
    k = layer.kernel_size
    return (layer.out_channels, u_shape[0], k, k), (layer.out_channels,)


class CompositePlan(NamedTuple):
    """A composite resolved for one input shape: what the backends and the reference run."""

    layers: Tuple[SimpleLayer, ...]  # the body, in order (f after each parametrised one but the last)
    shapes: Tuple[Shape, ...]  # per-sample shapes: shapes[0] = u, shapes[i + 1] after layers[i]
    residual: bool  # a = body(u) + shortcut(u)
    shortcut: Optional[Union[Dense, Conv2d]]  # the projection; None: identity (or no shortcut)

    @property
    def a_shape(self) -> Shape:
        return self.shapes[-1]

    def param_layers(self) -> Tuple[Tuple[Union[Dense, Conv2d], Shape], ...]:
        """(layer, its input shape) for each parametrised layer, in params order (projection last)."""
        out = [(lay, shp) for lay, shp in zip(self.layers, self.shapes) if isinstance(lay, (Dense, Conv2d))]
        if self.shortcut is not None:
            out.append((self.shortcut, self.shapes[0]))
        return tuple(out)


def _auto_projection(u_shape: Shape, a_shape: Shape) -> Union[Dense, Conv2d]:
    if len(u_shape) == 1 and len(a_shape) == 1:
        return Dense(a_shape[0])
    if len(u_shape) == 3 and len(a_shape) == 3:
        stride = max(1, u_shape[1] // a_shape[1])
        if all((n - 1) // stride + 1 == m for n, m in zip(u_shape[1:], a_shape[1:])):
            return Conv2d(a_shape[0], 1, stride=stride)
    raise ValueError(
        f"Residual: no 1x1 projection maps the input {u_shape} to the body's output {a_shape}; "
        "pass shortcut=Conv2d(...) or Dense(...) explicitly"
    )


@functools.lru_cache(maxsize=None)
def composite_plan(layer: Composite, u_shape: Shape) -> CompositePlan:
    """Resolves ``layer`` on a per-sample input ``u_shape`` (shapes checked; cached).

    Raises:
      ValueError: a layer that does not fit its input, or a residual shortcut that cannot match.
    """
    shapes = [u_shape]
    for i, inner in enumerate(layer.layers):
        shapes.append(_simple_output_shape(inner, shapes[-1], f"{type(layer).__name__} layer {i}"))
    shortcut = None
    if isinstance(layer, Residual):
        a_shape = shapes[-1]
        shortcut = layer.shortcut
        if shortcut is None and a_shape != u_shape:
            shortcut = _auto_projection(u_shape, a_shape)
        if shortcut is not None:
            got = _simple_output_shape(shortcut, u_shape, "Residual shortcut")
            if got != a_shape:
                raise ValueError(f"Residual shortcut {shortcut!r} gives shape {got}, the body gives {a_shape}")
    return CompositePlan(tuple(layer.layers), tuple(shapes), isinstance(layer, Residual), shortcut)


def output_shape(layer: Layer, shape: Shape, where: str) -> Shape:
    """The per-sample shape ``layer`` makes of ``shape``; ValueError naming ``where`` if it cannot."""
    if isinstance(layer, TransformerBlock):
        return layer.output_shape(tuple(shape), where)
    if isinstance(layer, UserBlock):
        try:
            return user_block_shapes(layer, tuple(shape))[0]
        except Exception as error:  # whatever the user's module raised on this input
            raise ValueError(f"{where}: the user block does not run on a {tuple(shape)} input: {error}") from error
    if isinstance(layer, COMPOSITE_TYPES):
        try:
            return composite_plan(layer, tuple(shape)).a_shape
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    return _simple_output_shape(layer, shape, where)


def layer_flops(layer: Layer, in_shape: Shape) -> int:
    """Forward floating-point operations per sample of ``layer`` on an ``in_shape`` input.

    A multiply-add counts 2: Dense 2 * in * units + units, Conv2d 2 * (C_in k k) * size of a
    + size of a (the bias), a pool one operation per input it reads (the window's compares
    or adds), Flatten none. A composite sums its layers (and its projection), plus one add
    per output number for a residual sum; activations are not counted. The backward pass
    costs about twice the forward. A TransformerBlock: see ``TransformerBlock.flops``; a
    UserBlock counts 0 (its module is opaque here).
    """
    if isinstance(layer, TransformerBlock):
        return layer.flops(tuple(in_shape))
    if isinstance(layer, UserBlock):
        return 0  # unknown: a user's module is not counted
    if isinstance(layer, COMPOSITE_TYPES):
        plan = composite_plan(layer, tuple(in_shape))
        total = sum(layer_flops(inner, shape) for inner, shape in zip(plan.layers, plan.shapes))
        if plan.shortcut is not None:
            total += layer_flops(plan.shortcut, plan.shapes[0])
        return total + (math.prod(plan.a_shape) if plan.residual else 0)
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
    """One block: its parameter-free prefix, its parametrised layer (or composite), and the shapes around them."""

    prefix: Tuple[SimpleLayer, ...]  # pools/flatten applied to h_{l-1}, in order
    layer: Union[Dense, Conv2d, Composite, TransformerBlock, UserBlock]  # g_l: the parametrised layer or composite
    in_shape: Shape  # per-sample shape of h_{l-1} (before the prefix)
    u_shape: Shape  # per-sample shape of u_l = prefix_l(h_{l-1})
    a_shape: Shape  # per-sample shape of a_l

    @property
    def a_size(self) -> int:
        """Numbers in a_l per sample: the rows of this block's feedback matrix."""
        return math.prod(self.a_shape)

    @property
    def plan(self) -> Optional[CompositePlan]:
        """The composite resolved on u_shape, or None for a Dense/Conv2d block."""
        return composite_plan(self.layer, self.u_shape) if isinstance(self.layer, COMPOSITE_TYPES) else None

    @property
    def param_shapes(self) -> Tuple[Shape, ...]:
        """The shapes of the block's flat params: (W shape, b shape) for Dense/Conv2d, each inner
        layer's pair concatenated for a composite (projection last). Dense W (units, in), Conv2d
        W (out, in, k, k), b (units or out,)."""
        if isinstance(self.layer, TransformerBlock):
            return self.layer.param_shapes(self.u_shape)
        if isinstance(self.layer, UserBlock):
            return user_block_shapes(self.layer, self.u_shape)[1]
        plan = self.plan
        if plan is None:
            return _simple_param_shapes(self.layer, self.u_shape)  # type: ignore[arg-type]
        return tuple(s for lay, shp in plan.param_layers() for s in _simple_param_shapes(lay, shp))

    @property
    def param_inits(self) -> Tuple[Union[float, str], ...]:
        """How ``init_params`` draws each param (torch's default per inner layer): a float c draws
        U(-c, c), c = 1/sqrt(fan_in) for both W and b of a Dense or Conv2d; 'ones'/'zeros' set it."""
        if isinstance(self.layer, TransformerBlock):
            return self.layer.param_inits(self.u_shape)
        if isinstance(self.layer, UserBlock):  # init_params asks the block's own init
            return ("user",) * len(self.param_shapes)
        plan = self.plan
        if plan is None:
            return (1.0 / math.sqrt(self.fan_in),) * 2
        bounds: List[Union[float, str]] = []
        for lay, shp in plan.param_layers():
            w_shape: Shape = _simple_param_shapes(lay, shp)[0]
            bounds += [1.0 / math.sqrt(math.prod(w_shape[1:]))] * 2
        return tuple(bounds)

    @property
    def param_names(self) -> Tuple[str, ...]:
        """Names of the flat params for messages: ('W', 'b'), or e.g. ('W1', 'b1', 'W2', 'b2', 'W_proj', 'b_proj')."""
        if isinstance(self.layer, TransformerBlock):
            return TransformerBlock.PARAM_NAMES
        if isinstance(self.layer, UserBlock):
            return user_block_shapes(self.layer, self.u_shape)[2]
        plan = self.plan
        if plan is None:
            return ("W", "b")
        n = len(plan.param_layers()) - (plan.shortcut is not None)
        names = [f"{p}{i}" for i in range(1, n + 1) for p in ("W", "b")]
        return tuple(names + (["W_proj", "b_proj"] if plan.shortcut is not None else []))

    def out_activation(self, spec_activation: str) -> str:
        """f_l, the activation applied to a_l: the composite's ``out_activation`` if set, else the spec's f."""
        own = getattr(self.layer, "out_activation", None)
        return spec_activation if own is None else own

    def flops(self) -> int:
        """Forward FLOPs per sample of the prefix and the layer (``layer_flops``), activation excluded."""
        total, shape = 0, self.in_shape
        for layer in self.prefix:
            total += layer_flops(layer, shape)
            shape = output_shape(layer, shape, type(layer).__name__)
        return total + layer_flops(self.layer, self.u_shape)

    @property
    def fan_in(self) -> int:
        """Inputs per output unit of a Dense/Conv2d block (torch's init bound is 1 / sqrt(fan_in)).

        Raises:
          TypeError: for a composite, which has one fan-in per inner layer (see ``param_inits``).
        """
        if isinstance(self.layer, (*COMPOSITE_TYPES, TransformerBlock, UserBlock)):
            raise TypeError(f"a {type(self.layer).__name__} block has one fan-in per inner layer; read param_inits")
        w_shape = self.param_shapes[0]
        return math.prod(w_shape[1:])


def _choice(what: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"ModelSpec.{what} must be one of {list(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model of layers (see the module docstring); frozen, hashable, validated at construction.

    ``input_shape`` is one sample's shape: (features,) for a flat input, (T, D) for a sequence
    of T tokens of width D, or (C, H, W) for images. x arrives as (batch, *input_shape). The
    last layer must be parametrised (its output is a_L, (n_L,) per sample, after Flatten if it
    is a Conv2d).
    """

    input_shape: Shape  # per-sample input shape: (n_0,), (T, D) or (C, H, W)
    layers: Tuple[Layer, ...]  # the model, in order
    activation: str = "tanh"  # hidden activation f, one of dfa_core.ACTIVATIONS
    output: str = "sigmoid"  # output function g and its paired loss, one of dfa_core.OUTPUTS
    reduction: str = "sum"  # 'sum' or 'mean' over the K groups
    dtype: str = "float32"  # 'float32' or 'float64'

    def __post_init__(self):
        shape = self.input_shape
        if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list)) or len(shape) not in (1, 2, 3):
            raise ValueError(f"ModelSpec.input_shape must be (features,), (T, D) or (C, H, W), got {shape!r}")
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
                "ModelSpec.layers must end in a parametrised layer (Dense, Conv2d or a composite), got "
                f"{self.layers[-1]!r}"
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
        prefix: List[SimpleLayer] = []
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
    def param_shapes(self) -> Tuple[Tuple[Shape, ...], ...]:
        """Per block, the shapes of its flat params: ((W_1 shape, b_1 shape), ...); see Block.param_shapes."""
        return tuple(block.param_shapes for block in self.blocks)

    @property
    def feedback_shapes(self) -> Tuple[Tuple[int, int], ...]:
        """(size of a_l per sample, n_L) for each hidden block l = 1..L-1."""
        return tuple((block.a_size, self.n_out) for block in self.blocks[:-1])

    def num_params(self) -> int:
        """Weights and biases in all blocks."""
        return sum(math.prod(shape) for block in self.param_shapes for shape in block)


NetSpec = Union[MLPSpec, ModelSpec]
"""What the spec-taking functions of dfa_core accept."""
SPEC_TYPES = (MLPSpec, ModelSpec)


__all__ = [
    "AvgPool2d",
    "Block",
    "COMPOSITE_TYPES",
    "Composite",
    "CompositePlan",
    "Conv2d",
    "Dense",
    "Flatten",
    "LAYER_TYPES",
    "Layer",
    "MaxPool2d",
    "ModelSpec",
    "NetSpec",
    "PARAMETRISED",
    "Residual",
    "SIMPLE_LAYER_TYPES",
    "Sequential",
    "SimpleLayer",
    "TransformerBlock",
    "UserBlock",
    "SPEC_TYPES",
    "composite_plan",
    "layer_flops",
    "output_shape",
    "resnet_basic_block",
    "user_block_shapes",
]
