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


def plot_base_vs_lora(
    base: Mapping[str, float],
    lora: Mapping[str, float],
    metrics: Sequence[str],
    path: Path | str,
    *,
    labels: tuple[str, str] = ("base", "LoRA"),
    errors: Mapping[str, tuple[float, float]] | None = None,
    title: str | None = None,
) -> Path:
    """One small bar chart per metric (their scales differ), base vs LoRA side by side.

    ``errors`` optionally maps a metric to (base_err, lora_err) error-bar half-widths.
    """
    rows, cols = _grid(len(metrics))
    fig = new_figure(3.0 * cols, 3.0 * rows)
    for i, name in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = [float(base[name]), float(lora[name])]
        yerr = list(errors[name]) if errors and name in errors else None
        ax.bar(labels, values, color=[BASE_COLOUR, LORA_COLOUR], yerr=yerr, capsize=4)
        for x, v in enumerate(values):
            ax.annotate(f"{v:.4g}", (x, v), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
        ax.set_title(name)
        ax.margins(y=0.15)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_metrics_vs_scale(
    scales: Sequence[float],
    values: Mapping[str, Sequence[float]],
    path: Path | str,
    *,
    xlabel: str = "LoRA scale (0 = base model)",
    title: str | None = None,
) -> Path:
    """One line plot per metric: ``values[metric][i]`` at ``scales[i]``."""
    names = list(values)
    rows, cols = _grid(len(names))
    fig = new_figure(3.2 * cols, 3.0 * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(list(scales), [float(v) for v in values[name]], marker="o", color=LORA_COLOUR)
        ax.set_title(name)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_xticks(list(scales))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
