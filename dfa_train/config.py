"""One training run's settings as a frozen, typed, validated ``RunConfig``; config.json is its JSON.

    from dfa_train.config import RunConfig
    from dfa_train.run import run
    config = RunConfig(dataset="xor", layers=(2, 4, 1), lr=0.5, batch_size=2, epochs=200)
    result = run(config, "runs/xor")

Every field is checked when the config is built (a ``ConfigError`` names the field, what
was expected and what arrived), so a run, a sweep member or a resumed run never starts
from a bad setting. ``to_json`` / ``from_json`` round-trip exactly; the JSON carries a
``version`` so a config written by another layout is refused rather than misread.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any, Dict, Mapping, Optional, Tuple, Union, cast

from dfa_core import validation
from dfa_core.feedback import FEEDBACK_DISTS, FEEDBACK_PRESETS, OPTION_CHECKS
from dfa_core.hardware import DEFAULT_THRESHOLD, NOISES, QUANTIZERS, Projection
from dfa_core.model import ModelSpec, NetSpec
from dfa_core.registry import BACKEND_NAMES
from dfa_core.spec import ACTIVATIONS, DTYPES, METHODS, MODES, OPTIMIZERS, OUTPUTS, REDUCTIONS, MLPSpec, OptimizerSpec
from dfa_core.validation import GROUPING_RULES
from dfa_train import schedule
from dfa_train.arch import INPUT_SHAPES, parse_arch
from dfa_train.cadence import CheckpointEvery, format_checkpoint_every, parse_checkpoint_every

CONFIG_VERSION = 6
"""Bumped whenever RunConfig's fields change meaning; ``from_json`` refuses other versions.
Versions 1 (before ``arch``), 2 (before the feedback presets' options), 3 (before the
hardware projection), 4 (before ``devices``, ``stages`` and ``microbatches``) and 5 (before
``kp_decay``) still read, the fields added since set to the value meaning "as before" (``ADDED_IN``):
the run they describe is unchanged."""

HARDWARE_FIELDS = ("quantize", "threshold", "noise", "noise_sigma", "noise_mu")
"""The fields of DFA's hardware projection (``RunConfig.projection``); all None: exact DFA."""

ADDED_IN: Dict[int, Dict[str, Any]] = {
    2: {"arch": None},
    3: {"feedback_density": None, "feedback_k": None, "feedback_rank": None},
    4: dict.fromkeys(HARDWARE_FIELDS),
    5: {
        "devices": None,
        "stages": None,
        "microbatches": None,
        "weight_decay": 0.0,
        "lr_milestones": None,
        "lr_gamma": 0.1,
    },
    6: {"kp_decay": 1e-3},  # the default before version 6
}
"""The fields each config version added, with the value that means "as before"."""

FEEDBACK_OPTION_FIELDS: Dict[str, str] = {"density": "feedback_density", "k": "feedback_k", "rank": "feedback_rank"}
"""init_feedback's preset option -> the RunConfig field that holds it."""

DATASETS: Tuple[str, ...] = ("mnist", "mnist-slice", "fashion-mnist", "cifar10", "idx", "xor")
"""mnist: full MNIST, verified (downloaded if missing); mnist-slice: the bundled first 2,000/500 images
(dfa_train.data.load_mnist_slice); fashion-mnist and cifar10: verified, downloaded if missing;
idx: any MNIST-layout folder (--data-dir); xor: the four points."""

DEFAULT_LAYERS = {
    "mnist": (784, 200, 10),
    "mnist-slice": (784, 200, 10),
    "fashion-mnist": (784, 200, 10),
    "cifar10": (3072, 200, 10),
    "idx": (784, 200, 10),
    "xor": (2, 4, 1),
}

FEEDBACK_SEED_OFFSET = 1
"""A sweep member with seed s uses seed s (batch order), param_seed s (initial weights) and
feedback_seed s + 1 (feedback matrices): member 0 is the default single run."""


class ConfigError(ValueError):
    """A RunConfig field with a bad value; ``field`` names it, ``detail`` says expected vs got."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"RunConfig.{field}: {detail}")
        self.field = field
        self.detail = detail


def _got(value) -> str:
    return f"got {type(value).__name__} {value!r}"


def _check_choice(field: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(field, f"expected one of {list(choices)}, {_got(value)}")


def _method_parts(method: object) -> Tuple[str, ...]:
    """A method string's rules: ('fa',) for 'fa', one per block for a hybrid 'dfa,bp,bp'."""
    if not isinstance(method, str):
        raise ConfigError("method", f"expected a rule among {list(METHODS)} or one per block, {_got(method)}")
    parts = tuple(method.split(","))
    bad = [p for p in parts if p not in METHODS]
    if bad:
        raise ConfigError("method", f"expected rules among {list(METHODS)} (comma-separated), got {method!r}")
    return parts


def _check_int(field: str, value, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ConfigError(field, f"expected {what}, {_got(value)}")


def _check_real(field: str, value, low: float, high: float = math.inf, *, low_open: bool, optional=False):
    if optional and value is None:
        return None
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value < high
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        bound += f" and < {high}" if high != math.inf else ""
        raise ConfigError(
            field, f"expected a finite number {bound}" + (" or None" if optional else "") + f", {_got(value)}"
        )
    return float(value)


def _check_optional_str(field: str, value) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(field, f"expected a non-empty string or None, {_got(value)}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs, and what its config.json records.

    ``layers=None`` takes the dataset's default widths. BP has no grouping mode, so
    ``method='bp'`` requires ``mode='sample'`` (``with_method`` sets it).
    """

    backend: str = "torch"  # 'torch' or 'jax' (dfa_core.BACKEND_NAMES)
    dataset: str = "mnist"  # one of DATASETS: 'mnist', 'mnist-slice', 'idx' or 'xor'
    data_dir: Optional[str] = None  # folder of the IDX files; None: $DFA_DATA_DIR, the cache, else a download
    layers: Optional[Tuple[int, ...]] = None  # (n_0, ..., n_L) widths, input first; None: DEFAULT_LAYERS[dataset]
    arch: Optional[str] = None  # a model of layers instead of an MLP (dfa_train.arch: 'lenet5', 'conv6k5,...')
    activation: str = "tanh"  # hidden activation, one of dfa_core.ACTIVATIONS
    output: str = "sigmoid"  # output function and its paired loss, one of dfa_core.OUTPUTS
    reduction: str = "sum"  # per-group updates summed ('sum', the report's) or averaged ('mean')
    dtype: str = "float32"  # 'float32' or 'float64' for data, parameters and arithmetic
    method: str = "dfa"  # learning rule in dfa_core.METHODS, or one per block comma-separated ('dfa,bp,bp')
    mode: str = "sample"  # DFA grouping, one of dfa_core.MODES; 'sample' for BP
    optimizer: str = "sgd"  # 'sgd', 'momentum' or 'adam'
    lr: float = 1e-4  # learning rate, > 0
    momentum: float = 0.9  # momentum coefficient in [0, 1) (optimizer 'momentum' only)
    weight_decay: float = 0.0  # L2 coefficient >= 0 added to every gradient (lambda * p); 0: none
    lr_milestones: Optional[Tuple[int, ...]] = None  # epochs at which lr is multiplied by lr_gamma; None: fixed lr
    lr_gamma: float = 0.1  # the factor at each milestone, > 0
    kp_decay: float = 1e-4  # Kolen-Pollack's weight decay lambda in [0, 1) per step (kp blocks only)
    batch_size: int = 200  # samples per step, >= 1
    epochs: int = 80  # total epochs (a resumed run counts the ones already run), >= 1
    seed: int = 0  # seed of the batch order, >= 0
    param_seed: int = 0  # seed of the initial weights, >= 0
    feedback_seed: int = 1  # seed of the feedback matrices, >= 0
    feedback_dist: Optional[str] = None  # feedback preset, one of dfa_core.FEEDBACK_DISTS; None: 'normal' for DFA
    feedback_scale: Optional[float] = None  # > 0, multiplies the preset; None: its default (1.9 for 'normal')
    feedback_density: Optional[float] = None  # 'ternary' only (required): fraction of non-zeros, in (0, 1]
    feedback_k: Optional[int] = None  # 'sparse' only (required): non-zeros per row of B_l, in [1, n_L]
    feedback_rank: Optional[int] = None  # 'lowrank' only (required): rank of B_l, in [1, min(n_l, n_L)]
    quantize: Optional[str] = None  # DFA only: the error quantised before projecting, 'ternary', 'sign' or 'kbit:N'
    threshold: Optional[float] = None  # quantize 'ternary' only: |e| > threshold -> sign(e), >= 0; None: 0.1
    noise: Optional[str] = None  # DFA only: projection noise, 'additive' (scaled by max|e|) or 'multiplicative'
    noise_sigma: Optional[float] = None  # with noise (required): its standard deviation, >= 0
    noise_mu: Optional[float] = None  # with noise: its mean (offset or gain error); None: 0
    device: Optional[str] = None  # torch device ('cpu', 'cuda:1') or JAX platform ('cpu', 'gpu'); None: default
    devices: Optional[int] = None  # data parallel: JAX devices in one process; torch: the torchrun world; None: 1
    stages: Optional[int] = None  # layer-parallel DFA over S stages: JAX devices of this process; torch: the
    # torchrun world; None (or 1): not layer parallel
    microbatches: Optional[int] = None  # micro-batches per batch pipelined through the stages; None: 1
    tol: Optional[float] = None  # stop when the training error moves by <= tol, patience times; None: never
    patience: int = 1  # consecutive epochs within tol needed to stop, >= 1
    limit_train: Optional[int] = None  # use the first N training samples; None: all
    limit_test: Optional[int] = None  # use the first N test samples; None: all
    align_every: int = 50  # angles of each block's update to BP's every K steps; 0: never
    standardize: bool = False  # standardise inputs with the training mean/std instead of [0, 1]
    checkpoint_every: str = "auto"  # 'N' epochs, 'Ns' seconds or 'auto' (checkpoints cost < 5% of the run)
    no_download: bool = False  # never download MNIST
    download_timeout: float = 30.0  # seconds a download may wait for data before the next mirror, > 0
    diverge_factor: float = 1000.0  # stop when the loss passes this multiple of the initial loss (> 1); 0: off
    no_plots: bool = False  # write no PNG figures

    def __post_init__(self):
        for field, choices in (
            ("backend", BACKEND_NAMES),
            ("dataset", DATASETS),
            ("activation", ACTIVATIONS),
            ("output", OUTPUTS),
            ("reduction", REDUCTIONS),
            ("dtype", DTYPES),
            ("mode", MODES),
            ("optimizer", OPTIMIZERS),
        ):
            _check_choice(field, getattr(self, field), choices)
        if self.feedback_dist is not None:
            _check_choice("feedback_dist", self.feedback_dist, FEEDBACK_DISTS)
        parts = _method_parts(self.method)
        if not set(parts) <= set(GROUPING_RULES) and self.mode != "sample":
            raise ConfigError(
                "mode",
                f"expected 'sample' with method {self.method!r} (grouping modes apply to {list(GROUPING_RULES)} "
                f"only), got {self.mode!r}",
            )
        if self.arch is None:
            object.__setattr__(self, "layers", self._checked_layers())
        else:
            self._check_arch()
        if len(parts) > 1:
            try:
                validation.method_rules(self.spec(), parts)
            except (ValueError, TypeError) as err:
                raise ConfigError("method", f"expected a valid rule per block ({err})") from None
        for field, minimum in (
            ("batch_size", 1),
            ("epochs", 1),
            ("seed", 0),
            ("param_seed", 0),
            ("feedback_seed", 0),
            ("patience", 1),
            ("align_every", 0),
        ):
            _check_int(field, getattr(self, field), minimum)
        _check_int("limit_train", self.limit_train, 1, optional=True)
        _check_int("limit_test", self.limit_test, 1, optional=True)
        _check_int("devices", self.devices, 1, optional=True)
        self._check_layer_parallel()
        reals = {
            "lr": _check_real("lr", self.lr, 0.0, low_open=True),
            "momentum": _check_real("momentum", self.momentum, 0.0, 1.0, low_open=False),
            "weight_decay": _check_real("weight_decay", self.weight_decay, 0.0, low_open=False),
            "lr_gamma": _check_real("lr_gamma", self.lr_gamma, 0.0, low_open=True),
            "kp_decay": _check_real("kp_decay", self.kp_decay, 0.0, 1.0, low_open=False),
            "feedback_scale": _check_real("feedback_scale", self.feedback_scale, 0.0, low_open=True, optional=True),
            "tol": _check_real("tol", self.tol, 0.0, low_open=False, optional=True),
            "download_timeout": _check_real("download_timeout", self.download_timeout, 0.0, low_open=True),
            "diverge_factor": _check_real("diverge_factor", self.diverge_factor, 0.0, low_open=False),
        }
        if 0 < reals["diverge_factor"] <= 1:
            raise ConfigError("diverge_factor", f"expected 0 (off) or a number > 1, got {self.diverge_factor!r}")
        for field, value in reals.items():
            object.__setattr__(self, field, value)
        if self.lr_milestones is not None:
            try:
                milestones = schedule.check_milestones(self.lr_milestones, self.lr_gamma)[0]
            except (ValueError, TypeError) as err:
                raise ConfigError("lr_milestones", str(err)) from None
            object.__setattr__(self, "lr_milestones", milestones or None)
        for field in ("standardize", "no_download", "no_plots"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(field, f"expected a bool, {_got(getattr(self, field))}")
        self._check_feedback_options()
        self._check_projection()
        _check_optional_str("data_dir", self.data_dir)
        _check_optional_str("device", self.device)
        try:
            every = parse_checkpoint_every(self.checkpoint_every)
        except ValueError as err:
            raise ConfigError("checkpoint_every", str(err)) from None
        object.__setattr__(self, "checkpoint_every", format_checkpoint_every(every))

    def _checked_layers(self) -> Tuple[int, ...]:
        layers = DEFAULT_LAYERS[self.dataset] if self.layers is None else self.layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (tuple, list)):
            raise ConfigError("layers", f"expected a sequence of ints such as (784, 200, 10), {_got(layers)}")
        if len(layers) < 2 or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in layers):
            raise ConfigError(
                "layers", f"expected at least two ints >= 1 (input and output widths), got {list(layers)!r}"
            )
        return tuple(int(n) for n in layers)

    def _check_arch(self) -> None:
        if self.layers is not None:
            raise ConfigError(
                "layers", f"expected None with arch {self.arch!r} (the arch gives the model), {_got(self.layers)}"
            )
        if not isinstance(self.arch, str):
            raise ConfigError("arch", f"expected None or an architecture string such as 'lenet5', {_got(self.arch)}")
        try:
            self.spec()  # parses the string and checks its shapes against the dataset's input
        except (ValueError, TypeError) as err:
            raise ConfigError("arch", f"{err} (dataset {self.dataset!r}, input shape {self.input_shape()})") from None

    def _check_layer_parallel(self) -> None:
        """stages and microbatches: ints >= 1; with stages >= 2, method 'dfa' and no devices; microbatches
        only with stages >= 2."""
        _check_int("stages", self.stages, 1, optional=True)
        _check_int("microbatches", self.microbatches, 1, optional=True)
        layered = self.stages is not None and self.stages >= 2
        if self.microbatches not in (None, 1) and not layered:
            raise ConfigError(
                "microbatches",
                f"expected None or 1 without stages >= 2 (micro-batches pipeline the stages of a layer-parallel "
                f"run), got {self.microbatches!r} with stages {self.stages!r}",
            )
        if layered and self.method != "dfa":
            raise ConfigError(
                "stages",
                f"expected None or 1 with method {self.method!r} (layer parallel trains method 'dfa' only: other "
                f"rules carry their signal down from block to block), got {self.stages!r}",
            )
        if layered and self.devices is not None:
            raise ConfigError(
                "stages",
                f"expected None or 1 with devices {self.devices!r} (data and layer parallel together are not "
                f"supported), got {self.stages!r}",
            )

    def _check_feedback_options(self) -> None:
        """Each preset option is set exactly when ``feedback_dist`` takes it, in range for the spec."""
        takes = FEEDBACK_PRESETS[self.feedback_dist].options if self.feedback_dist is not None else ()
        for option, field in FEEDBACK_OPTION_FIELDS.items():
            value, (what, ok) = getattr(self, field), OPTION_CHECKS[option]
            users = [name for name, preset in FEEDBACK_PRESETS.items() if option in preset.options]
            if option not in takes:
                if value is not None:
                    raise ConfigError(
                        field,
                        f"expected None with feedback_dist {self.feedback_dist!r} (only {users} take it), "
                        + _got(value),
                    )
                continue
            if value is None:
                raise ConfigError(field, f"expected {what} with feedback_dist {self.feedback_dist!r}, got None")
            if not ok(value) or (isinstance(value, float) and not math.isfinite(value)):
                raise ConfigError(field, f"expected {what}, {_got(value)}")
            object.__setattr__(self, field, float(value) if option == "density" else int(value))
        if self.feedback_dist in ("sparse", "lowrank"):  # bounds that depend on the network's shapes
            shapes = self.spec().feedback_shapes
            if self.feedback_k is not None and shapes and self.feedback_k > shapes[0][1]:
                raise ConfigError("feedback_k", f"expected an int <= n_L = {shapes[0][1]}, got {self.feedback_k}")
            limit = min((min(shape) for shape in shapes), default=None)
            if self.feedback_rank is not None and limit is not None and self.feedback_rank > limit:
                raise ConfigError(
                    "feedback_rank",
                    f"expected an int <= min(n_l, n_L) = {limit} over the hidden blocks, got {self.feedback_rank}",
                )

    def _check_projection(self) -> None:
        """The hardware fields: valid names and numbers, each set only where it is read, DFA only."""
        if self.quantize is not None:
            if not isinstance(self.quantize, str):
                raise ConfigError("quantize", f"expected None or one of {list(QUANTIZERS)}, {_got(self.quantize)}")
            try:
                Projection(quantize=self.quantize)
            except ValueError as err:
                raise ConfigError("quantize", str(err)) from None
        if self.threshold is not None and self.quantize != "ternary":
            raise ConfigError(
                "threshold",
                f"expected None unless quantize is 'ternary' (only it reads a threshold), "
                f"{_got(self.threshold)} with quantize {self.quantize!r}",
            )
        threshold = _check_real("threshold", self.threshold, 0.0, low_open=False, optional=True)
        if self.noise is not None:
            _check_choice("noise", self.noise, NOISES)
        for field in ("noise_sigma", "noise_mu"):
            if self.noise is None and getattr(self, field) is not None:
                raise ConfigError(
                    field,
                    f"expected None without noise (choose noise in {list(NOISES)}), " + _got(getattr(self, field)),
                )
        if self.noise is not None and self.noise_sigma is None:
            raise ConfigError(
                "noise_sigma",
                f"expected a number >= 0 with noise {self.noise!r} (the noise's standard deviation), got None",
            )
        sigma = _check_real("noise_sigma", self.noise_sigma, 0.0, low_open=False, optional=True)
        mu = _check_real("noise_mu", self.noise_mu, -math.inf, low_open=True, optional=True)
        hardware = "quantize" if self.quantize is not None else "noise" if self.noise is not None else None
        if hardware is not None and self.method != "dfa":
            raise ConfigError(
                hardware,
                f"expected None with method {self.method!r} (hardware effects act on DFA's projection "
                f"e B_l^T, method 'dfa' only), {_got(getattr(self, hardware))}",
            )
        for field, value in (("threshold", threshold), ("noise_sigma", sigma), ("noise_mu", mu)):
            object.__setattr__(self, field, value)

    # -- derived objects ------------------------------------------------------------------------

    def projection(self) -> Optional[Projection]:
        """The hardware effects on DFA's projection (``fit``'s ``projection``), or None when none is set."""
        if self.quantize is None and self.noise is None:
            return None
        return Projection(
            quantize=self.quantize,
            threshold=DEFAULT_THRESHOLD if self.threshold is None else self.threshold,
            noise=self.noise,
            sigma=0.0 if self.noise_sigma is None else self.noise_sigma,
            mu=0.0 if self.noise_mu is None else self.noise_mu,
        )

    def feedback_options(self) -> Dict[str, Any]:
        """The preset options to pass to ``init_feedback`` (``**config.feedback_options()``): the set ones."""
        return {
            option: getattr(self, field)
            for option, field in FEEDBACK_OPTION_FIELDS.items()
            if getattr(self, field) is not None
        }

    def input_shape(self) -> Tuple[int, ...]:
        """One sample's shape: the dataset's image shape (C, H, W) with an arch ('idx': MNIST's), else (n_0,)."""
        if self.arch is None:
            return (cast(Tuple[int, ...], self.layers)[0],)
        return INPUT_SHAPES.get(self.dataset, INPUT_SHAPES["mnist"])

    def spec(self) -> NetSpec:
        """The network: ``MLPSpec(layers, activation, output, reduction, dtype)``, or with ``arch`` a
        ``ModelSpec(input_shape(), parse_arch(arch), activation, output, reduction, dtype)``."""
        if self.arch is not None:
            layers = parse_arch(self.arch)
            return ModelSpec(self.input_shape(), layers, self.activation, self.output, self.reduction, self.dtype)
        widths = cast(Tuple[int, ...], self.layers)  # never None without arch: __post_init__ filled in the default
        return MLPSpec(widths, self.activation, self.output, self.reduction, self.dtype)

    def rule(self) -> Any:
        """The method ``fit`` takes: the rule's name, or for a hybrid ('dfa,bp,bp') a tuple of one per block."""
        parts = _method_parts(self.method)
        return parts[0] if len(parts) == 1 else parts

    def optimizer_spec(self) -> OptimizerSpec:
        """The optimizer: ``OptimizerSpec(optimizer, lr, momentum=momentum, weight_decay=weight_decay)``."""
        return OptimizerSpec(self.optimizer, self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def checkpoint_cadence(self) -> CheckpointEvery:
        """``checkpoint_every`` parsed (see ``dfa_train.cadence``)."""
        return parse_checkpoint_every(self.checkpoint_every)

    # -- copies ---------------------------------------------------------------------------------

    def replace(self, **changes) -> "RunConfig":
        """A copy with ``changes`` applied, validated again.

        Raises:
          TypeError: a name that is not a RunConfig field.
          ConfigError: a bad value.
        """
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise TypeError(f"RunConfig has no field(s) {unknown}; fields: {list(field_names())}")
        return dataclasses.replace(self, **changes)

    def with_method(self, method: str) -> "RunConfig":
        """The same run trained by ``method``; BP has no grouping mode, so it gets mode 'sample', and
        no hardware projection (DFA's only), so another method gets none."""
        if method == "dfa":
            return self.replace(method=method)
        return self.replace(method=method, mode="sample", **dict.fromkeys(HARDWARE_FIELDS))

    def for_seed(self, seed: int) -> "RunConfig":
        """Sweep member ``seed``: seed, param_seed = seed and feedback_seed = seed + FEEDBACK_SEED_OFFSET."""
        return self.replace(seed=seed, param_seed=seed, feedback_seed=seed + FEEDBACK_SEED_OFFSET)

    # -- JSON -----------------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """The fields as JSON-ready values (layers as a list) plus ``"version"``."""
        out: Dict[str, Any] = {"version": CONFIG_VERSION}
        for name in field_names():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self, indent: Optional[int] = 1) -> str:
        """``to_dict`` as JSON text; ``RunConfig.from_json`` reads it back equal."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text_or_dict: Union[str, bytes, Mapping[str, Any]]) -> "RunConfig":
        """Reads ``to_json``'s text (or the dict it parses to).

        Raises:
          ValueError: not JSON, not an object, another ``version``, or keys missing or unknown.
          ConfigError: a key with a value of the wrong type or range (names the key).
        """
        if isinstance(text_or_dict, (str, bytes)):
            try:
                data = json.loads(text_or_dict)
            except json.JSONDecodeError as err:
                raise ValueError(f"RunConfig.from_json: not JSON: {err}") from None
        else:
            data = text_or_dict
        if not isinstance(data, Mapping):
            raise ValueError(f"RunConfig.from_json: expected a JSON object, {_got(data)}")
        version = data.get("version")
        if version in (1, 2, 3, 4, 5) and not isinstance(version, bool):
            # An older layout: the fields added since (where missing) take the value meaning "as before".
            added = {k: v for since, fields in ADDED_IN.items() if since > version for k, v in fields.items()}
            data, version = {**added, **data, "version": CONFIG_VERSION}, CONFIG_VERSION
        if version != CONFIG_VERSION:
            raise ValueError(
                f"RunConfig.from_json: key 'version': expected {CONFIG_VERSION}, got {version!r} "
                "(a config written by another release of dfa_train, or not a run config)"
            )
        names = field_names()
        missing = [name for name in names if name not in data]
        unknown = sorted(set(data) - set(names) - {"version"})
        if missing:
            raise ValueError(f"RunConfig.from_json: missing key(s) {missing}")
        if unknown:
            raise ValueError(f"RunConfig.from_json: unknown key(s) {unknown}; known: {list(names)}")
        return cls(**{name: data[name] for name in names})


def field_names() -> Tuple[str, ...]:
    """RunConfig's field names, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(RunConfig))


__all__ = [
    "ADDED_IN",
    "CONFIG_VERSION",
    "ConfigError",
    "DATASETS",
    "DEFAULT_LAYERS",
    "FEEDBACK_OPTION_FIELDS",
    "FEEDBACK_SEED_OFFSET",
    "HARDWARE_FIELDS",
    "RunConfig",
    "field_names",
]
