"""Small plotting helpers for the stages' DVC plots (PNG files).

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas, never through
pyplot, so no GUI backend or global pyplot state is involved. Files appear atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import atomic_write_bytes

BASE_COLOUR = "#7f7f7f"
LORA_COLOUR = "#1f77b4"


def new_figure(width: float, height: float) -> Figure:
    """A Figure attached to an Agg canvas (no pyplot)."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path | str) -> Path:
    """Render ``fig`` as PNG and write it atomically to ``path``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def _ci_errors(estimates: Sequence) -> list[list[float]]:
    """Asymmetric error-bar lengths (below, above) of Estimates, as matplotlib's ``yerr`` wants them."""
    return [[max(e.value - e.ci_low, 0.0) for e in estimates], [max(e.ci_high - e.value, 0.0) for e in estimates]]


def plot_metrics_vs_scale(
    scales: Sequence[float],
    values: Mapping[str, Sequence],
    path: Path | str,
    *,
    xlabel: str = "LoRA scale (0 = base model)",
    title: str | None = None,
) -> Path:
    """One panel per metric: ``values[metric][i]`` (an Estimate) at ``scales[i]``, with its CI as an
    error bar and a shaded band."""
    names = list(values)
    rows, cols = _grid(len(names))
    fig = new_figure(3.4 * cols, 3.0 * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        estimates = list(values[name])
        ax.fill_between(list(scales), [e.ci_low for e in estimates], [e.ci_high for e in estimates],
                        color=LORA_COLOUR, alpha=0.15, linewidth=0)
        ax.errorbar(list(scales), [e.value for e in estimates], yerr=_ci_errors(estimates), marker="o",
                    color=LORA_COLOUR, capsize=3)
        ax.set_title(name)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_xticks(list(scales))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_deltas(deltas: Mapping, path: Path | str, *, title: str | None = None) -> Path:
    """One panel per metric: the LoRA − base difference with its CI against a zero line. A CI that
    crosses the line is drawn grey (no significant change), one that does not in colour."""
    names = list(deltas)
    rows, cols = _grid(len(names))
    fig = new_figure(2.6 * cols, 2.6 * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        est = deltas[name]
        colour = LORA_COLOUR if est.excludes_zero() else BASE_COLOUR
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.errorbar([0], [est.value], yerr=_ci_errors([est]), marker="o", color=colour, capsize=6)
        ax.annotate(f"{est.value:+.3g}\n[{est.ci_low:+.3g}, {est.ci_high:+.3g}]", (0, est.value),
                    xytext=(10, 0), textcoords="offset points", fontsize=7, va="center")
        ax.set_xticks([])
        ax.set_xlim(-1, 2)
        ax.set_title(f"Δ {name}")
        ax.margins(y=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
