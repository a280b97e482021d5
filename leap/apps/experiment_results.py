"""``results.md`` of ``leap experiment``: the document assembled from the run records and their statistics.

Sections: the pre-registered metrics with their paired differences and the seeds each method won, plain
sentences on what is and is not resolved, the file's ``discussion``, how the searched settings were
chosen (``search.json``), the setup, the mean ± std table, all paired differences, the target-block
trajectories and arrivals, the learning curves, the plots and the teacher's block-to-block CKA.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

from .experiment_report import (
    METRIC_BY_KEY,
    contrasts,
    diff_rows_table,
    diff_table,
    findings_lines,
    format_value,
    preregistered_table,
    results_table,
)

__all__ = ["render_results", "search_lines"]


def _lowest_off_diagonal(matrix: list[list[float]]) -> float:
    return min(v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j)


def _trajectory_line(entry_records: list[dict[str, Any]]) -> str:
    epochs = [r["trajectory"]["epoch_mean_blocks"] for r in entry_records]
    if not epochs or not epochs[0]:
        return "n/a"
    n = min(len(e) for e in epochs)
    return " ".join(f"{statistics.fmean(e[i] for e in epochs):.1f}" for i in range(n))


def _pct(x: float | None) -> str:
    return "never" if x is None else f"{x * 100:.1f}"


def search_lines(search: dict[str, Any]) -> list[str]:
    """The search section: the rule, one row per grid point, the choice and the values it fixes."""
    s, carved, ev = search["settings"], search["carved"], search["evaluation"]
    lo, hi = s["arrival"]
    label = METRIC_BY_KEY[s["metric"]].label
    lines = [
        "## How tau and the timeout were chosen (validation split, never the test split)",
        "",
        f"`{s['method']}` was trained once per grid point with seed {s['seed']} (not an experiment seed) on the "
        f"same training images as the experiment's runs, and scored by kNN (k = {ev['knn_k']}, bank = the first "
        f"{ev['bank']:,} remaining training images) on {carved['validation_images']:,} held-out *training* images "
        f"({carved['held_out']}). Rule, fixed in config.yaml before the search: a point is admissible when its "
        f"target reaches the last teacher block within {lo:.0%}-{hi:.0%} of the steps, at least "
        f"{s['min_cka_level_ups']} level-up came from CKA, and the timeout-only schedule from the same start block "
        f"(the fixed-schedule arm) reaches the last block by {s['fixed_by']:.0%} of the steps; the admissible point "
        f"with the highest validation {label} wins.",
        "",
        "| point | tau | M (epochs) | steps per block | start block | last block at (% of steps) | fixed schedule "
        f"at (%) | level-ups by CKA / timeout | teacher FLOPs (% of last-block) | validation {label} (%) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in search["points"]:
        name = f"**{p['name']}**" if p["name"] == search["chosen"] else p["name"]
        lines.append(
            f"| {name} | {p['tau']:g} | {p['max_epochs_per_block']:g} | {p['max_steps_per_block']} | "
            f"{p['start_block']} | {_pct(p['arrival'])} | {_pct(p['fixed_arrival'])} | "
            f"{p['cka_level_ups']} / {p['timeout_level_ups']} | {p['teacher_fraction'] * 100:.1f} | "
            f"{format_value(p['metric'], '%')} | {p['verdict']} |"
        )
    fixed = "; ".join(
        f"`{m}`: " + ", ".join(f"{k} = {v:g}" for k, v in values.items()) for m, values in search["expected"].items()
    )
    lines += [
        "",
        f"Chosen: **{search['chosen']}**, which fixes {fixed} (the runner checks config.yaml holds them).",
        "",
    ]
    return lines


def _prereg_lines(cfg: Any, agg: dict[str, Any]) -> list[str]:
    pre = cfg.preregistered
    names = lambda keys: ", ".join(METRIC_BY_KEY[k].label for k in keys)  # noqa: E731
    lines = [
        "## Pre-registered metrics",
        "",
        "Fixed in config.yaml (`preregistered`) before the runs" + (f": {pre['note']}" if pre["note"] else ".") + "",
        "",
        f"- primary: {names(pre['primary'])}",
        f"- secondary: {names(pre['secondary'])}",
        "",
        f"Each cell: mean difference to `{agg['baseline']}` over seeds, paired by seed, [95% Student-t interval], "
        "(seeds where the method did better / seeds paired). Accuracies in percentage points, CKA in CKA units, "
        "time in s; for TFLOP and time, lower is better.",
        "",
        "### Primary",
        "",
        *preregistered_table(agg, pre["primary"]),
        "",
    ]
    if pre["secondary"]:
        lines += ["### Secondary", "", *preregistered_table(agg, pre["secondary"]), ""]
    pairs = contrasts(agg, cfg.contrasts, pre["primary"] + pre["secondary"])
    if pairs:
        lines += [
            "### Contrasts between arms",
            "",
            "The same statistics for the pairs in config.yaml's `contrasts` (`a - b`, paired by seed; (seeds where "
            "`a` did better / seeds paired)). The pairs were named after the runs, the metrics before.",
            "",
            *diff_rows_table(pairs, pre["primary"] + pre["secondary"], "contrast"),
            "",
        ]
    lines += [
        "### In words (primary metrics; generated from the tables: resolved = the 95% interval excludes 0)",
        "",
        *findings_lines(agg, pre["primary"]),
        *findings_lines(agg, pre["primary"], pairs),
        "",
    ]
    return lines


def _arrival_lines(records: list[dict[str, Any]], agg: dict[str, Any]) -> list[str]:
    seeds = sorted({r["seed"] for r in records})
    by = {(r["method"], r["seed"]): r for r in records}
    lines = [
        "Start block, and when the target first reached the last teacher block (% of the run's steps), per seed:",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|" + "---|" * (len(seeds) + 1),
    ]
    for m in agg["methods"]:
        cells = []
        for s in seeds:
            r = by.get((m, s))
            cells.append("n/a" if r is None else f"{r['start_block']} -> {_pct(r['metrics'].get('last_block_at'))}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def _curve_lines(records: list[dict[str, Any]], agg: dict[str, Any]) -> list[str]:
    with_curve = [r for r in records if r.get("curve")]
    if not with_curve:
        return []
    first = with_curve[0]["curve"][0]
    lines = [
        "## Learning curves",
        "",
        f"kNN patch top-1 (%) of every epoch checkpoint and the final one (epochs = steps done / steps per "
        f"epoch), mean over seeds (bank: the first "
        f"{first['train_images']:,} training images, queries: the first {first['test_images']:,} test images; a "
        "cheaper subset than the final evaluation's).",
        "",
    ]
    epochs = sorted({round(p["epoch"], 2) for r in with_curve for p in r["curve"]})
    lines += ["| method | " + " | ".join(f"epoch {e:g}" for e in epochs) + " |", "|" + "---|" * (len(epochs) + 1)]
    for m in agg["methods"]:
        cells = []
        for e in epochs:
            vals = [
                p["knn_patch"] for r in with_curve if r["method"] == m for p in r["curve"] if round(p["epoch"], 2) == e
            ]
            cells.append(format_value(statistics.fmean(vals), "%") if vals else "n/a")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def _setup_lines(cfg: Any, teacher: dict[str, Any], student_params: int) -> list[str]:
    ev = cfg.eval_settings
    t_params = teacher.get("params")
    ratio = f"{t_params / student_params:.0f}x" if t_params and student_params else "n/a"
    lines = [
        "## Setup",
        "",
        f"- teacher: `{os.path.relpath(cfg.teacher)}`: {teacher.get('model')} "
        f"{json.dumps(teacher.get('model_overrides'))} at {teacher.get('img_size')} px, {t_params:,} parameters, "
        f"test accuracy {teacher.get('test_accuracy', float('nan')) * 100:.2f}% "
        "(`leap train-teacher`, recipe in the .json beside it)",
        f"- student: {cfg.student} {json.dumps(cfg.student_overrides)}, {student_params:,} parameters "
        f"(teacher / student = {ratio})",
        f"- shared recipe: `{json.dumps(cfg.train, sort_keys=True)}`",
        "- methods: " + "; ".join(f"**{m}** `{json.dumps(o, sort_keys=True)}`" for m, o in cfg.methods.items()),
        f"- evaluation (frozen student, `leap.evaluation`): kNN k = {ev['knn_k']} and the paper's linear probe "
        f"({ev['probe_epochs']} epochs; best and last epoch) on CLS and mean-patch features; probe/kNN training set "
        f"= {'all' if ev['probe_train'] is None else 'the first ' + format(ev['probe_train'], ',')} training images, "
        f"test set = {'all' if ev['probe_test'] is None else 'the first ' + format(ev['probe_test'], ',')} test images",
    ]
    if ev["cka_images"]:
        lines.append(
            f"- CKA to the teacher's last block: linear CKA between the student's patch tokens (after its final "
            f"norm, no head) and the teacher's last-block patch tokens (after its final norm), first "
            f"{ev['cka_images']:,} test images, tokens pooled"
        )
    lines += ["- same seed = same student initialisation, data order and augmentation in every method", ""]
    return lines


def render_results(cfg: Any, records: list[dict[str, Any]], agg: dict[str, Any], info: dict[str, Any]) -> str:
    """results.md. ``cfg``: the :class:`leap.apps.experiment_config.ExperimentConfig`; ``info``: ``teacher``
    (its recipe), ``student_params``, ``cka`` (teacher block CKA or None), ``plots`` ({name: path}), ``env``
    (:func:`leap.apps.experiment_report.environment`), ``wall_s`` (this invocation), ``search`` (or None)."""
    env, cka, plots, search = info["env"], info.get("cka"), info.get("plots") or {}, info.get("search")
    seeds = ", ".join(str(s) for s in cfg.seeds)
    train_min = sum(r["metrics"].get("train_time_s") or 0.0 for r in records) / 60
    eval_min = sum(r.get("eval_elapsed_s") or 0.0 for r in records) / 60
    lines = [
        f"# Experiment `{cfg.name}`",
        "",
        cfg.description.strip(),
        "",
        f"Reproduce: `leap experiment {os.path.relpath(cfg.path)}`. Runs: {len(cfg.methods)} methods x "
        f"{len(cfg.seeds)} seeds ({seeds}): {train_min:.1f} min of training and {eval_min:.1f} min of evaluation "
        f"in all (from the runs' records) on {env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch "
        f"threads), torch {env['torch']}; tables written by git {env['git'] or 'n/a'} on {env['date']} "
        f"({info['wall_s'] / 60:.1f} min for this invocation).",
        "",
    ]
    if cfg.preregistered:
        lines += _prereg_lines(cfg, agg)
    if cfg.discussion:
        with open(cfg.discussion, encoding="utf-8") as f:
            lines += [f.read().strip(), ""]
    if search:
        lines += search_lines(search)
    lines += _setup_lines(cfg, info["teacher"], info["student_params"])
    lines += [
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
        *_arrival_lines(records, agg),
    ]
    titles = {
        "trajectories": "Trajectories",
        "accuracy_vs_flops": "Accuracy vs teacher FLOPs",
        "learning_curves": "Learning curves",
    }
    for key, title in titles.items():
        if plots.get(key):
            lines += [f"![{title}]({os.path.basename(plots[key])})", ""]
    lines += _curve_lines(records, agg)
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
        "`raw/<method>-seed<k>.json`: one per run, read from the run's `summary.json`, `eval.jsonl` and `log.jsonl` "
        "(SHA-256 of each in `sources`); `results.json`: all of them with the aggregates"
        + ("; `search/`: the search's records and `search.json`." if search else "."),
        "",
    ]
    return "\n".join(lines)
