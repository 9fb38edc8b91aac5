"""Text tables the ``dfa`` command prints: the model, a run's one-line summary, DFA vs BP, a sweep."""

from __future__ import annotations

from typing import Any, Mapping

from dfa_core.spec import MLPSpec


def model_table(spec: MLPSpec) -> str:
    """The network as a text table: one row per layer, weight/bias/feedback shapes, parameter counts."""
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


__all__ = ["comparison_table", "model_table", "summary_line", "sweep_table"]
