"""The plots of ``leap experiment`` (matplotlib's Agg canvas, :mod:`leap.apps.plotting`): each method's
target-block trajectory (one line per seed), accuracy vs teacher FLOPs (one point per run), kNN learning
curves (per epoch and per teacher FLOPs spent), and the teacher's block-to-block CKA."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import Any

from .experiment_report import METRIC_BY_KEY
from .plotting import new_figure, save_figure

__all__ = ["write_plots"]


def _methods(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in records))


def _plot_trajectories(records: list[dict[str, Any]], path: str, mark: float | None) -> str:
    methods = _methods(records)
    fig, axes = new_figure(nrows=len(methods), height=1.9)
    top = max((r["num_blocks"] or 0) for r in records) or 1
    for i, (ax, method) in enumerate(zip(axes, methods)):
        runs = [r for r in records if r["method"] == method]
        for j, rec in enumerate(runs):
            blocks = rec["trajectory"]["step_blocks"]
            if not blocks:
                continue
            # Step k (1-indexed) trains on blocks[k - 1] over [(k - 1) / S, k / S] of the run.
            x = [k / len(blocks) for k in range(len(blocks) + 1)]
            ax.plot(
                x, [*blocks, blocks[-1]], drawstyle="steps-post", color=f"C{i}", lw=1.0, alpha=0.35 + 0.65 / (1 + j)
            )
        if mark is not None:
            ax.axvline(mark, color="gray", ls="--", lw=0.8)
        ax.axhline(top, color="gray", ls=":", lw=0.8)
        arrivals = [r["metrics"].get("last_block_at") for r in runs]
        shown = ", ".join("never" if a is None else f"{a * 100:.0f}%" for a in arrivals)
        ax.set_title(f"{method}: last block reached at {shown} of its steps", fontsize=9)
        ax.set_ylim(0, top + 1)
        ax.set_xlim(0, 1)
        ax.set_ylabel("target block", fontsize=8)
    axes[-1].set_xlabel("fraction of the run's training steps" + (f" (dashed: {mark:.0%})" if mark else ""))
    return save_figure(fig, path)


def _plot_accuracy_vs_flops(records: list[dict[str, Any]], path: str, keys: Sequence[str]) -> str:
    methods = _methods(records)
    fig, axes = new_figure(nrows=len(keys), height=3.2)
    for ax, key in zip(axes, keys):
        for i, method in enumerate(methods):
            pts = [
                (r["metrics"]["teacher_tflops"], r["metrics"][key] * 100)
                for r in records
                if r["method"] == method and r["metrics"].get(key) is not None and r["metrics"].get("teacher_tflops")
            ]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", s=22, label=method, alpha=0.8)
        ax.set_xlabel("teacher TFLOP per run (training steps)")
        ax.set_ylabel(f"{METRIC_BY_KEY[key].label} top-1 (%)")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def _plot_curves(records: list[dict[str, Any]], path: str) -> str | None:
    methods = [m for m in _methods(records) if any(r["curve"] for r in records if r["method"] == m)]
    if not methods:
        return None
    fig, axes = new_figure(nrows=2, height=3.2)
    for i, method in enumerate(methods):
        runs = [r["curve"] for r in records if r["method"] == method and r.get("curve")]
        n = min(len(c) for c in runs)
        epochs = [runs[0][k]["epoch"] for k in range(n)]
        acc = [statistics.fmean(c[k]["knn_patch"] * 100 for c in runs) for k in range(n)]
        flops = [statistics.fmean((c[k]["teacher_flops"] or 0) / 1e12 for c in runs) for k in range(n)]
        axes[0].plot(epochs, acc, "o-", color=f"C{i}", ms=3, label=method)
        axes[1].plot(flops, acc, "o-", color=f"C{i}", ms=3, label=method)
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("teacher TFLOP spent")
    for ax in axes:
        ax.set_ylabel("kNN patch top-1 (%), subset")
        ax.legend(fontsize=7)
    axes[0].set_title("learning curves (mean over seeds; kNN on the curve's bank and test subsets)", fontsize=9)
    return save_figure(fig, path)


def _plot_teacher_cka(cka: dict[str, Any], path: str) -> str:
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
    records: list[dict[str, Any]],
    cka: dict[str, Any] | None,
    out: str,
    *,
    keys: Sequence[str] = ("linear_cls_best", "knn_cls"),
    mark: float | None = None,
) -> dict[str, str]:
    """trajectories.png, accuracy_vs_flops.png (one panel per metric of ``keys``), learning_curves.png (runs
    with a curve) and teacher_cka.png (with ``cka``) in ``out``; ``mark``: a fraction of training drawn on the
    trajectories. ``{name: path}`` of those written (none without matplotlib: the tables stand without plots)."""
    plots: dict[str, str] = {}
    try:
        plots["trajectories"] = _plot_trajectories(records, os.path.join(out, "trajectories.png"), mark)
        plots["accuracy_vs_flops"] = _plot_accuracy_vs_flops(records, os.path.join(out, "accuracy_vs_flops.png"), keys)
        curves = _plot_curves(records, os.path.join(out, "learning_curves.png"))
        if curves:
            plots["learning_curves"] = curves
        if cka is not None:
            plots["teacher_cka"] = _plot_teacher_cka(cka, os.path.join(out, "teacher_cka.png"))
    except ImportError as exc:
        print(f"(plots skipped: {exc})")
    return plots
