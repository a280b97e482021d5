"""``leap report RUN_DIR``: plots and a Markdown summary of a training run.

Reads the run directory through :func:`leap.runlog.load_run` (record types in
:mod:`leap.runlog`; a resumed run may log some steps/epochs twice, the last record wins).

Outputs (in ``RUN_DIR/report/`` unless ``--out`` says otherwise), PNGs rendered with
matplotlib's Agg canvas (no display, no global pyplot state):

* ``loss.png`` -- loss vs step (and epoch mean loss), level-ups marked;
* ``cka.png`` -- CKA vs step with the threshold tau (only if CKA was logged);
* ``blocks.png`` -- target block vs step and vs epoch;
* ``flops.png`` -- cumulative teacher FLOPs vs the full-depth baseline;
* ``learning_curves.png`` -- the ``leap eval`` numbers of the run's checkpoints (``--save-every-epochs`` and
  ``leap eval ... --all-checkpoints``) vs epoch and vs teacher FLOPs spent, one line per run (this run and
  the ``compare`` runs), one row per metric (:func:`learning_curves`);
* ``report.md`` -- blocks trajectory, final loss, FLOPs saved, time, evaluations, learning curves.

Teacher FLOPs come from, in order: the epoch records' ``teacher_flops`` /
``baseline_teacher_flops``; a :class:`leap.cost.CostModel` built (on the meta device) from
the model names in the run's config (or ``--teacher``/``--student``); else the logged
teacher block counts normalized by the teacher depth L (units of "full teacher passes").

The command line is :mod:`leap.cli.report`; the four figures are drawn by :mod:`leap.apps.report_plots`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..errors import InputNotFoundError, LeapError
from ..runlog import RunLog, load_run
from ..runlog import number as _num
from .flops_series import FlopsSeries, calibration_blocks, cost_model_for, flops_series, teacher_flops_at_step
from .report_plots import plot_blocks, plot_cka, plot_flops, plot_learning_curves, plot_loss

__all__ = ["RunLog", "load_run", "make_report", "learning_curves", "DEFAULT_OUT_SUBDIR"]

DEFAULT_OUT_SUBDIR = "report"

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}" if m else f"{seconds:.1f} s"


def _fmt_num(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def _fmt_flops(v: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.3g} FLOP"


def _run_lengths(values: Sequence[float]) -> str:
    """``2, 12 x3, 13`` style compact list."""
    out, prev, count = [], None, 0
    for v in values:
        v = int(v) if float(v).is_integer() else round(v, 2)
        if v == prev:
            count += 1
            continue
        if prev is not None:
            out.append(f"{prev}" + (f" x{count}" if count > 1 else ""))
        prev, count = v, 1
    if prev is not None:
        out.append(f"{prev}" + (f" x{count}" if count > 1 else ""))
    return ", ".join(out)


def _mean_block(run: RunLog) -> float | None:
    steps = run.step_blocks()
    if steps:
        return sum(steps) / len(steps)
    s = _num(run.summary.get("mean_block"))
    if s is not None:
        return s
    xs = [(_num(r.get("mean_block")) or _num(r.get("block")), _num(r.get("steps")) or 1.0) for r in run.epochs]
    xs = [(b, w) for b, w in xs if b is not None]
    return sum(b * w for b, w in xs) / sum(w for _, w in xs) if xs else None


def _curve_lines(curves: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    """Markdown of the learning curves: per metric, each run's value at each evaluated epoch."""
    lines = ["## Learning curves", ""]
    for metric, runs in curves.items():
        lines += [f"{metric}:", ""]
        for name, points in runs.items():
            values = ", ".join(f"epoch {p['epoch']}: {100 * p['value']:.2f}%" for p in points)
            lines.append(f"- `{name}`: {values}")
        lines.append("")
    return lines


def render_markdown(
    run: RunLog,
    series: FlopsSeries | None,
    plots: dict[str, str],
    cost_model=None,
    cost_note: str | None = None,
    curves: dict[str, dict[str, list[dict[str, Any]]]] | None = None,
) -> str:
    cfg, summ = run.config, run.summary
    L = cost_model.num_blocks if cost_model is not None else run.num_blocks
    lines = [f"# LEAP run report: `{run.run_dir}`", ""]
    teacher, student = cfg.get("teacher"), cfg.get("student")
    if cost_model is not None and not (teacher and student):
        teacher, student = "teacher", "student"
    facts = []
    if teacher and student:
        facts.append(
            f"- models: `{teacher}` -> `{student}`" + (f" at {cfg['img_size']} px" if cfg.get("img_size") else "")
        )
    mode = summ.get("mode") or (
        {"cka": "leap", "off": "baseline"}.get(cfg.get("curriculum")) if cfg.get("curriculum") else None
    )
    if mode:
        facts.append(f"- mode: {mode}" + (f", status: {summ['status']}" if summ.get("status") else ""))
    n_steps = len(run.steps) or _num(summ.get("steps"))
    facts.append(f"- steps: {int(n_steps) if n_steps else 'n/a'}, epochs logged: {len(run.epochs)}")
    if run.skipped_lines:
        facts.append(f"- {run.skipped_lines} unreadable line(s) in the log were skipped")
    lines += facts + [""]

    # ---- curriculum
    lines += ["## Curriculum", ""]
    blocks_step = run.step_blocks()
    start = _num(summ.get("start_block"))
    if start is None and run.calibrations:
        start = _num(run.calibrations[0].get("start_block"))
    if start is None and blocks_step:
        start = blocks_step[0]
    final = blocks_step[-1] if blocks_step else (run.epoch_blocks()[-1] if run.epoch_blocks() else None)
    final = _num(summ.get("final_block")) if _num(summ.get("final_block")) is not None else final
    mean_k = _mean_block(run)
    lines.append(f"- teacher depth L: {L if L else 'n/a'}")
    lines.append(
        f"- start block: {_fmt_num(start)}, final block: {_fmt_num(final)}, mean target block: {_fmt_num(mean_k)}"
    )
    eb = [(_num(r.get("block")) if _num(r.get("block")) is not None else _num(r.get("mean_block"))) for r in run.epochs]
    eb = [b for b in eb if b is not None]
    if eb:
        lines.append(f"- block at the end of each epoch: {_run_lengths(eb)}")
    elif blocks_step:
        lines.append(f"- block per step: {_run_lengths(blocks_step)}")
    if run.level_ups:
        reasons = Counter(str(u.get("reason", "?")) for u in run.level_ups)
        lines.append(
            f"- level-ups: {len(run.level_ups)} (" + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) + ")"
        )
        lines += ["", "| step | epoch | from | to | reason |", "|---:|---:|---:|---:|---|"]
        shown = run.level_ups if len(run.level_ups) <= 60 else run.level_ups[:30] + [None] + run.level_ups[-29:]
        for u in shown:
            if u is None:
                lines.append("| ... | | | | |")
                continue
            lines.append(
                f"| {u.get('step', '')} | {u.get('epoch', '')} | {u.get('from_block', '')} | "
                f"{u.get('to_block', '')} | {u.get('reason', '')} |"
            )
    lines.append("")

    # ---- loss
    lines += ["## Loss", ""]
    losses = [v for v in (_num(r.get("loss")) for r in run.steps) if v is not None]
    final_loss = losses[-1] if losses else _num(summ.get("final_loss"))
    e_losses = [v for v in (_num(r.get("mean_loss")) for r in run.epochs) if v is not None]
    lines.append(f"- final step loss: {_fmt_num(final_loss)}")
    if e_losses:
        lines.append(f"- epoch mean loss: first {_fmt_num(e_losses[0])}, last {_fmt_num(e_losses[-1])}")
    ckas = [v for v in (_num(r.get("cka")) for r in run.steps) if v is not None]
    if ckas:
        lines.append(f"- last CKA: {ckas[-1]:.4f} (max {max(ckas):.4f})")
    lines.append("")

    # ---- FLOPs
    lines += ["## Teacher FLOPs", ""]
    if cfg.get("concat_teacher_last"):  # the teacher ran to block L at every step, whatever k
        lines.append("- concat target `[t_k ; t_L]`: the teacher ran to the last block at every step (no saving)")
    elif mean_k is not None and L:
        lines.append(
            f"- teacher-only saving `1 - mean(k)/L` = 1 - {mean_k:.4g}/{L} = **{100 * (1 - mean_k / L):.1f}%**"
            " (the paper's measure)"
        )
    if series is not None:
        saved = series.saved_fraction
        if series.units.startswith("FLOPs"):
            lines.append(
                f"- teacher forward: {_fmt_flops(series.teacher[-1])} vs. baseline "
                f"{_fmt_flops(series.baseline[-1])}{series.units[5:]} -> saved **{100 * saved:.1f}%**"
            )
        else:
            lines.append(
                f"- teacher forward: {series.teacher[-1]:.4g} vs. baseline {series.baseline[-1]:.4g} "
                f"full teacher passes -> saved **{100 * saved:.1f}%**"
            )
        ts = series.total_saved_fraction
        if ts is not None:
            lines.append(
                f"- whole training step (teacher + student fwd/bwd + head + CKA): "
                f"{_fmt_flops(series.total[-1])} vs. {_fmt_flops(series.baseline_total[-1])}"
                f" -> saved **{100 * ts:.1f}%**"
            )
        lines.append(f"- source: {series.source}")
        calib = calibration_blocks(run)
        if calib:
            frac = (
                _num((summ.get("flops") or {}).get("calibration_fraction"))
                if isinstance(summ.get("flops"), dict)
                else None
            )
            if frac is None and L and n_steps:
                frac = calib / (n_steps * L)  # in teacher blocks (patch embedding not counted)
            share = f", {100 * frac:.2f}% of the baseline teacher cost" if frac is not None else ""
            lines.append(
                f"- calibration scan (once, first step): {int(calib)} teacher blocks{share}; "
                "not included in the savings above"
            )
    else:
        lines.append("- no teacher block counts in the log: FLOPs not computed")
    if cost_note and (series is None or cost_note not in series.source):
        lines.append(f"- note: {cost_note}")
    lines.append("")

    # ---- time
    lines += ["## Time", ""]
    times = [v for v in (_num(r.get("time_s")) for r in run.epochs) if v is not None]
    total_time = _num(summ.get("train_time_s"))
    if total_time is None and times:
        total_time = sum(times)
    lines.append(f"- training time: {_fmt_time(total_time)}" + (f" ({len(times)} epochs timed)" if times else ""))
    ips = _num(summ.get("images_per_s"))
    if ips is not None:
        lines.append(f"- throughput: {ips:.1f} images/s")
    if times:
        lines.append(f"- time per epoch: first {_fmt_time(times[0])}, last {_fmt_time(times[-1])}")
    lines.append("")

    # ---- evaluations (leap eval records of this run directory)
    from ..evaluation.records import report_lines

    evals = report_lines(run.run_dir)
    if evals:
        lines += ["## Evaluations", "", *evals, ""]
    if curves:
        lines += _curve_lines(curves)

    # ---- plots
    if plots:
        lines += ["## Plots", ""]
        for name, p in plots.items():
            lines.append(f"![{name}]({os.path.basename(p)})")
        lines.append("")
    if run.unknown_types:
        lines.append(
            "<!-- ignored record types: "
            + ", ".join(f"{t} ({n})" for t, n in sorted(run.unknown_types.items()))
            + " -->"
        )
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------
# Learning curves
# --------------------------------------------------------------------------------------


def _labels(run_dirs: Sequence[str]) -> list[str]:
    """Short distinct names of runs: the folder name, the path where two share one."""
    names = [os.path.basename(os.path.normpath(d)) or d for d in run_dirs]
    return [n if names.count(n) == 1 else os.path.normpath(d) for n, d in zip(names, run_dirs)]


def learning_curves(run_dirs: Sequence[str | os.PathLike]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{metric: {run: [{"epoch", "step", "teacher_flops", "value"}, ...]}}``, by epoch, from the ``eval.jsonl``
    records of each run's ``leap distill`` checkpoints (the records with ``model.training``: written by
    ``leap eval ... --all-checkpoints``). Metrics: :func:`leap.evaluation.records.curve_metrics`. The teacher
    FLOPs spent are the checkpoint's, else the run log's at that step. For a checkpoint evaluated twice, the
    newer record wins."""
    from ..evaluation.records import curve_metrics, read_records

    dirs = [os.fspath(d) for d in run_dirs]
    curves: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for name, run_dir in zip(_labels(dirs), dirs):
        try:
            log = load_run(run_dir, require_records=False)
        except LeapError:
            log = None
        for rec in read_records(run_dir):
            point = (rec.get("model") or {}).get("training") or {}
            epoch = point.get("epoch")
            if not isinstance(epoch, int):
                continue
            flops = _num(point.get("teacher_flops"))
            if flops is None and log is not None and _num(point.get("step")) is not None:
                flops = teacher_flops_at_step(log, _num(point.get("step")))
            for metric, value in curve_metrics(rec).items():
                by_epoch = curves.setdefault(metric, {}).setdefault(name, {})
                by_epoch[epoch] = {"epoch": epoch, "step": point.get("step"), "teacher_flops": flops, "value": value}
    return {m: {r: [pts[e] for e in sorted(pts)] for r, pts in runs.items()} for m, runs in curves.items()}


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def make_report(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    teacher: str | None = None,
    student: str | None = None,
    img_size: int | None = None,
    use_cost_model: bool = True,
    compare: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Render the plots and ``report.md`` of a run.

    Args:
        run_dir: run directory (holding ``log.jsonl``) or the log file itself.
        out_dir: where to write (default ``RUN_DIR/report``); created if needed.
        teacher, student, img_size: model names for the FLOPs cost model when the run's
            config does not name them (or to override it).
        use_cost_model: set False to skip building models and count teacher blocks only.
        compare: other run directories drawn beside this one in the learning curves.

    Returns:
        ``{"report": path of report.md, "plots": {name: png path}, "flops_source": str | None,
        "saved_fraction": float | None, "total_saved_fraction": float | None, "curves": the learning
        curves (:func:`learning_curves`)}``.

    Raises:
        FileNotFoundError: no run directory / ``log.jsonl`` (the message names the path).
        ValueError: the log holds no step or epoch records.
    """
    run = load_run(run_dir)
    out = os.fspath(out_dir) if out_dir is not None else os.path.join(run.run_dir, DEFAULT_OUT_SUBDIR)
    os.makedirs(out, exist_ok=True)

    cost_model, cost_note = None, None
    logged_flops = bool(run.epochs) and all(_num(r.get("teacher_flops")) is not None for r in run.epochs)
    if use_cost_model and not logged_flops:
        cost_model, cost_note = cost_model_for(run, teacher, student, img_size)
    series = flops_series(run, cost_model, cost_note)

    plots: dict[str, str] = {}
    for name, fn in (
        ("loss", lambda p: plot_loss(run, p)),
        ("cka", lambda p: plot_cka(run, p)),
        ("blocks", lambda p: plot_blocks(run, p)),
        ("flops", lambda p: plot_flops(series, p)),
    ):
        path = fn(os.path.join(out, f"{name}.png"))
        if path:
            plots[name] = path
    for other in compare:
        if not os.path.isdir(other):
            raise InputNotFoundError(f"--compare {os.fspath(other)}: no such run directory")
    curves = learning_curves([run.run_dir, *compare])
    path = plot_learning_curves(curves, os.path.join(out, "learning_curves.png"))
    if path:
        plots["learning_curves"] = path
    md = render_markdown(run, series, plots, cost_model, cost_note, curves)
    report_path = os.path.join(out, "report.md")
    with open(report_path, "w", encoding="utf-8") as f:
        f.write(md)
    return {
        "report": report_path,
        "plots": plots,
        "flops_source": series.source if series else None,
        "saved_fraction": series.saved_fraction if series else None,
        "total_saved_fraction": series.total_saved_fraction if series else None,
        "curves": curves,
    }
