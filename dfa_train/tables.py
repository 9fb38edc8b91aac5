"""Text tables the ``dfa`` command prints: the model, a run's one-line summary, DFA vs BP, a sweep."""

from __future__ import annotations

import math
from typing import Any, Mapping

from dfa_core.model import ModelSpec, NetSpec, layer_flops, output_shape
from dfa_train.arch import format_arch


def model_table(spec: NetSpec) -> str:
    """The network as a text table: one row per layer, weight/bias/feedback shapes, parameter counts.

    A ModelSpec gets ``blocks_table`` (output shapes and FLOPs as well).
    """
    if isinstance(spec, ModelSpec):
        return blocks_table(spec)
    lines = [f"{'layer':<8}{'W shape':<16}{'b shape':<10}{'params':>10}  {'activation':<12}{'feedback B':<12}"]
    for l, (w, b) in enumerate(spec.param_shapes, start=1):
        last = l == spec.num_layers
        act = spec.output if last else spec.activation
        fb = "-" if last else str(spec.feedback_shapes[l - 1])
        lines.append(f"{l:<8}{str(w):<16}{str(b):<10}{w[0] * w[1] + b[0]:>10}  {act:<12}{fb:<12}")
    lines.append(
        f"total parameters: {spec.num_params()}; loss: {spec.loss}; reduction: {spec.reduction}; dtype: {spec.dtype}"
    )
    return "\n".join(lines)


def _token(layer) -> str:
    try:
        return format_arch((layer,))
    except TypeError:  # a layer without a token (a composite block)
        return type(layer).__name__


def blocks_table(spec: ModelSpec) -> str:
    """A ModelSpec as a text table: one row per layer with its block, output shape per sample,
    parameters, the block's feedback matrix (at its parametrised layer) and forward FLOPs per sample."""
    head = f"{'block':<6}{'layer':<16}{'output shape':<16}{'params':>10}  {'feedback B':<14}{'FLOPs':>12}"
    lines = [head]
    for l, block in enumerate(spec.blocks, start=1):
        shape = block.in_shape
        for layer in block.prefix:
            flops = layer_flops(layer, shape)
            shape = output_shape(layer, shape, type(layer).__name__)
            lines.append(f"{l:<6}{_token(layer):<16}{str(shape):<16}{0:>10}  {'':<14}{flops:>12,}")
        params = sum(math.prod(s) for s in block.param_shapes)
        fb = str(spec.feedback_shapes[l - 1]) if l < spec.num_layers else "- (output)"
        lines.append(
            f"{l:<6}{_token(block.layer):<16}{str(block.a_shape):<16}{params:>10}  {fb:<14}"
            f"{layer_flops(block.layer, block.u_shape):>12,}"
        )
    total_flops = sum(block.flops() for block in spec.blocks)
    lines.append(
        f"input {spec.input_shape}; {spec.num_layers} blocks; total parameters: {spec.num_params()}; "
        f"feedback numbers: {sum(r * c for r, c in spec.feedback_shapes)}; forward FLOPs per sample: "
        f"{total_flops:,}; activation: {spec.activation}; loss: {spec.loss}; reduction: {spec.reduction}; "
        f"dtype: {spec.dtype}"
    )
    return "\n".join(lines)


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def summary_line(label: str, metrics: Mapping[str, Any]) -> str:
    """'DFA: 2 epochs, final train error 9.00%, test accuracy 88.00%, 12345 samples/s'."""
    speed = "n/a" if metrics["samples_per_s"] is None else f"{metrics['samples_per_s']:.0f}"
    return (
        f"{label}: {metrics['epochs_run']} epochs, final train error {_percent(metrics['train_error'][-1])}, "
        f"test accuracy {_percent(metrics['test_accuracy'])}, {speed} samples/s"
    )


def comparison_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table, one row per run (label -> metrics.json's dict)."""
    rows = [
        "| method | epochs | final train error | test accuracy | samples/s | wall s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, m in runs.items():
        speed = "n/a" if m["samples_per_s"] is None else f"{m['samples_per_s']:.0f}"
        rows.append(
            f"| {label} | {m['epochs_run']} | {_percent(m['train_error'][-1])} | "
            f"{_percent(m['test_accuracy'])} | {speed} | {m['wall_s']:.2f} |"
        )
    return "\n".join(rows) + "\n"


def sweep_table(summary: Mapping[str, Any]) -> str:
    """A Markdown table of a sweep's summary.json: one row per setting, test accuracy mean +- std."""
    rows = ["| setting | seeds | test accuracy mean +- std | min | max |", "| --- | --- | --- | --- | --- |"]
    for s in summary["settings"]:
        acc = s["test_accuracy"]
        if acc["mean"] is None:
            rows.append(f"| {s['name']} | {len(s['members'])} | n/a | n/a | n/a |")
            continue
        rows.append(
            f"| {s['name']} | {len(s['members'])} | {100 * acc['mean']:.2f}% +- {100 * acc['std']:.2f}% "
            f"| {100 * acc['min']:.2f}% | {100 * acc['max']:.2f}% |"
        )
    return "\n".join(rows) + "\n"


__all__ = ["blocks_table", "comparison_table", "model_table", "summary_line", "sweep_table"]
