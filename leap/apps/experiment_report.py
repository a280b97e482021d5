"""Results of ``leap experiment``: statistics over seeds, the Markdown tables, the plots.

Pure functions of the per-run records :func:`leap.apps.experiment.collect_run` reads from the runs' own
files: :func:`aggregate` (mean, sample std, paired difference to the baseline with a 95% Student-t
interval), :func:`results_table` / :func:`diff_table` / :func:`render_results` (``results.md``) and
the plots (trajectories, accuracy vs teacher FLOPs, the teacher's block-to-block CKA).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from .plotting import new_figure, save_figure

__all__ = [
    "Metric",
    "METRICS",
    "t_quantile_975",
    "mean_std",
    "paired_interval",
    "aggregate",
    "format_value",
    "format_cell",
    "column_label",
    "results_table",
    "diff_table",
    "render_results",
    "environment",
    "write_plots",
]

#: Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (beyond: the normal 1.96).
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str  # key in a run record's "metrics"
    label: str  # column header
    unit: str  # "%" (stored as a fraction, shown x100), "s", "TFLOP", "" (plain)
    compare: bool  # listed in the difference-to-baseline table


#: The metrics of every run, in table order.
METRICS: tuple[Metric, ...] = (
    Metric("linear_cls_best", "linear CLS (best)", "%", True),
    Metric("linear_patch_best", "linear patch (best)", "%", True),
    Metric("linear_cls_last", "linear CLS (last)", "%", True),
    Metric("linear_patch_last", "linear patch (last)", "%", True),
    Metric("knn_cls", "kNN CLS", "%", True),
    Metric("knn_patch", "kNN patch", "%", True),
    Metric("teacher_tflops", "teacher TFLOP", "TFLOP", False),
    Metric("teacher_saved_vs_baseline", "teacher FLOPs saved vs baseline", "%", False),
    Metric("total_saved_vs_baseline", "total FLOPs saved vs baseline", "%", False),
    Metric("train_time_s", "training wall time", "s", True),
    Metric("mean_block", "mean target block", "", False),
)

# --------------------------------------------------------------------------------- statistics


def t_quantile_975(df: int) -> float:
    """The two-sided 95% Student-t quantile for ``df`` degrees of freedom (1.96 beyond 30)."""
    if df < 1:
        raise ValueError(f"t_quantile_975: df must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def paired_interval(diffs: Sequence[float]) -> tuple[float, float | None, float | None]:
    """Mean of the per-seed differences and its 95% Student-t interval ``(mean, low, high)``.

    Paired by seed: same seed = same student init and data order in both methods, which removes the
    seed-to-seed spread both share. With one difference the interval is undefined (None).
    """
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, None, None
    half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def aggregate(records: list[dict[str, Any]], baseline: str) -> dict[str, Any]:
    """Per method and metric: values by seed, mean, std; per compared metric: the paired difference to
    ``baseline`` (method - baseline, seeds both have) with its 95% interval."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    by_method = {m: {r["seed"]: r for r in records if r["method"] == m} for m in methods}
    out: dict[str, Any] = {"baseline": baseline, "methods": {}}
    for m in methods:
        entry: dict[str, Any] = {"seeds": sorted(by_method[m]), "metrics": {}, "diff_vs_baseline": {}}
        for metric in METRICS:
            values = {s: r["metrics"].get(metric.key) for s, r in sorted(by_method[m].items())}
            present = [v for v in values.values() if v is not None]
            mean, std = mean_std(present) if present else (None, None)
            entry["metrics"][metric.key] = {"by_seed": values, "mean": mean, "std": std}
            if metric.compare and m != baseline and baseline in by_method:
                seeds = [
                    s
                    for s in sorted(by_method[m])
                    if s in by_method[baseline]
                    and values[s] is not None
                    and by_method[baseline][s]["metrics"].get(metric.key) is not None
                ]
                if seeds:
                    diffs = [values[s] - by_method[baseline][s]["metrics"][metric.key] for s in seeds]
                    d, lo, hi = paired_interval(diffs)
                    entry["diff_vs_baseline"][metric.key] = {
                        "seeds": seeds,
                        "diffs": diffs,
                        "mean": d,
                        "low": lo,
                        "high": hi,
                    }
        out["methods"][m] = entry
    return out


# --------------------------------------------------------------------------------- output


def format_value(value: float | None, unit: str, *, signed: bool = False) -> str:
    """A metric value as shown in results.md (fractions in %, 2 decimals; times in s, 0 decimals)."""
    if value is None:
        return "n/a"
    sign = "+" if signed else ""
    if unit == "%":
        return f"{value * 100:{sign}.2f}"
    if unit == "s":
        return f"{value:{sign}.0f}"
    if unit == "TFLOP":
        return f"{value:{sign}.2f}"
    return f"{value:{sign}.2f}"


def format_cell(stats: dict[str, Any], unit: str) -> str:
    mean, std = stats.get("mean"), stats.get("std")
    if mean is None:
        return "n/a"
    return format_value(mean, unit) + ("" if std is None else f" ± {format_value(std, unit)}")


def column_label(metric: Metric) -> str:
    """A metric's column header in results.md."""
    return metric.label + {"%": " (%)", "s": " (s)"}.get(metric.unit, "")


def results_table(agg: dict[str, Any]) -> list[str]:
    """The main table: one row per method, one column per metric, mean ± std over seeds."""
    head = "| method | seeds | " + " | ".join(column_label(m) for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    for name, entry in agg["methods"].items():
        cells = [format_cell(entry["metrics"][m.key], m.unit) for m in METRICS]
        lines.append(f"| {name} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    return lines


def diff_table(agg: dict[str, Any]) -> list[str]:
    """Method - baseline per compared metric: mean difference [95% interval], paired by seed."""
    compared = [m for m in METRICS if m.compare]
    lines = ["| method | " + " | ".join(column_label(m) for m in compared) + " |", "|" + "---|" * (len(compared) + 1)]
    for name, entry in agg["methods"].items():
        if name == agg["baseline"]:
            continue
        cells = []
        for m in compared:
            d = entry["diff_vs_baseline"].get(m.key)
            if d is None:
                cells.append("n/a")
            elif d["low"] is None:
                cells.append(format_value(d["mean"], m.unit, signed=True))
            else:
                cells.append(
                    f"{format_value(d['mean'], m.unit, signed=True)} "
                    f"[{format_value(d['low'], m.unit, signed=True)}, "
                    f"{format_value(d['high'], m.unit, signed=True)}]"
                )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def environment() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        sha = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=os.path.dirname(os.path.abspath(__file__)),
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": sha,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _plot_trajectories(records: list[dict[str, Any]], path: str) -> str | None:
    fig, (ax,) = new_figure(height=4.0)
    colors = {}
    for rec in records:
        blocks = rec["trajectory"]["step_blocks"]
        if not blocks:
            continue
        color = colors.setdefault(rec["method"], f"C{len(colors)}")
        label = (
            rec["method"]
            if sum(
                1
                for r in records
                if r["method"] == rec["method"] and r is not rec and records.index(r) < records.index(rec)
            )
            == 0
            else None
        )
        ax.plot(range(1, len(blocks) + 1), blocks, color=color, lw=1.0, alpha=0.7, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("teacher target block")
    ax.set_title("target-block trajectory (one line per seed)")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def _plot_accuracy_vs_flops(agg: dict[str, Any], path: str) -> str | None:
    fig, axes = new_figure(nrows=2, height=3.2)
    for ax, key, label in (
        (axes[0], "linear_cls_best", "linear probe CLS top-1 (best epoch, %)"),
        (axes[1], "knn_cls", "kNN CLS top-1 (%)"),
    ):
        for i, (name, entry) in enumerate(agg["methods"].items()):
            x, y = entry["metrics"]["teacher_tflops"], entry["metrics"][key]
            if x["mean"] is None or y["mean"] is None:
                continue
            ax.errorbar(
                [x["mean"]],
                [y["mean"] * 100],
                xerr=[x["std"] or 0],
                yerr=[(y["std"] or 0) * 100],
                fmt="o",
                color=f"C{i}",
                capsize=3,
                label=name,
            )
        ax.set_xlabel("teacher TFLOP per run (training steps)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _plot_teacher_cka(cka: dict[str, Any], path: str) -> str | None:
    fig, (ax,) = new_figure(height=6.0)
    blocks = cka["blocks"]
    image = ax.imshow(
        cka["matrix"],
        vmin=0.0,
        vmax=1.0,
        cmap="viridis",
        origin="upper",
        extent=(0.5, len(blocks) + 0.5, len(blocks) + 0.5, 0.5),
    )
    ax.figure.colorbar(image, ax=ax, label="linear CKA")
    for i in range(len(blocks)):
        for j in range(len(blocks)):
            v = cka["matrix"][i][j]
            ax.text(
                j + 1, i + 1, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black"
            )
    ax.set_xlabel("teacher block")
    ax.set_ylabel("teacher block")
    ax.set_title(f"teacher block-to-block linear CKA (patch tokens, {cka['images']} test images)")
    return save_figure(fig, path)


def write_plots(
    records: list[dict[str, Any]], agg: dict[str, Any], cka: dict[str, Any] | None, out: str
) -> dict[str, str]:
    """trajectories.png, accuracy_vs_flops.png and (with ``cka``) teacher_cka.png in ``out``;
    ``{name: path}`` of those written (none without matplotlib: the tables stand without plots)."""
    plots: dict[str, str] = {}
    try:
        plots["trajectories"] = _plot_trajectories(records, os.path.join(out, "trajectories.png"))
        plots["accuracy_vs_flops"] = _plot_accuracy_vs_flops(agg, os.path.join(out, "accuracy_vs_flops.png"))
        if cka is not None:
            plots["teacher_cka"] = _plot_teacher_cka(cka, os.path.join(out, "teacher_cka.png"))
    except ImportError as exc:
        print(f"(plots skipped: {exc})")
    return plots


def _lowest_off_diagonal(matrix: list[list[float]]) -> float:
    return min(v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j)


def _trajectory_line(entry_records: list[dict[str, Any]]) -> str:
    epochs = [r["trajectory"]["epoch_mean_blocks"] for r in entry_records]
    if not epochs or not epochs[0]:
        return "n/a"
    n = min(len(e) for e in epochs)
    return " ".join(f"{statistics.fmean(e[i] for e in epochs):.1f}" for i in range(n))


def render_results(
    cfg: Any,
    records: list[dict[str, Any]],
    agg: dict[str, Any],
    teacher: dict[str, Any],
    student_params: int,
    cka: dict[str, Any] | None,
    plots: dict[str, str],
    env: dict[str, Any],
    wall_s: float,
) -> str:
    """results.md: setup, the mean ± std table, the paired differences, trajectories, the teacher CKA.

    ``cfg`` is the :class:`leap.apps.experiment.ExperimentConfig` (not imported here: that module imports this one).
    """
    ev = cfg.eval_settings
    t_params = teacher.get("params")
    ratio = f"{t_params / student_params:.0f}x" if t_params and student_params else "n/a"
    seeds = ", ".join(str(s) for s in cfg.seeds)
    train_min = sum(r["metrics"].get("train_time_s") or 0.0 for r in records) / 60
    eval_min = sum(r.get("eval_elapsed_s") or 0.0 for r in records) / 60
    lines = [
        f"# Experiment `{cfg.name}`",
        "",
        cfg.description.strip(),
        "",
        f"Reproduce: `leap experiment {os.path.relpath(cfg.path)}` (`make experiment`). "
        f"Runs: {len(cfg.methods)} methods x {len(cfg.seeds)} seeds ({seeds}): {train_min:.1f} min of training and "
        f"{eval_min:.1f} min of evaluation in all (from the runs' records) on {env['cpu']} ({env['cpu_count']} cores, "
        f"{env['torch_threads']} torch threads), torch {env['torch']}; tables written by git {env['git'] or 'n/a'} "
        f"on {env['date']} ({wall_s / 60:.1f} min for this invocation).",
        "",
        "## Setup",
        "",
        f"- teacher: `{os.path.relpath(cfg.teacher)}`: {teacher.get('model')} "
        f"{json.dumps(teacher.get('model_overrides'))} "
        f"at {teacher.get('img_size')} px, {t_params:,} parameters, test accuracy "
        f"{teacher.get('test_accuracy', float('nan')) * 100:.2f}% "
        "(`leap train-teacher`, recipe in the .json beside it)",
        f"- student: {cfg.student} {json.dumps(cfg.student_overrides)}, {student_params:,} parameters "
        f"(teacher / student = {ratio})",
        f"- shared recipe: `{json.dumps(cfg.train, sort_keys=True)}`",
        "- methods: " + "; ".join(f"**{m}** `{json.dumps(o, sort_keys=True)}`" for m, o in cfg.methods.items()),
        f"- evaluation (frozen student, `leap.evaluation`): kNN k = {ev['knn_k']} and the paper's linear probe "
        f"({ev['probe_epochs']} epochs; best and last epoch) on CLS and mean-patch features; probe/kNN training set "
        f"= {'all' if ev['probe_train'] is None else 'the first ' + str(ev['probe_train'])} training images, test "
        f"set = {'all' if ev['probe_test'] is None else 'the first ' + str(ev['probe_test'])} test images",
        "- same seed = same student initialisation, data order and augmentation in every method",
        "",
        "## Results (mean ± std over seeds)",
        "",
        *results_table(agg),
        "",
        'Accuracies in %. "teacher TFLOP": teacher forward FLOPs of the training steps (calibration apart); '
        '"saved vs baseline": 1 - this method\'s teacher (total: teacher + student + head + CKA) FLOPs / the '
        f"baseline's (`{cfg.baseline}`, mean over seeds). Wall time: training only, as measured on this machine.",
        "",
        f"## Difference to the baseline (`{cfg.baseline}`), paired by seed: mean [95% t-interval]",
        "",
        *diff_table(agg),
        "",
        "Percentage points (time in s). An interval that contains 0 means no difference was resolved with these seeds.",
        "",
        "## Target block per epoch (mean over seeds)",
        "",
        "| method | blocks |",
        "|---|---|",
        *(f"| {m} | {_trajectory_line([r for r in records if r['method'] == m])} |" for m in agg["methods"]),
        "",
    ]
    for title, key in (("Trajectories", "trajectories"), ("Accuracy vs teacher FLOPs", "accuracy_vs_flops")):
        if plots.get(key):
            lines += [f"![{title}]({os.path.basename(plots[key])})", ""]
    if cka is not None:
        lines += [
            "## Teacher block-to-block linear CKA",
            "",
            f"Patch tokens after each block and the final norm, {cka['images']} test images pooled. "
            f"Lowest off-diagonal value: {_lowest_off_diagonal(cka['matrix']):.3f}; "
            f"CKA(block 1, last block) = {cka['matrix'][0][-1]:.3f}.",
            "",
        ]
        if plots.get("teacher_cka"):
            lines += [f"![Teacher CKA]({os.path.basename(plots['teacher_cka'])})", ""]
        lines += [
            "| block | " + " | ".join(str(b) for b in cka["blocks"]) + " |",
            "|" + "---|" * (len(cka["blocks"]) + 1),
        ]
        lines += [
            f"| {b} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for b, row in zip(cka["blocks"], cka["matrix"])
        ]
        lines.append("")
    lines += [
        "## Raw records",
        "",
        "`raw/<method>-seed<k>.json`: one per run, read from the run's `summary.json` and `eval.jsonl` "
        "(SHA-256 of each in `sources`); `results.json`: all of them with the aggregates.",
        "",
    ]
    return "\n".join(lines)
