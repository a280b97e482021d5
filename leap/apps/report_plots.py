"""The figures of ``leap report`` (loss, CKA, target block, cumulative teacher FLOPs, and the learning curves
of evaluated checkpoints), drawn from a parsed run (:class:`leap.runlog.RunLog`) with the Agg helpers of
:mod:`leap.apps.plotting`. Each returns the PNG's path, or ``None`` when there is nothing to plot."""

from __future__ import annotations

from typing import Any

from ..runlog import RunLog
from ..runlog import number as _num
from .flops_series import FlopsSeries
from .plotting import new_figure, save_figure

__all__ = ["plot_loss", "plot_cka", "plot_blocks", "plot_flops", "plot_learning_curves"]


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


def plot_learning_curves(
    curves: dict[str, dict[str, list[dict[str, Any]]]], path: str, max_metrics: int = 4
) -> str | None:
    """One row per metric (the first ``max_metrics``), accuracy vs epoch (left) and vs teacher FLOPs spent
    (right), one line per run. ``curves``: :func:`leap.apps.report.learning_curves`."""
    metrics = list(curves)[:max_metrics]
    if not metrics:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4 * len(metrics)), dpi=100)
    FigureCanvasAgg(fig)
    for row, metric in enumerate(metrics):
        by_epoch = fig.add_subplot(len(metrics), 2, 2 * row + 1)
        by_flops = fig.add_subplot(len(metrics), 2, 2 * row + 2)
        for run, points in curves[metric].items():
            line = by_epoch.plot(
                [p["epoch"] for p in points], [100 * p["value"] for p in points], "o-", ms=3, label=run
            )[0]
            costed = [p for p in points if p.get("teacher_flops") is not None]
            if costed:
                by_flops.plot(
                    [p["teacher_flops"] for p in costed],
                    [100 * p["value"] for p in costed],
                    "o-",
                    ms=3,
                    color=line.get_color(),
                    label=run,
                )
        by_epoch.set_xlabel("epoch")
        by_flops.set_xlabel("teacher FLOPs spent")
        for ax in (by_epoch, by_flops):
            ax.set_ylabel(f"{metric} (%)")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(loc="lower right", fontsize=8)
        by_epoch.set_title(f"{metric} vs epoch")
        by_flops.set_title(f"{metric} vs teacher compute")
    return save_figure(fig, path)
