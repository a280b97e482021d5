"""Results of ``leap experiment``: statistics over seeds and the Markdown tables.

Pure functions of the per-run records :func:`leap.apps.experiment_runs.collect_run` reads from the runs' own
files: :func:`aggregate` (mean, sample std, paired difference to the baseline with a 95% Student-t
interval and the number of seeds where the method did better), :func:`results_table`, :func:`diff_table`,
:func:`preregistered_table` and :func:`findings_lines`. The document is assembled by
:mod:`leap.apps.experiment_results`, the plots are in :mod:`leap.apps.experiment_plots`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from typing import Any

__all__ = [
    "Metric",
    "METRICS",
    "METRIC_BY_KEY",
    "t_quantile_975",
    "mean_std",
    "paired_interval",
    "aggregate",
    "format_value",
    "format_cell",
    "column_label",
    "shown_metrics",
    "results_table",
    "diff_table",
    "preregistered_table",
    "diff_rows_table",
    "paired_diff",
    "contrasts",
    "findings_lines",
    "environment",
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
    unit: str  # "%" (stored as a fraction, shown x100), "s", "TFLOP", "cka" (3 decimals), "" (plain)
    compare: bool  # listed in the difference-to-baseline table
    better: str | None = None  # "higher" or "lower": which way a method beats the baseline (None: neither)


#: The metrics of every run, in table order (a column is shown when some run has a value).
METRICS: tuple[Metric, ...] = (
    Metric("linear_cls_best", "linear CLS (best)", "%", True, "higher"),
    Metric("linear_patch_best", "linear patch (best)", "%", True, "higher"),
    Metric("linear_cls_last", "linear CLS (last)", "%", True, "higher"),
    Metric("linear_patch_last", "linear patch (last)", "%", True, "higher"),
    Metric("knn_cls", "kNN CLS", "%", True, "higher"),
    Metric("knn_patch", "kNN patch", "%", True, "higher"),
    Metric("cka_last_block", "CKA to teacher last block", "cka", True, "higher"),
    Metric("teacher_tflops", "teacher TFLOP", "TFLOP", True, "lower"),
    Metric("teacher_saved_vs_baseline", "teacher FLOPs saved vs baseline", "%", False),
    Metric("total_saved_vs_baseline", "total FLOPs saved vs baseline", "%", False),
    Metric("train_time_s", "training wall time", "s", True, "lower"),
    Metric("mean_block", "mean target block", "", False),
    Metric("last_block_at", "last block reached at (% of steps)", "%", False),
)
#: The metrics by key.
METRIC_BY_KEY: dict[str, Metric] = {m.key: m for m in METRICS}

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


def wins(diffs: Sequence[float], better: str | None) -> int | None:
    """How many of the per-seed differences (method - baseline) favour the method (ties: neither)."""
    if better is None:
        return None
    return sum(1 for d in diffs if (d > 0 if better == "higher" else d < 0))


def paired_diff(
    values: dict[int, float | None], base: dict[int, float | None], better: str | None
) -> dict[str, Any] | None:
    """``values - base`` over the seeds both have a value for: ``{"seeds", "diffs", "mean", "low", "high",
    "wins"}`` (95% Student-t interval, :func:`wins`), or None without a common seed."""
    seeds = [s for s in sorted(values) if values[s] is not None and base.get(s) is not None]
    if not seeds:
        return None
    diffs = [values[s] - base[s] for s in seeds]
    d, lo, hi = paired_interval(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": d, "low": lo, "high": hi, "wins": wins(diffs, better)}


def aggregate(records: list[dict[str, Any]], baseline: str) -> dict[str, Any]:
    """Per method and metric: values by seed, mean, std; per compared metric: the paired difference to
    ``baseline`` (:func:`paired_diff`: method - baseline over the seeds both have, its 95% interval and the
    seeds where the method did better)."""
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
                base = {s: r["metrics"].get(metric.key) for s, r in by_method[baseline].items()}
                d = paired_diff(values, base, metric.better)
                if d is not None:
                    entry["diff_vs_baseline"][metric.key] = d
        out["methods"][m] = entry
    return out


def contrasts(agg: dict[str, Any], pairs: Sequence[Sequence[str]], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{"a - b": {"_pair": [a, b], metric key: paired_diff}}`` for each pair ``(a, b)`` of methods in ``agg``
    (pairs with a method that did not run are left out)."""
    out: dict[str, dict[str, Any]] = {}
    for a, b in pairs:
        if a not in agg["methods"] or b not in agg["methods"]:
            continue
        row: dict[str, Any] = {"_pair": [a, b]}
        for key in keys:
            d = paired_diff(
                agg["methods"][a]["metrics"][key]["by_seed"],
                agg["methods"][b]["metrics"][key]["by_seed"],
                METRIC_BY_KEY[key].better,
            )
            if d is not None:
                row[key] = d
        out[f"{a} - {b}"] = row
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
    if unit == "cka":
        return f"{value:{sign}.3f}"
    return f"{value:{sign}.2f}"


def format_cell(stats: dict[str, Any], unit: str) -> str:
    mean, std = stats.get("mean"), stats.get("std")
    if mean is None:
        return "n/a"
    return format_value(mean, unit) + ("" if std is None else f" ± {format_value(std, unit)}")


def column_label(metric: Metric) -> str:
    """A metric's column header in results.md."""
    if "%" in metric.label:  # the label names its unit itself
        return metric.label
    return metric.label + {"%": " (%)", "s": " (s)"}.get(metric.unit, "")


def shown_metrics(agg: dict[str, Any]) -> list[Metric]:
    """The metrics some run of ``agg`` has a value for, in :data:`METRICS` order."""
    return [
        m
        for m in METRICS
        if any(e["metrics"][m.key]["mean"] is not None for e in agg["methods"].values() if m.key in e["metrics"])
    ]


def results_table(agg: dict[str, Any]) -> list[str]:
    """The main table: one row per method, one column per shown metric, mean ± std over seeds."""
    shown = shown_metrics(agg)
    head = "| method | seeds | " + " | ".join(column_label(m) for m in shown) + " |"
    lines = [head, "|" + "---|" * (len(shown) + 2)]
    for name, entry in agg["methods"].items():
        cells = [format_cell(entry["metrics"][m.key], m.unit) for m in shown]
        lines.append(f"| {name} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    return lines


def diff_cell(d: dict[str, Any] | None, unit: str, *, with_wins: bool = False) -> str:
    """``+1.23 [+0.45, +2.01]`` (mean difference [95% interval]), plus `` (4/5)`` seeds better with ``with_wins``."""
    if d is None:
        return "n/a"
    text = format_value(d["mean"], unit, signed=True)
    if d["low"] is not None:
        text += f" [{format_value(d['low'], unit, signed=True)}, {format_value(d['high'], unit, signed=True)}]"
    if with_wins and d.get("wins") is not None:
        text += f" ({d['wins']}/{len(d['seeds'])})"
    return text


def diff_table(agg: dict[str, Any]) -> list[str]:
    """Method - baseline per compared (and shown) metric: mean difference [95% interval], paired by seed."""
    compared = [m for m in shown_metrics(agg) if m.compare]
    lines = ["| method | " + " | ".join(column_label(m) for m in compared) + " |", "|" + "---|" * (len(compared) + 1)]
    for name, entry in agg["methods"].items():
        if name == agg["baseline"]:
            continue
        cells = [diff_cell(entry["diff_vs_baseline"].get(m.key), m.unit) for m in compared]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def preregistered_table(agg: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """One row per method but the baseline, one column per metric of ``keys``: the paired difference to the
    baseline, its 95% interval and (in parentheses) the seeds where the method did better out of those paired."""
    rows = {name: e["diff_vs_baseline"] for name, e in agg["methods"].items() if name != agg["baseline"]}
    return diff_rows_table(rows, keys, "method")


def diff_rows_table(rows: dict[str, dict[str, Any]], keys: Sequence[str], head: str) -> list[str]:
    """``rows`` = ``{row name: {metric key: paired_diff}}`` as a table of :func:`diff_cell` with win counts."""
    metrics = [METRIC_BY_KEY[k] for k in keys]
    lines = [f"| {head} | " + " | ".join(column_label(m) for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for name, diffs in rows.items():
        lines.append(
            f"| {name} | " + " | ".join(diff_cell(diffs.get(m.key), m.unit, with_wins=True) for m in metrics) + " |"
        )
    return lines


def verdict(d: dict[str, Any] | None, better: str | None) -> str:
    """``better``, ``worse`` or ``not resolved``: where the 95% interval of the difference lies."""
    if d is None or d["low"] is None:
        return "not resolved"
    if d["low"] > 0 or d["high"] < 0:
        up = d["low"] > 0
        return "better" if (up == (better == "higher")) else "worse"
    return "not resolved"


_UNIT_WORDS = {"%": " points", "s": " s", "TFLOP": " TFLOP", "cka": "", "": ""}


def _sentence(metric: Any, a: str, b: str, d: dict[str, Any]) -> str:
    v = verdict(d, metric.better)
    fmt = lambda x: format_value(x, metric.unit, signed=True)  # noqa: E731
    span = "" if d["low"] is None else f" [{fmt(d['low'])}, {fmt(d['high'])}]"
    how = f"resolved ({a} {v})" if v != "not resolved" else "not resolved (the interval contains 0)"
    return (
        f"- {metric.label}: {a} - {b} = {fmt(d['mean'])}{_UNIT_WORDS[metric.unit]}{span}, {a} better in "
        f"{d['wins']} of {len(d['seeds'])} seeds: {how}."
    )


def findings_lines(
    agg: dict[str, Any], keys: Sequence[str], pairs: dict[str, dict[str, Any]] | None = None
) -> list[str]:
    """One plain sentence per (metric of ``keys``, method): the difference to the baseline, its interval, the
    seeds where the method did better, and whether the interval resolves it (excludes 0); with ``pairs``
    (:func:`contrasts`), one per (metric, pair) instead."""
    lines = []
    for key in keys:
        m = METRIC_BY_KEY[key]
        if pairs is not None:
            for row in pairs.values():
                if key in row:
                    lines.append(_sentence(m, *row["_pair"], row[key]))
            continue
        for name, entry in agg["methods"].items():
            d = entry["diff_vs_baseline"].get(key)
            if name != agg["baseline"] and d is not None:
                lines.append(_sentence(m, name, agg["baseline"], d))
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
