"""``leap report RUN_DIR``: plots and a Markdown summary of a training run.

Reads the run directory through :func:`leap.runlog.load_run` (record types in
:mod:`leap.runlog`; a resumed run may log some steps/epochs twice, the last record wins).

Outputs (in ``RUN_DIR/report/`` unless ``--out`` says otherwise), PNGs rendered with
matplotlib's Agg canvas (no display, no global pyplot state):

* ``loss.png`` -- loss vs step (and epoch mean loss), level-ups marked;
* ``cka.png`` -- CKA vs step with the threshold tau (only if CKA was logged);
* ``blocks.png`` -- target block vs step and vs epoch;
* ``flops.png`` -- cumulative teacher FLOPs vs the full-depth baseline;
* ``report.md`` -- blocks trajectory, final loss, FLOPs saved, time.

Teacher FLOPs come from, in order: the epoch records' ``teacher_flops`` /
``baseline_teacher_flops``; a :class:`leap.cost.CostModel` built (on the meta device) from
the model names in the run's config (or ``--teacher``/``--student``); else the logged
teacher block counts normalized by the teacher depth L (units of "full teacher passes").

The command line is :mod:`leap.cli.report`; the figure helpers shared with ``leap experiment``
are in :mod:`leap.apps.plotting`.

Why this module is long: four plots and the Markdown summary read the same parsed run and
FLOP series; splitting them would only move the shared helpers between files.
"""

from __future__ import annotations


import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from ..runlog import RunLog, load_run
from ..runlog import number as _num
from .plotting import new_figure, save_figure

__all__ = ["RunLog", "load_run", "make_report", "DEFAULT_OUT_SUBDIR"]

DEFAULT_OUT_SUBDIR = "report"

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------
# FLOPs series
# --------------------------------------------------------------------------------------


@dataclass
class FlopsSeries:
    """Cumulative teacher cost vs. baseline along ``x`` (steps or epochs)."""

    x: list[float]
    x_label: str
    teacher: list[float]
    baseline: list[float]
    units: str                    # "FLOPs" or "full teacher passes"
    source: str                   # where the numbers come from
    total: list[float] | None = None           # whole step C(k), if a cost model is known
    baseline_total: list[float] | None = None

    @property
    def saved_fraction(self) -> float | None:
        if not self.baseline or not self.baseline[-1]:
            return None
        return 1.0 - self.teacher[-1] / self.baseline[-1]

    @property
    def total_saved_fraction(self) -> float | None:
        if not self.total or not self.baseline_total or not self.baseline_total[-1]:
            return None
        return 1.0 - self.total[-1] / self.baseline_total[-1]


def _cumsum(values: Sequence[float]) -> list[float]:
    out, acc = [], 0.0
    for v in values:
        acc += v
        out.append(acc)
    return out


def _cost_model_for(run: RunLog, teacher: str | None, student: str | None, img_size: int | None):
    """A CostModel from CLI names or the run config; (model, None) or (None, reason)."""
    cfg = run.config
    teacher = teacher or cfg.get("teacher")
    student = student or cfg.get("student")
    if not teacher or not student:
        return None, "the run config does not name the teacher and student"
    try:
        from ..cost import CostModel

        t_ov = cfg.get("teacher_overrides") if teacher == cfg.get("teacher") else None
        s_ov = cfg.get("student_overrides") if student == cfg.get("student") else None
        return CostModel(teacher, student, img_size=int(img_size or cfg.get("img_size") or 224),
                         teacher_overrides=t_ov or None, student_overrides=s_ov or None), None
    except Exception as e:  # noqa: BLE001 - reported in the Markdown, falls back to block counts
        return None, f"could not build a cost model for {teacher} / {student}: {type(e).__name__}: {e}"


def _units(run: RunLog) -> tuple[list[float], list[float], list[float], str]:
    """Per-unit ``(x, teacher blocks run, teacher forwards)``: per step if step records exist,
    else per epoch. The calibration scan is not included (:func:`calibration_blocks`)."""
    xs, blocks, n = [], [], []
    rows = [r for r in run.steps if _num(r.get("step")) is not None
            and (_num(r.get("teacher_blocks_run")) is not None or _num(r.get("block")) is not None)]
    if rows:
        for r in rows:
            s = _num(r["step"])
            b = _num(r.get("teacher_blocks_run"))
            b = _num(r.get("block")) if b is None else b
            xs.append(s)
            blocks.append(b)
            n.append(1.0)
        return xs, blocks, n, "step"
    for i, r in enumerate(run.epochs):
        steps = _num(r.get("steps")) or 1.0
        b = _num(r.get("teacher_blocks_run_total"))
        if b is None:
            mb = _num(r.get("mean_block"))
            mb = _num(r.get("block")) if mb is None else mb
            if mb is None:
                continue
            b = mb * steps
        ep = _num(r.get("epoch"))
        xs.append(ep if ep is not None else float(i))
        blocks.append(b)
        n.append(steps)
    return xs, blocks, n, "epoch"


def calibration_blocks(run: RunLog) -> float:
    """Teacher blocks run by the calibration scan (reported apart from the savings)."""
    return sum(_num(c.get("teacher_blocks_run")) or 0.0 for c in run.calibrations)


def flops_series(run: RunLog, cost_model=None, cost_note: str | None = None) -> FlopsSeries | None:
    """Cumulative teacher FLOPs (or full-teacher passes) vs. the full-depth baseline."""
    ep = run.epochs
    if ep and all(_num(r.get("teacher_flops")) is not None and _num(r.get("baseline_teacher_flops")) is not None
                  for r in ep):
        xs = [(_num(r.get("epoch")) if _num(r.get("epoch")) is not None else float(i)) for i, r in enumerate(ep)]
        total = base_total = None
        if all(_num(r.get("step_flops")) is not None and _num(r.get("baseline_step_flops")) is not None for r in ep):
            total = _cumsum([r["step_flops"] for r in ep])
            base_total = _cumsum([r["baseline_step_flops"] for r in ep])
        return FlopsSeries(xs, "epoch", _cumsum([r["teacher_flops"] for r in ep]),
                           _cumsum([r["baseline_teacher_flops"] for r in ep]), "FLOPs",
                           "per-epoch teacher_flops logged by the trainer", total, base_total)

    xs, blocks, n, x_label = _units(run)
    if not xs:
        return None
    scan = ""
    L = run.num_blocks
    if cost_model is not None:
        L = cost_model.num_blocks
        images = run.images_per_step or 1
        per_img = "" if run.images_per_step else " per image"
        runs = [cost_model.run_flops(ni, bi) for bi, ni in zip(blocks, n)]
        teacher = [images * r["teacher"] for r in runs]
        base = [images * r["baseline_teacher"] for r in runs]
        total = [images * r["step"] for r in runs]
        base_total = [images * r["baseline_step"] for r in runs]
        return FlopsSeries(xs, x_label, _cumsum(teacher), _cumsum(base), "FLOPs" + per_img,
                           f"logged teacher block counts{scan} x CostModel({cost_model.teacher_cost.depth}-block teacher)",
                           _cumsum(total), _cumsum(base_total))
    if not L:
        return None
    note = f" ({cost_note})" if cost_note else ""
    return FlopsSeries(xs, x_label, _cumsum([b / L for b in blocks]), _cumsum(n), "full teacher passes",
                       f"logged teacher block counts{scan} / L = {L}{note}")


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _mark_level_ups(ax, run: RunLog, max_marks: int = 60) -> None:
    xs = [s for s in (_num(u.get("step")) for u in run.level_ups) if s is not None]
    if 0 < len(xs) <= max_marks:
        for i, s in enumerate(xs):
            ax.axvline(s, color="tab:gray", alpha=0.3, lw=0.8, label="level-up" if i == 0 else None)


def _xy(records: list[dict[str, Any]], xkey: str, ykey: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(records):
        x, y = _num(r.get(xkey)), _num(r.get(ykey))
        if y is None:
            continue
        xs.append(x if x is not None else float(i))
        ys.append(y)
    return xs, ys


def plot_loss(run: RunLog, path: str) -> str | None:
    sx, sy = _xy(run.steps, "step", "loss")
    ex, ey = _xy(run.epochs, "step", "mean_loss")
    if not sy and not ey:
        return None
    fig, (ax,) = new_figure()
    if sy:
        ax.plot(sx, sy, lw=0.8, color="tab:blue", label="step loss")
    if ey:
        epoch_rows = [r for r in run.epochs if _num(r.get("mean_loss")) is not None]
        if all(_num(r.get("step")) is not None for r in epoch_rows):  # epoch means at their last step
            ax.plot(ex, ey, "o-", color="tab:orange", ms=3, label="epoch mean loss")
        elif not sy:  # epoch records only: plot against the epoch
            ex, ey = _xy(run.epochs, "epoch", "mean_loss")
            ax.plot(ex, ey, "o-", color="tab:orange", ms=3, label="epoch mean loss")
            ax.set_xlabel("epoch")
    ys = sy + ey
    if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    if sy:
        _mark_level_ups(ax, run)
        ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Distillation loss")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_cka(run: RunLog, path: str) -> str | None:
    sx, sy = _xy(run.steps, "step", "cka")
    ex, ey = _xy(run.epochs, "step", "mean_cka")
    if not sy and not ey:
        return None
    fig, (ax,) = new_figure()
    if sy:
        ax.plot(sx, sy, lw=0.8, color="tab:green", label="CKA (step)")
    if ey and len(ex) == len(ey):
        ax.plot(ex, ey, "o", color="tab:olive", ms=3, label="epoch mean CKA")
    tau = _num(run.config.get("tau"))
    if tau is not None and tau <= 1:
        ax.axhline(tau, color="tab:red", ls="--", lw=1, label=f"tau = {tau:g}")
    _mark_level_ups(ax, run)
    ax.set_xlabel("step")
    ax.set_ylabel("linear CKA")
    ax.set_title("CKA of the projected student vs. the current target")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_blocks(run: RunLog, path: str) -> str | None:
    sx, sy = _xy(run.steps, "step", "block")
    ex, ey = _xy(run.epochs, "epoch", "block")
    mx, my = _xy(run.epochs, "epoch", "mean_block")
    panels = [p for p in (sy, ey or my) if p]
    if not panels:
        return None
    L = run.num_blocks
    fig, axes = new_figure(len(panels), height=3.0)
    i = 0
    if sy:
        ax = axes[i]
        i += 1
        ax.step(sx, sy, where="post", color="tab:purple", lw=1.2, label="target block")
        ax.set_xlabel("step")
    if ey or my:
        ax = axes[i]
        if ey:
            ax.plot(ex, ey, "o-", color="tab:purple", lw=1.2, ms=3, label="block at epoch end")
        if my:
            ax.plot(mx, my, "s--", color="tab:pink", lw=1, ms=3, label="mean block in epoch")
        ax.set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if L:
            ax.axhline(L, color="tab:gray", ls="--", lw=1, label=f"L = {L}")
        ax.set_ylabel("teacher block k")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_title("Curriculum: target block")
    return save_figure(fig, path)


def plot_flops(series: FlopsSeries | None, path: str) -> str | None:
    if series is None:
        return None
    fig, (ax,) = new_figure()
    ax.plot(series.x, series.baseline, color="tab:red", ls="--", label="baseline teacher (every step at L)")
    ax.plot(series.x, series.teacher, color="tab:blue", label="LEAP teacher")
    ax.fill_between(series.x, series.teacher, series.baseline, color="tab:blue", alpha=0.12)
    if series.total and series.baseline_total:
        ax.plot(series.x, series.baseline_total, color="tab:red", ls=":", lw=1, label="baseline step total")
        ax.plot(series.x, series.total, color="tab:blue", ls=":", lw=1, label="LEAP step total")
    saved = series.saved_fraction
    title = "Cumulative teacher cost"
    if saved is not None:
        title += f" (teacher saving {100 * saved:.1f}%)"
    ax.set_title(title)
    ax.set_xlabel(series.x_label)
    ax.set_ylabel(f"cumulative {series.units}")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


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


def render_markdown(run: RunLog, series: FlopsSeries | None, plots: dict[str, str], cost_model=None,
                    cost_note: str | None = None) -> str:
    cfg, summ = run.config, run.summary
    L = cost_model.num_blocks if cost_model is not None else run.num_blocks
    lines = [f"# LEAP run report: `{run.run_dir}`", ""]
    teacher, student = cfg.get("teacher"), cfg.get("student")
    if cost_model is not None and not (teacher and student):
        teacher, student = "teacher", "student"
    facts = []
    if teacher and student:
        facts.append(f"- models: `{teacher}` -> `{student}`" + (f" at {cfg['img_size']} px" if cfg.get("img_size") else ""))
    mode = summ.get("mode") or ({"cka": "leap", "off": "baseline"}.get(cfg.get("curriculum")) if cfg.get("curriculum") else None)
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
    lines.append(f"- start block: {_fmt_num(start)}, final block: {_fmt_num(final)}, "
                 f"mean target block: {_fmt_num(mean_k)}")
    eb = [(_num(r.get("block")) if _num(r.get("block")) is not None else _num(r.get("mean_block"))) for r in run.epochs]
    eb = [b for b in eb if b is not None]
    if eb:
        lines.append(f"- block at the end of each epoch: {_run_lengths(eb)}")
    elif blocks_step:
        lines.append(f"- block per step: {_run_lengths(blocks_step)}")
    if run.level_ups:
        reasons = Counter(str(u.get("reason", "?")) for u in run.level_ups)
        lines.append(f"- level-ups: {len(run.level_ups)} ("
                     + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) + ")")
        lines += ["", "| step | epoch | from | to | reason |", "|---:|---:|---:|---:|---|"]
        shown = run.level_ups if len(run.level_ups) <= 60 else run.level_ups[:30] + [None] + run.level_ups[-29:]
        for u in shown:
            if u is None:
                lines.append("| ... | | | | |")
                continue
            lines.append(f"| {u.get('step', '')} | {u.get('epoch', '')} | {u.get('from_block', '')} | "
                         f"{u.get('to_block', '')} | {u.get('reason', '')} |")
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
    if mean_k is not None and L:
        lines.append(f"- teacher-only saving `1 - mean(k)/L` = 1 - {mean_k:.4g}/{L} = **{100 * (1 - mean_k / L):.1f}%**"
                     " (the paper's measure)")
    if series is not None:
        saved = series.saved_fraction
        if series.units.startswith("FLOPs"):
            lines.append(f"- teacher forward: {_fmt_flops(series.teacher[-1])} vs. baseline "
                         f"{_fmt_flops(series.baseline[-1])}{series.units[5:]} -> saved **{100 * saved:.1f}%**")
        else:
            lines.append(f"- teacher forward: {series.teacher[-1]:.4g} vs. baseline {series.baseline[-1]:.4g} "
                         f"full teacher passes -> saved **{100 * saved:.1f}%**")
        ts = series.total_saved_fraction
        if ts is not None:
            lines.append(f"- whole training step (teacher + student fwd/bwd + head + CKA): "
                         f"{_fmt_flops(series.total[-1])} vs. {_fmt_flops(series.baseline_total[-1])}"
                         f" -> saved **{100 * ts:.1f}%**")
        lines.append(f"- source: {series.source}")
        calib = calibration_blocks(run)
        if calib:
            frac = _num((summ.get("flops") or {}).get("calibration_fraction")) if isinstance(summ.get("flops"), dict) \
                else None
            if frac is None and L and n_steps:
                frac = calib / (n_steps * L)  # in teacher blocks (patch embedding not counted)
            share = f", {100 * frac:.2f}% of the baseline teacher cost" if frac is not None else ""
            lines.append(f"- calibration scan (once, first step): {int(calib)} teacher blocks{share}; "
                         "not included in the savings above")
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

    # ---- plots
    if plots:
        lines += ["## Plots", ""]
        for name, p in plots.items():
            lines.append(f"![{name}]({os.path.basename(p)})")
        lines.append("")
    if run.unknown_types:
        lines.append("<!-- ignored record types: " + ", ".join(f"{t} ({n})" for t, n in sorted(run.unknown_types.items()))
                     + " -->")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def make_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                teacher: str | None = None, student: str | None = None, img_size: int | None = None,
                use_cost_model: bool = True) -> dict[str, Any]:
    """Render the plots and ``report.md`` of a run.

    Args:
        run_dir: run directory (holding ``log.jsonl``) or the log file itself.
        out_dir: where to write (default ``RUN_DIR/report``); created if needed.
        teacher, student, img_size: model names for the FLOPs cost model when the run's
            config does not name them (or to override it).
        use_cost_model: set False to skip building models and count teacher blocks only.

    Returns:
        ``{"report": path of report.md, "plots": {name: png path}, "flops_source": str | None,
        "saved_fraction": float | None, "total_saved_fraction": float | None}``.

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
        cost_model, cost_note = _cost_model_for(run, teacher, student, img_size)
    series = flops_series(run, cost_model, cost_note)

    plots: dict[str, str] = {}
    for name, fn in (("loss", lambda p: plot_loss(run, p)), ("cka", lambda p: plot_cka(run, p)),
                     ("blocks", lambda p: plot_blocks(run, p)), ("flops", lambda p: plot_flops(series, p))):
        path = fn(os.path.join(out, f"{name}.png"))
        if path:
            plots[name] = path
    md = render_markdown(run, series, plots, cost_model, cost_note)
    report_path = os.path.join(out, "report.md")
    with open(report_path, "w", encoding="utf-8") as f:
        f.write(md)
    return {
        "report": report_path,
        "plots": plots,
        "flops_source": series.source if series else None,
        "saved_fraction": series.saved_fraction if series else None,
        "total_saved_fraction": series.total_saved_fraction if series else None,
    }
