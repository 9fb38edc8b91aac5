"""The ``dfa`` command: train DFA or BP on MNIST/XOR with either backend, compare them, print a model.

    dfa train --backend jax --dataset mnist --layers 784,200,10 --method dfa --epochs 80 --out runs/dfa
    dfa train --resume runs/dfa                 # continue an interrupted run exactly
    dfa compare --backend torch --epochs 10     # DFA and BP from the same initial weights
    dfa summary --layers 784,200,10

A run folder holds config.json (everything needed to rerun), history.jsonl (one record
per epoch), checkpoint.npz (+ .json; the state after the last finished epoch),
metrics.json and PNG figures. Exit codes: 0 success, 2 bad arguments, 1 failure
(data not found, bad values found while training), 3 non-finite loss, 130 interrupted
(Ctrl-C; the checkpoint of the last finished epoch is kept, resume with --resume).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dfa_core import init as dfa_init
from dfa_train.checkpoint import CHECKPOINT_NAME, Checkpoint, atomic_write_text, load_checkpoint, save_checkpoint
from dfa_core.registry import BACKEND_NAMES
from dfa_core.spec import ACTIVATIONS, DTYPES, MODES, OPTIMIZERS, OUTPUTS, REDUCTIONS, MLPSpec, OptimizerSpec

DATASETS = ("mnist", "idx", "xor")
EXIT_FAILURE, EXIT_USAGE, EXIT_NONFINITE, EXIT_INTERRUPTED = 1, 2, 3, 130

# The options a run's config.json records; --resume restores them.
_RUN_KEYS = (
    "backend", "dataset", "data_dir", "layers", "activation", "output", "method", "mode", "optimizer", "lr",
    "momentum", "reduction", "batch_size", "epochs", "seed", "param_seed", "feedback_seed", "feedback_dist",
    "feedback_scale", "dtype", "device", "tol", "patience", "limit_train", "limit_test", "align_every",
    "standardize",
)


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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=parse_layers, default=None,
                   help="comma-separated widths, input first (default 784,200,10 for mnist, 2,4,1 for xor)")
    p.add_argument("--activation", choices=ACTIVATIONS, default="tanh")
    p.add_argument("--output", choices=OUTPUTS, default="sigmoid")
    p.add_argument("--reduction", choices=REDUCTIONS, default="sum")
    p.add_argument("--dtype", choices=DTYPES, default="float32")


def _add_train_args(p: argparse.ArgumentParser, with_method: bool) -> None:
    p.add_argument("--backend", choices=BACKEND_NAMES, default="torch")
    p.add_argument("--dataset", choices=DATASETS, default="mnist",
                   help="mnist (verified, downloaded if missing), idx (any MNIST-layout folder given by "
                        "--data-dir, e.g. Fashion-MNIST; unverified) or xor")
    p.add_argument("--data-dir", default=None, help="folder of the IDX files (default $DFA_DATA_DIR, the cache, "
                                                    "else a download)")
    p.add_argument("--no-download", action="store_true", help="never download MNIST")
    _add_model_args(p)
    if with_method:
        p.add_argument("--method", choices=("dfa", "bp"), default="dfa")
    p.add_argument("--mode", choices=MODES, default="sample", help="DFA grouping (BP always uses sample)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--lr", type=_positive_float, default=1e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch-size", type=_positive_int, default=200)
    p.add_argument("--epochs", type=_positive_int, default=80)
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the batch order")
    p.add_argument("--param-seed", type=_non_negative_int, default=0, help="seed of the initial weights")
    p.add_argument("--feedback-seed", type=_non_negative_int, default=1)
    p.add_argument("--feedback-dist", choices=dfa_init.FEEDBACK_DISTS, default="normal")
    p.add_argument("--feedback-scale", type=_positive_float, default=dfa_init.DEFAULT_FEEDBACK_SCALE)
    p.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:1) or JAX platform (cpu, gpu)")
    p.add_argument("--tol", type=float, default=None, help="stop when the training error moves by <= tol")
    p.add_argument("--patience", type=_positive_int, default=1)
    p.add_argument("--limit-train", type=_positive_int, default=None, help="use the first N training samples")
    p.add_argument("--limit-test", type=_positive_int, default=None, help="use the first N test samples")
    p.add_argument("--standardize", action="store_true", help="standardise inputs (train mean/std) instead of [0,1]")
    p.add_argument("--align-every", type=_non_negative_int, default=50,
                   help="measure DFA-vs-BP angles every K steps (0: never)")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar: auto shows it when stdout is a terminal")
    p.add_argument("--no-plots", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfa", description="Direct Feedback Alignment: train, compare, inspect.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one network by DFA or BP")
    _add_train_args(train, with_method=True)
    train.add_argument("--out", default=None, help="run folder (default runs/<timestamp>-<method>-<backend>)")
    train.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its checkpoint (its config is used; "
                            "--epochs may raise the total)")
    compare = sub.add_parser("compare", help="DFA and BP from the same initial weights, one table and plots")
    _add_train_args(compare, with_method=False)
    compare.add_argument("--out", default=None, help="folder (default runs/<timestamp>-compare-<backend>)")
    summary = sub.add_parser("summary", help="print the model table")
    _add_model_args(summary)
    return parser


# ---------------------------------------------------------------------------------------------
# Data


def load_data(cfg: Dict[str, Any]):
    """(x_train, y_train, x_test, y_test) for a run config, limited and scaled as it asks."""
    from dfa_train import data

    if cfg["dataset"] == "xor":
        x, y = data.xor_dataset(cfg["dtype"])
        return x, y, x, y
    if cfg["dataset"] == "idx":
        if cfg["data_dir"] is None:
            raise data.DatasetNotFoundError("--dataset idx needs --data-dir, the folder of the four IDX files")
        d = data.load_idx_dataset(cfg["data_dir"], cfg["dtype"])
    else:
        folder = data.find_mnist(cfg["data_dir"], download=not cfg.get("no_download", False))
        d = data.load_mnist(folder, cfg["dtype"])
    x_train, y_train, x_test, y_test = d
    if cfg["limit_train"]:
        x_train, y_train = x_train[: cfg["limit_train"]], y_train[: cfg["limit_train"]]
    if cfg["limit_test"]:
        x_test, y_test = x_test[: cfg["limit_test"]], y_test[: cfg["limit_test"]]
    if cfg["standardize"]:
        x_train, x_test = data.standardize(x_train, x_test)
    return x_train, y_train, x_test, y_test


def _default_layers(dataset: str) -> Tuple[int, ...]:
    return (2, 4, 1) if dataset == "xor" else (784, 200, 10)


def spec_of(cfg: Dict[str, Any]) -> MLPSpec:
    return MLPSpec(tuple(cfg["layers"]), cfg["activation"], cfg["output"], cfg["reduction"], cfg["dtype"])


def optimizer_of(cfg: Dict[str, Any]) -> OptimizerSpec:
    return OptimizerSpec(cfg["optimizer"], cfg["lr"], momentum=cfg["momentum"])


# ---------------------------------------------------------------------------------------------
# One run


@contextlib.contextmanager
def device_scope(backend: str, device: Optional[str]):
    """Makes ``device`` the default device of the backend while training."""
    if device is None:
        yield
        return
    if backend == "torch":
        import torch

        previous = torch.get_default_device()
        torch.set_default_device(device)
        try:
            yield
        finally:
            torch.set_default_device(previous)
    else:
        import jax

        with jax.default_device(jax.devices(device)[0]):
            yield


class _Progress:
    """A tqdm bar over the run's steps, updated per batch, with loss, error and speed per epoch."""

    def __init__(self, enabled: bool, label: str, total_steps: int, done_steps: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=done_steps, desc=label, unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def batch(self, epoch: int, index: int, num_batches: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def epoch(self, e) -> None:
        if self.bar is not None:
            post = dict(epoch=f"{e.epoch}/{e.epochs}", loss=f"{e.loss:.4f}", err=f"{100 * e.train_error:.2f}%",
                        samples_s=f"{e.samples_per_s:.0f}")
            if e.test_accuracy is not None:
                post["test_acc"] = f"{100 * e.test_accuracy:.2f}%"
            self.bar.set_postfix(post)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(v):
    return None if v is None or not np.isfinite(v) else float(v)


def _read_history(run_dir: str, up_to_epoch: Optional[int] = None) -> List[Dict[str, Any]]:
    path = os.path.join(run_dir, "history.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if up_to_epoch is None or r["epoch"] <= up_to_epoch]


def _write_history(run_dir: str, records: List[Dict[str, Any]]) -> None:
    atomic_write_text(os.path.join(run_dir, "history.jsonl"), "".join(json.dumps(r) + "\n" for r in records))


def run_training(cfg: Dict[str, Any], run_dir: str, data, *, resume: bool = False, progress: bool = False,
                 params=None, label: str = "") -> Dict[str, Any]:
    """Trains one run into ``run_dir``: config, history, checkpoints, metrics and plots.

    Returns:
      The metrics dict written to metrics.json.

    Raises:
      NonFiniteLossError: the loss became NaN/inf (the checkpoint of the last finite epoch is kept).
      KeyboardInterrupt: Ctrl-C (the checkpoint of the last finished epoch is kept).
    """
    from dfa_train.trainer import fit

    x_train, y_train, x_test, y_test = data
    spec, opt = spec_of(cfg), optimizer_of(cfg)
    os.makedirs(run_dir, exist_ok=True)
    ckpt_path = os.path.join(run_dir, CHECKPOINT_NAME)
    mode = cfg["mode"] if cfg["method"] == "dfa" else "sample"
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        params, feedback, state = ckpt.params, ckpt.feedback, ckpt.resume
        records = _read_history(run_dir, state.epoch)
        _write_history(run_dir, records)
    else:
        atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(cfg, indent=1, default=_json_default))
        params = dfa_init.init_params(spec, cfg["param_seed"]) if params is None else params
        feedback = dfa_init.init_feedback(spec, cfg["feedback_seed"], cfg["feedback_dist"], cfg["feedback_scale"])
        state, records = None, []
        _write_history(run_dir, records)
        # Epoch 0: a Ctrl-C in the first epoch still leaves a checkpoint to resume from.
        from dfa_train.trainer import ResumeState

        rng = np.random.default_rng(cfg["seed"])
        save_checkpoint(ckpt_path, Checkpoint(params, feedback, ResumeState(0, 0, rng.bit_generator.state, None),
                                              {"config": cfg}))
    n = x_train.shape[0]
    steps_per_epoch = -(-n // cfg["batch_size"])
    done = state.epoch if state is not None else 0
    bar = _Progress(progress, label or f"{cfg['method']}/{cfg['backend']}", cfg["epochs"] * steps_per_epoch,
                    done * steps_per_epoch)

    def on_epoch(e):
        record = {
            "epoch": e.epoch, "loss": _finite(e.loss), "train_error": e.train_error,
            "test_accuracy": e.test_accuracy, "time_s": e.time_s, "samples_per_s": e.samples_per_s,
            "alignment": [{"step": r.step, "weights": [_finite(v) for v in r.weights],
                           "deltas": [_finite(v) for v in r.deltas]} for r in e.alignment],
        }
        save_checkpoint(ckpt_path, Checkpoint(e.params, e.feedback, e.resume, {"config": cfg,
                                                                               "backend": cfg["backend"]}))
        records.append(record)
        with open(os.path.join(run_dir, "history.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.epoch(e)

    try:
        with device_scope(cfg["backend"], cfg["device"]):
            history = fit(
                cfg["backend"], spec, x_train, y_train, x_test=x_test, y_test=y_test, method=cfg["method"],
                mode=mode, optimizer=opt, epochs=cfg["epochs"], batch_size=cfg["batch_size"], seed=cfg["seed"],
                params=params, feedback=feedback, tol=cfg["tol"], patience=cfg["patience"],
                align_every=cfg["align_every"], resume=state, on_epoch=on_epoch, on_batch=bar.batch,
                stop_on_nonfinite=True,
            )
    finally:
        bar.close()
    wall = sum(r["time_s"] for r in records)
    metrics = {
        "method": cfg["method"], "backend": cfg["backend"], "mode": mode,
        "test_accuracy": history.test_accuracy[-1] if history.test_accuracy else None,
        "train_error": [r["train_error"] for r in records],
        "loss": [r["loss"] for r in records],
        "test_accuracy_per_epoch": [r["test_accuracy"] for r in records],
        "epochs_run": len(records),
        "stopped_early": history.stopped_early,
        "wall_s": wall,
        "samples_per_s": n * len(records) / wall if wall > 0 else None,
        "confusion": history.confusion.tolist(),
        "confusion_split": history.confusion_split,
        "n_train": int(n), "n_test": int(x_test.shape[0]),
    }
    if history.confusion.shape[0] > 0:
        from dfa_train.plots import precision_recall

        precision, recall = precision_recall(history.confusion)
        metrics["precision"] = [_finite(v) for v in precision]
        metrics["recall"] = [_finite(v) for v in recall]
    atomic_write_text(os.path.join(run_dir, "metrics.json"), json.dumps(metrics, indent=1))
    np.savez(os.path.join(run_dir, "params.npz"),
             **{f"{k}{l}": a for l, pair in enumerate(history.params) for k, a in zip("Wb", pair)})
    if not cfg.get("no_plots"):
        write_plots(run_dir, {cfg["method"].upper(): metrics}, records, steps_per_epoch)
    return metrics


def write_plots(out_dir: str, runs: Dict[str, Dict[str, Any]], records, steps_per_epoch: int) -> List[str]:
    """Curves, confusion matrices, precision/recall and (from ``records``) alignment PNGs in ``out_dir``."""
    from dfa_train import plots

    written = [plots.plot_curves(runs, os.path.join(out_dir, "training_curves.png"))]
    for label, m in runs.items():
        suffix = "" if len(runs) == 1 else f"_{label.lower()}"
        written.append(plots.plot_confusion(np.asarray(m["confusion"]), os.path.join(out_dir, f"confusion{suffix}.png"),
                                            f"confusion matrix ({label}, {m['confusion_split']} set)"))
    written.append(plots.plot_precision_recall({k: np.asarray(m["confusion"]) for k, m in runs.items()},
                                               os.path.join(out_dir, "precision_recall.png")))
    alignment = [a for r in records for a in r.get("alignment", [])]
    path = plots.plot_alignment(alignment, os.path.join(out_dir, "alignment.png"), steps_per_epoch)
    if path:
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Commands


def _config_from_args(args, method: str) -> Dict[str, Any]:
    cfg = {key: getattr(args, key, None) for key in _RUN_KEYS}
    cfg["method"] = method
    cfg["layers"] = list(args.layers or _default_layers(args.dataset))
    cfg["no_download"] = args.no_download
    cfg["no_plots"] = args.no_plots
    return cfg


def _check_widths(parser, cfg, data) -> None:
    x_train, y_train = data[0], data[1]
    if cfg["layers"][0] != x_train.shape[1] or cfg["layers"][-1] != y_train.shape[1]:
        parser.error(
            f"--layers {','.join(map(str, cfg['layers']))} does not fit dataset {cfg['dataset']!r}: "
            f"inputs have {x_train.shape[1]} features and targets {y_train.shape[1]} columns, so the first "
            f"width must be {x_train.shape[1]} and the last {y_train.shape[1]}"
        )


def _progress_enabled(args) -> bool:
    return args.progress == "on" or (args.progress == "auto" and sys.stdout.isatty())


def _timestamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _summary_line(label: str, m: Dict[str, Any]) -> str:
    acc = "n/a" if m["test_accuracy"] is None else f"{100 * m['test_accuracy']:.2f}%"
    return (f"{label}: {m['epochs_run']} epochs, final train error {100 * m['train_error'][-1]:.2f}%, "
            f"test accuracy {acc}, {m['samples_per_s']:.0f} samples/s")


def cmd_train(parser, args) -> int:
    if args.resume:
        run_dir = args.resume
        config_path = os.path.join(run_dir, "config.json")
        if not os.path.isfile(config_path) or not os.path.isfile(os.path.join(run_dir, CHECKPOINT_NAME)):
            parser.error(f"--resume {run_dir!r}: no config.json and checkpoint.npz there")
        with open(config_path) as f:
            cfg = json.load(f)
        if args.epochs_given:
            cfg["epochs"] = args.epochs
    else:
        cfg = _config_from_args(args, args.method)
        if cfg["method"] == "bp" and cfg["mode"] != "sample":
            parser.error(f"--mode {cfg['mode']} applies to DFA only; BP takes --mode sample")
        run_dir = args.out or os.path.join("runs", f"{_timestamp()}-{cfg['method']}-{cfg['backend']}")
        if os.path.exists(os.path.join(run_dir, CHECKPOINT_NAME)):
            parser.error(f"--out {run_dir!r} already holds a run; resume it with --resume {run_dir} "
                         "or choose another folder")
    args.run_dir = run_dir
    data = load_data(cfg)
    _check_widths(parser, cfg, data)
    metrics = run_training(cfg, run_dir, data, resume=bool(args.resume), progress=_progress_enabled(args))
    print(_summary_line(cfg["method"].upper(), metrics))
    print(f"run folder: {run_dir}")
    return 0


def cmd_compare(parser, args) -> int:
    base = _config_from_args(args, "dfa")
    out = args.out or os.path.join("runs", f"{_timestamp()}-compare-{base['backend']}")
    data = load_data(base)
    _check_widths(parser, base, data)
    spec = spec_of(base)
    params = dfa_init.init_params(spec, base["param_seed"])  # the same initial weights for both
    results, records = {}, {}
    for method in ("dfa", "bp"):
        cfg = dict(base, method=method, mode=base["mode"] if method == "dfa" else "sample", no_plots=True)
        run_dir = os.path.join(out, method)
        if os.path.exists(os.path.join(run_dir, CHECKPOINT_NAME)):
            parser.error(f"--out {out!r} already holds a comparison; choose another folder")
        results[method.upper()] = run_training(cfg, run_dir, data, progress=_progress_enabled(args), params=params,
                                               label=f"{method}/{cfg['backend']}")
        records[method] = _read_history(run_dir)
    steps_per_epoch = -(-data[0].shape[0] // base["batch_size"])
    write_plots(out, results, records["dfa"], steps_per_epoch)
    rows = ["| method | epochs | final train error | test accuracy | samples/s | wall s |",
            "| --- | --- | --- | --- | --- | --- |"]
    for label, m in results.items():
        acc = "n/a" if m["test_accuracy"] is None else f"{100 * m['test_accuracy']:.2f}%"
        rows.append(f"| {label} | {m['epochs_run']} | {100 * m['train_error'][-1]:.2f}% | {acc} | "
                    f"{m['samples_per_s']:.0f} | {m['wall_s']:.2f} |")
    table = "\n".join(rows) + "\n"
    atomic_write_text(os.path.join(out, "summary.md"), table)
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(
        {"config": dict(base, method=None), "results": {k: {kk: v for kk, v in m.items() if kk != "confusion"}
                                                        for k, m in results.items()}}, indent=1))
    print(table, end="")
    print(f"comparison folder: {out}")
    return 0


def model_table(spec: MLPSpec) -> str:
    """The network as a text table: one row per layer, weight/bias/feedback shapes, parameter counts."""
    lines = [f"{'layer':<8}{'W shape':<16}{'b shape':<10}{'params':>10}  {'activation':<12}{'feedback B':<12}"]
    for l, ((w, b), _) in enumerate(zip(spec.param_shapes, range(spec.num_layers)), start=1):
        last = l == spec.num_layers
        act = spec.output if last else spec.activation
        fb = "-" if last else str(spec.feedback_shapes[l - 1])
        lines.append(f"{l:<8}{str(w):<16}{str(b):<10}{w[0] * w[1] + b[0]:>10}  {act:<12}{fb:<12}")
    lines.append(f"total parameters: {spec.num_params()}; loss: {spec.loss}; reduction: {spec.reduction}; "
                 f"dtype: {spec.dtype}")
    return "\n".join(lines)


def cmd_summary(parser, args) -> int:
    spec = MLPSpec(args.layers or (784, 200, 10), args.activation, args.output, args.reduction, args.dtype)
    print(model_table(spec))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dfa`` console script; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.epochs_given = "--epochs" in argv
    from dfa_train.data import DatasetNotFoundError
    from dfa_train.trainer import NonFiniteLossError

    commands = {"train": cmd_train, "compare": cmd_compare, "summary": cmd_summary}
    try:
        return commands[args.command](parser, args)
    except KeyboardInterrupt:
        run = getattr(args, "run_dir", None) or "RUN_DIR"
        print(f"\ninterrupted: the checkpoint of the last finished epoch is kept; continue with "
              f"dfa train --resume {run}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteLossError as err:
        print(f"dfa: error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except (DatasetNotFoundError, FileNotFoundError, ValueError, TypeError, ImportError) as err:
        print(f"dfa: error: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
