"""The ``dfa`` command: arguments -> ``RunConfig`` -> ``run`` / ``compare`` / ``sweep``.

    dfa train --backend jax --dataset mnist --layers 784,200,10 --method dfa --epochs 80 --out runs/dfa
    dfa train --resume runs/dfa                 # continue an interrupted run exactly
    dfa compare --backend torch --epochs 10     # DFA and BP from the same initial weights
    dfa sweep --seeds 0-7 --lr 1e-4,3e-4 --epochs 20 --out runs/sweep   # members trained together
    dfa summary --layers 784,200,10

A run folder holds config.json (everything needed to rerun), history.jsonl (one record
per epoch), checkpoint.npz (+ .json; written every --checkpoint-every, at the end, before
a divergence stop and on Ctrl-C / SIGTERM), metrics.json and PNG figures (see
``dfa_train.run``; a sweep's folder is described in ``dfa_train.sweep``). Exit codes: 0
success, 2 bad arguments, 1 failure (data not found, bad values found while training), 3
non-finite loss, 130 interrupted (Ctrl-C or SIGTERM; the checkpoint of the last finished
epoch is kept, resume with --resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from dfa_core import init as dfa_init
from dfa_core.parallel import launched_rank, launched_world_size
from dfa_core.registry import BACKEND_NAMES
from dfa_core.spec import ACTIVATIONS, DTYPES, METHODS, MODES, OPTIMIZERS, OUTPUTS, REDUCTIONS
from dfa_train.cadence import parse_checkpoint_every
from dfa_train.checkpoint import CHECKPOINT_NAME
from dfa_train.config import DATASETS, ConfigError, RunConfig, field_names
from dfa_train.schedule import parse_milestones
from dfa_train.tables import model_table  # noqa: F401  (re-exported: `from dfa_train.cli import model_table`)

EXIT_FAILURE, EXIT_USAGE, EXIT_NONFINITE, EXIT_INTERRUPTED = 1, 2, 3, 130

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig)}  # the options' defaults, said once


# ---------------------------------------------------------------------------------------------
# Argument types: each error becomes exit 2 with argparse's "argument --x: ..." prefix


def parse_layers(text: str) -> Tuple[int, ...]:
    """'784,200,10' -> (784, 200, 10); argparse turns the error into exit 2 with this message."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid layers {text!r}: expected comma-separated positive ints such as 784,200,10"
        ) from None
    if len(sizes) < 2 or any(n <= 0 for n in sizes):
        raise argparse.ArgumentTypeError(
            f"invalid layers {text!r}: need at least an input and an output width, all > 0 (e.g. 784,200,10)"
        )
    return sizes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}")
    return value


def _method(text: str) -> str:
    """A rule name, or a comma-separated rule per block; kept as the string RunConfig.method holds."""
    bad = [part for part in text.split(",") if part not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"expected rules among {', '.join(METHODS)} (comma-separated), got {text!r}")
    return text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _argument_type(parse):
    """An argparse type from a parser that raises ValueError (the message becomes argparse's)."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parse.__name__
    return convert


def _checkpoint_every(text: str) -> str:
    parse_checkpoint_every(text)
    return text


def _seeds(text: str):
    from dfa_train.sweep import parse_seeds

    return parse_seeds(text)


def _arch(text: str) -> str:
    from dfa_train.arch import parse_arch

    parse_arch(text)
    return text


def _quantize(text: str) -> str:
    from dfa_core.hardware import Projection

    Projection(quantize=text)  # the one check of the names and of kbit's N
    return text


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _floats(text: str):
    from dfa_train.sweep import parse_floats

    return parse_floats(text)


# ---------------------------------------------------------------------------------------------
# Options


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layers",
        type=parse_layers,
        default=None,
        help="comma-separated widths, input first (default 784,200,10 for mnist, 2,4,1 for xor)",
    )
    p.add_argument(
        "--arch",
        type=_argument_type(_arch),
        default=None,
        help="a model of layers instead of an MLP: 'lenet5', 'convnet6' or tokens such as "
        "conv6k5p2,maxpool2,conv16k5,maxpool2,flatten,dense120,dense84,dense10 (input shape from --dataset)",
    )
    p.add_argument("--activation", choices=ACTIVATIONS, default=_DEFAULTS["activation"])
    p.add_argument("--output", choices=OUTPUTS, default=_DEFAULTS["output"])
    p.add_argument("--reduction", choices=REDUCTIONS, default=_DEFAULTS["reduction"])
    p.add_argument("--dtype", choices=DTYPES, default=_DEFAULTS["dtype"])


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKEND_NAMES, default=_DEFAULTS["backend"])
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=_DEFAULTS["dataset"],
        help="mnist (verified, downloaded if missing), mnist-slice (the bundled first 2,000 "
        "training / 500 test images), idx (any MNIST-layout folder given by --data-dir, e.g. "
        "Fashion-MNIST; unverified) or xor",
    )
    p.add_argument(
        "--data-dir", default=None, help="folder of the IDX files (default $DFA_DATA_DIR, the cache, else a download)"
    )
    p.add_argument("--no-download", action="store_true", help="never download MNIST")
    p.add_argument(
        "--timeout",
        dest="download_timeout",
        type=_positive_float,
        default=30.0,
        help="seconds a download may wait for data before trying the next mirror (default 30)",
    )
    p.add_argument("--limit-train", type=_positive_int, default=None, help="use the first N training samples")
    p.add_argument("--limit-test", type=_positive_int, default=None, help="use the first N test samples")
    p.add_argument("--standardize", action="store_true", help="standardise inputs (train mean/std) instead of [0,1]")


def _add_training_args(p: argparse.ArgumentParser, with_method: bool, lr_list: bool) -> None:
    if with_method:
        p.add_argument(
            "--method",
            type=_method,
            default=_DEFAULTS["method"],
            metavar="RULE[,RULE...]",
            help=f"learning rule, one of {', '.join(METHODS)}; or one per block, comma-separated "
            "(a hybrid, e.g. dfa,bp,bp: DFA in the first block, BP above)",
        )
    p.add_argument("--mode", choices=MODES, default=_DEFAULTS["mode"], help="DFA grouping (BP always uses sample)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=_DEFAULTS["optimizer"])
    if lr_list:
        p.add_argument(
            "--lr",
            type=_argument_type(_floats),
            default=(_DEFAULTS["lr"],),
            help="learning rates, comma-separated (one setting each), e.g. 1e-4,3e-4",
        )
    else:
        p.add_argument("--lr", type=_positive_float, default=_DEFAULTS["lr"])
    p.add_argument("--momentum", type=float, default=_DEFAULTS["momentum"])
    p.add_argument(
        "--lr-milestones",
        type=_argument_type(parse_milestones),
        default=_DEFAULTS["lr_milestones"],
        metavar="E1,E2",
        help="epochs at which the learning rate is multiplied by --lr-gamma (torch's MultiStepLR), e.g. 50,75",
    )
    p.add_argument("--lr-gamma", type=float, default=_DEFAULTS["lr_gamma"], help="--lr-milestones' factor (0.1)")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=_DEFAULTS["weight_decay"],
        help="L2 coefficient lambda >= 0: every gradient gets + lambda * p (as torch.optim's weight_decay)",
    )
    p.add_argument(
        "--kp-decay",
        type=float,
        default=_DEFAULTS["kp_decay"],
        help="Kolen-Pollack's lambda in [0, 1): W_{l+1} and B_l of kp blocks decay by lambda per step (1e-4)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=_DEFAULTS["batch_size"])
    p.add_argument("--epochs", type=_positive_int, default=_DEFAULTS["epochs"])
    p.add_argument(
        "--feedback-dist",
        choices=dfa_init.FEEDBACK_DISTS,
        default=_DEFAULTS["feedback_dist"],
        help="feedback preset (dfa_core.feedback): normal N(0, 1.9^2) by default, uniform U(+-1/sqrt(n_l)), "
        "shared (TinyDFA), sparse (needs --feedback-k), ternary (needs --feedback-density), lowrank "
        "(needs --feedback-rank), orthogonal",
    )
    p.add_argument(
        "--feedback-scale",
        type=_positive_float,
        default=_DEFAULTS["feedback_scale"],
        help="multiplies the preset (std of normal, half-width of uniform, ...); default: the preset's own",
    )
    p.add_argument(
        "--feedback-density",
        type=_positive_float,
        default=_DEFAULTS["feedback_density"],
        help="ternary: fraction of non-zero feedback entries, in (0, 1]",
    )
    p.add_argument(
        "--feedback-k",
        type=_positive_int,
        default=_DEFAULTS["feedback_k"],
        help="sparse: non-zeros per row of each B_l (per hidden unit), at most n_L",
    )
    p.add_argument(
        "--feedback-rank",
        type=_positive_int,
        default=_DEFAULTS["feedback_rank"],
        help="lowrank: rank of each B_l, at most min(n_l, n_L)",
    )
    p.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:1) or JAX platform (cpu, gpu)")
    p.add_argument("--tol", type=float, default=None, help="stop when the training error moves by <= tol")
    p.add_argument(
        "--diverge-factor",
        type=float,
        default=_DEFAULTS["diverge_factor"],
        help="stop (exit 3) when an epoch's loss exceeds this multiple of the initial loss; 0 turns "
        "the guard off (NaN/inf always stop)",
    )
    p.add_argument("--patience", type=_positive_int, default=_DEFAULTS["patience"])
    p.add_argument(
        "--align-every",
        type=_non_negative_int,
        default=_DEFAULTS["align_every"],
        help="measure the angles of each block's update to BP's gradient every K steps (0: never)",
    )
    p.add_argument("--no-plots", action="store_true")


def _add_hardware_args(p: argparse.ArgumentParser) -> None:
    """DFA on hardware (dfa_core.hardware.Projection): error quantisation and projection noise."""
    from dfa_core.hardware import DEFAULT_THRESHOLD, NOISES

    p.add_argument(
        "--quantize",
        type=_argument_type(_quantize),
        default=_DEFAULTS["quantize"],
        metavar="{ternary,sign,kbit:N}",
        help="DFA only: quantise the error before projecting it: ternary ({-1,0,+1} with --threshold, as "
        "photonic DFA), sign, or kbit:N (N bits, uniform, per-batch scale)",
    )
    p.add_argument(
        "--threshold",
        type=_finite_float,
        default=_DEFAULTS["threshold"],
        help=f"--quantize ternary: |e| > threshold maps to sign(e), else 0 (default {DEFAULT_THRESHOLD})",
    )
    p.add_argument(
        "--noise",
        choices=NOISES,
        default=_DEFAULTS["noise"],
        help="DFA only: projection noise, additive (B e + max|e| N(mu, sigma^2), the optical DFA model) or "
        "multiplicative (B e * (1 + N(mu, sigma^2))); needs --noise-sigma",
    )
    p.add_argument(
        "--noise-sigma", type=_finite_float, default=_DEFAULTS["noise_sigma"], help="--noise: standard deviation"
    )
    p.add_argument("--noise-mu", type=_finite_float, default=_DEFAULTS["noise_mu"], help="--noise: mean (default 0)")


def _add_single_run_args(p: argparse.ArgumentParser) -> None:
    """Seeds, checkpoint cadence and the progress bar: options of train and compare, not of sweep."""
    p.add_argument("--seed", type=_non_negative_int, default=_DEFAULTS["seed"], help="seed of the batch order")
    p.add_argument(
        "--param-seed", type=_non_negative_int, default=_DEFAULTS["param_seed"], help="seed of the initial weights"
    )
    p.add_argument("--feedback-seed", type=_non_negative_int, default=_DEFAULTS["feedback_seed"])
    p.add_argument(
        "--checkpoint-every",
        type=_argument_type(_checkpoint_every),
        default=_DEFAULTS["checkpoint_every"],
        metavar="{N,Ns,auto}",
        help="write the checkpoint every N epochs, every N seconds (e.g. 30s) or, with auto, when the "
        "time since the last write is >= 20x its duration (< 5%% of the run); always at the end, "
        "before a divergence stop and on Ctrl-C / SIGTERM",
    )
    _add_progress_arg(p)


def _add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help="progress bar: auto shows it when stdout is a terminal",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfa", description="Direct Feedback Alignment: train, compare, inspect.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, with_method, folder in (
        ("train", "train one network by DFA or BP", True, "<method>"),
        ("compare", "DFA and BP from the same initial weights, one table and plots", False, "compare"),
    ):
        p = sub.add_parser(name, help=help_text)
        _add_data_args(p)
        _add_model_args(p)
        _add_training_args(p, with_method=with_method, lr_list=False)
        _add_single_run_args(p)
        p.add_argument("--out", default=None, help=f"folder (default runs/<timestamp>-{folder}-<backend>)")
    _add_hardware_args(sub.choices["train"])
    sub.choices["train"].add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        help="data parallel over N devices: JAX shards each batch over N devices in this process; torch takes "
        "one process per device, launched by torchrun (N defaults to its world size). The batch size must be "
        "a multiple of N",
    )
    sub.choices["train"].add_argument(
        "--stages",
        type=_positive_int,
        default=None,
        metavar="S",
        help="layer-parallel DFA over S stages (method dfa): the blocks cut into S contiguous stages, one per "
        "device; JAX: S devices of this process; torch: one process per stage, launched by torchrun with S "
        "processes. Measures no alignment angles (--align-every defaults to 0)",
    )
    sub.choices["train"].add_argument(
        "--microbatches",
        type=_positive_int,
        default=None,
        metavar="M",
        help="with --stages: M micro-batches per batch, pipelined through the stages (default 1); results do "
        "not depend on it",
    )
    sub.choices["train"].add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint (its config is used; --epochs may raise the total, "
        "--checkpoint-every and --device may change)",
    )
    sub.choices["compare"].add_argument(
        "--resume",
        default=None,
        metavar="OUT",
        help="finish the comparison in OUT: a finished method is kept, an interrupted one resumes",
    )
    sweep = sub.add_parser("sweep", help="every (lr, seed) member trained together by fit_many; mean +- std")
    _add_data_args(sweep)
    _add_model_args(sweep)
    _add_training_args(sweep, with_method=True, lr_list=True)
    _add_hardware_args(sweep)
    sweep.add_argument(
        "--seeds",
        type=_argument_type(_seeds),
        default=None,
        help="member seeds (required unless --resume): 0-7, 0,3,5 or 4; seed s trains with seed s, "
        "param seed s, feedback seed s+1",
    )
    sweep.add_argument("--out", default=None, help="folder (default runs/<timestamp>-sweep-<backend>)")
    sweep.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="finish the interrupted sweep in DIR from its checkpoints, with the settings of DIR/sweep.json "
        "(no other option but --progress)",
    )
    _add_progress_arg(sweep)
    summary = sub.add_parser("summary", help="print the model table (layers, shapes, parameters, feedback, FLOPs)")
    _add_model_args(summary)
    summary.add_argument(
        "--dataset", choices=DATASETS, default=_DEFAULTS["dataset"], help="sets the input shape of an --arch model"
    )
    return parser


# ---------------------------------------------------------------------------------------------
# Commands


def _config_from_args(args, **overrides) -> RunConfig:
    """The RunConfig of the parsed options (RunConfig validates them; a ConfigError exits 2)."""
    values = {name: getattr(args, name) for name in field_names() if hasattr(args, name)}
    values.update(overrides)
    return RunConfig(**values)


def _progress_enabled(args) -> bool:
    return args.progress == "on" or (args.progress == "auto" and sys.stdout.isatty())


def _timestamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _explicit_options(parser, argv: Sequence[str]) -> Dict[str, Any]:
    """The options the user typed (any spelling: --epochs=4, --epoch 4), with their parsed values.

    Parses ``argv`` again with every default suppressed, so only what was given appears.
    """
    actions = [a for p in _subparsers(parser) for a in p._actions]
    saved = [(a, a.default) for a in actions]
    for a in actions:
        a.default = argparse.SUPPRESS
    try:
        given = vars(parser.parse_args(argv))
    finally:
        for a, default in saved:
            a.default = default
    given.pop("command", None)
    return given


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.values()


# Options that only steer this invocation, never the run's results.
_RESUME_FREE = ("resume", "progress", "out")
_RESUME_SETTABLE = (
    "epochs",
    "checkpoint_every",
    "device",
    "devices",
    "stages",
    "microbatches",
    "backend",
    "data_dir",
    "no_download",
    "no_plots",
    "download_timeout",
    "diverge_factor",
)


def _not_resumable(run_dir: str) -> str:
    """Why ``run_dir`` cannot be resumed, naming what it holds instead of a run's checkpoint."""
    finished = os.path.isfile(os.path.join(run_dir, "summary.json"))
    if not finished and os.path.isfile(os.path.join(run_dir, "sweep.json")):
        return f"{run_dir!r} holds an unfinished sweep; continue it with dfa sweep --resume {run_dir}"
    if finished:
        return (
            f"{run_dir!r} holds a finished sweep (summary.json); its member folders hold finished runs "
            "(config.json, metrics.json, params.npz)"
        )
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        return (
            f"{run_dir!r} has config.json but no {CHECKPOINT_NAME}: a sweep member (finished, "
            "written without a checkpoint) or a run stopped before its first checkpoint"
        )
    return f"no config.json and {CHECKPOINT_NAME} in {run_dir!r}"


def _resume_config(parser, args, argv: Sequence[str], run_dir: str) -> RunConfig:
    from dfa_train.run_files import read_config

    if not all(os.path.isfile(os.path.join(run_dir, name)) for name in ("config.json", CHECKPOINT_NAME)):
        parser.error(f"--resume {args.resume!r}: {_not_resumable(run_dir)}")
    config = read_config(run_dir)
    given = {k: v for k, v in _explicit_options(parser, argv).items() if k not in _RESUME_FREE}
    saved = config.to_dict()
    conflicts = sorted(
        k for k, v in given.items() if k not in _RESUME_SETTABLE and k in saved and _plain(v) != _plain(saved[k])
    )
    if conflicts:
        parser.error(
            "--resume continues the run as config.json describes it; these options differ from it "
            f"and cannot change on resume: {', '.join(_option(k) for k in conflicts)} "
            f"(settable on resume: {', '.join(_option(k) for k in _RESUME_SETTABLE)})"
        )
    return config.replace(**{k: v for k, v in given.items() if k in _RESUME_SETTABLE})


def _option(dest: str) -> str:
    """The command-line spelling of an option's destination."""
    return {"download_timeout": "--timeout"}.get(dest, "--" + dest.replace("_", "-"))


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def cmd_train(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> int:
    from dfa_train.run import resolve_dataset, run
    from dfa_train.tables import summary_line

    if args.resume:
        config, run_dir = _resume_config(parser, args, argv, args.resume), args.resume
    else:
        config = resolve_dataset(_config_from_args(args))
        layered = config.stages is not None and config.stages >= 2
        if layered and "align_every" not in _explicit_options(parser, argv):
            # Layer parallel measures no alignment angles (it refuses align_every > 0): the default is off there.
            config = config.replace(align_every=0)
        run_dir = args.out or os.path.join("runs", f"{_timestamp()}-{config.method}-{config.backend}")
        # Under torchrun rank 0 alone checks: it writes the folder, maybe before another rank gets here.
        if launched_rank() == 0 and os.path.exists(os.path.join(run_dir, CHECKPOINT_NAME)):
            parser.error(
                f"--out {run_dir!r} already holds a run; resume it with --resume {run_dir} or choose another folder"
            )
    args.run_dir = run_dir
    main = launched_rank() == 0  # under torchrun, rank 0 alone writes and reports
    result = run(config, run_dir, resume=bool(args.resume), progress=main and _progress_enabled(args))
    if main:
        print(summary_line(config.method.upper(), result.metrics))
        print(f"run folder: {run_dir}")
    return 0


def _refuse_torchrun(parser: argparse.ArgumentParser, command: str) -> None:
    if launched_world_size() > 1:
        parser.error(
            f"dfa {command} does not run under torchrun (WORLD_SIZE={launched_world_size()}); "
            "torchrun launches `dfa train` for data- or layer-parallel training"
        )


def cmd_compare(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> int:
    from dfa_train.run import compare, resolve_dataset
    from dfa_train.tables import comparison_table

    _refuse_torchrun(parser, "compare")
    if args.resume:
        out = args.resume
        config = _resume_config(parser, args, argv, os.path.join(out, "dfa")).replace(no_plots=args.no_plots)
    else:
        config = resolve_dataset(_config_from_args(args))
        out = args.out or os.path.join("runs", f"{_timestamp()}-compare-{config.backend}")
    args.run_dir = out
    results = compare(config, out, progress=_progress_enabled(args), resume=bool(args.resume))
    print(comparison_table({label: r.metrics for label, r in results.items()}), end="")
    print(f"comparison folder: {out}")
    return 0


def cmd_sweep(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> int:
    from dfa_train.run import resolve_dataset
    from dfa_train.sweep import resume_sweep, sweep
    from dfa_train.tables import sweep_table

    _refuse_torchrun(parser, "sweep")
    if args.resume is not None:
        others = sorted(k for k in _explicit_options(parser, argv) if k not in ("command", "resume", "progress"))
        if others:
            parser.error(
                f"--resume finishes a sweep with the settings of its sweep.json; it takes no other option, "
                f"got {', '.join(_option(k) for k in others)}"
            )
        args.run_dir = args.resume
        summary = resume_sweep(args.resume, progress=_progress_enabled(args))
        print(sweep_table(summary), end="")
        print(f"sweep folder: {args.resume}")
        return 0
    if args.seeds is None:
        parser.error("the following arguments are required: --seeds (or --resume DIR)")
    config = resolve_dataset(_config_from_args(args, lr=args.lr[0]))
    out = args.out or os.path.join("runs", f"{_timestamp()}-sweep-{config.backend}")
    if os.path.exists(os.path.join(out, "summary.json")):
        parser.error(f"--out {out!r} already holds a sweep; choose another folder")
    args.run_dir = out
    summary = sweep(config, args.seeds, out, lrs=args.lr, progress=_progress_enabled(args))
    print(sweep_table(summary), end="")
    print(f"sweep folder: {out}")
    return 0


def cmd_summary(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> int:
    config = _config_from_args(args)
    print(model_table(config.spec()))
    return 0


def _interrupted_message(command: str, run_dir: Optional[str]) -> str:
    """What survives an interrupt, and how to continue: only what is really on disk."""
    folders = [run_dir] if command == "train" else [os.path.join(run_dir, m) for m in ("dfa", "bp")] if run_dir else []
    kept = [f for f in folders if f and os.path.isfile(os.path.join(f, CHECKPOINT_NAME))]
    if command in ("train", "compare") and kept:
        return (
            f"interrupted: the checkpoint of the last finished epoch is kept; continue with "
            f"dfa {command} --resume {run_dir}"
        )
    if command == "sweep" and run_dir and os.path.isfile(os.path.join(run_dir, "sweep.json")):
        return f"interrupted: the last checkpoint of each group is kept; continue with dfa sweep --resume {run_dir}"
    return "interrupted before any epoch was saved: nothing was kept; start again"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dfa`` console script; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    from dfa_train.data import DatasetNotFoundError
    from dfa_train.state import DivergenceError

    commands = {"train": cmd_train, "compare": cmd_compare, "sweep": cmd_sweep, "summary": cmd_summary}
    try:
        return commands[args.command](parser, args, argv)
    except ConfigError as err:
        parser.error(f"argument --{err.field.replace('_', '-')}: {err.detail}")
    except KeyboardInterrupt:
        print("\n" + _interrupted_message(args.command, getattr(args, "run_dir", None)), file=sys.stderr)
        return EXIT_INTERRUPTED
    except DivergenceError as err:
        print(f"dfa: error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except (DatasetNotFoundError, OSError, ValueError, TypeError, ImportError, MemoryError) as err:
        print(f"dfa: error: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
