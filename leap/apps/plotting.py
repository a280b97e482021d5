"""Figures of ``leap report`` and ``leap experiment``: matplotlib's Agg canvas, no display and no
global pyplot state (safe in any process, threads included)."""

from __future__ import annotations

__all__ = ["new_figure", "save_figure"]


def new_figure(nrows: int = 1, height: float = 3.6):
    """``(figure, [axes, ...])``: an 8-inch wide figure of ``nrows`` stacked axes, ``height`` inches each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, height * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, 1, i + 1) for i in range(nrows)]
    return fig, axes


def save_figure(fig, path: str) -> str:
    """Lay out ``fig`` and write it to ``path`` as PNG; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
