"""The base-vs-LoRA sample grid: rows are prompts (one per seed), columns base | LoRA scales.

Every row is captioned with its prompt and seed (validation captions are marked "val caption"),
every column with "base" or "LoRA x<scale>", so the PNG reads on its own in a pull request.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from .hub import BUILTIN_PREFIX
from .layout import SAMPLES_TABLE
from .plotting import new_figure, save_figure

CELL_INCHES = 2.2
LABEL_INCHES = 2.4   # room for the wrapped prompt left of the first column
LABEL_WIDTH = 34     # characters per line of a wrapped prompt


def column_title(scale: float) -> str:
    return "base" if scale == 0 else f"LoRA x{scale:g}"


def row_label(prompt: str, seed: int, source: str | None) -> str:
    marker = "val caption: " if source == "val_caption" else ""
    return "\n".join(textwrap.wrap(f"{marker}{prompt} (seed {seed})", LABEL_WIDTH))


def _samples(folder: Path) -> pd.DataFrame:
    return pd.read_csv(Path(folder) / SAMPLES_TABLE).assign(folder=str(folder))


def save_sample_grid(base_dir: Path, lora_dir: Path, path: Path, base_model: str = "") -> Path:
    """Draw ``samples/base`` and ``samples/lora`` (their ``samples.csv``) as one captioned PNG."""
    return save_figure(sample_grid_figure(base_dir, lora_dir, base_model), path)


def sample_grid_figure(base_dir: Path, lora_dir: Path, base_model: str = "") -> Figure:
    """The grid as a matplotlib Figure: one row per (prompt, seed), one column per LoRA scale (0 = base)."""
    table = pd.concat([_samples(base_dir), _samples(lora_dir)], ignore_index=True)
    scales = sorted(table["lora_scale"].unique())
    rows = table[["prompt", "seed"]].drop_duplicates().values.tolist()
    fig = new_figure(LABEL_INCHES + CELL_INCHES * len(scales), 0.7 + CELL_INCHES * len(rows))
    grid = fig.add_gridspec(len(rows), len(scales), left=LABEL_INCHES / fig.get_figwidth(), right=0.99,
                            top=1 - 0.62 / fig.get_figheight(), bottom=0.01, wspace=0.04, hspace=0.06)
    for r, (prompt, seed) in enumerate(rows):
        for c, scale in enumerate(scales):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            match = table[(table.prompt == prompt) & (table.seed == seed) & (table.lora_scale == scale)]
            if match.empty:  # shown as an empty, labelled cell rather than silently dropped
                ax.text(0.5, 0.5, "missing", transform=ax.transAxes, ha="center", va="center", fontsize=8)
            else:
                item = match.iloc[0]
                with Image.open(Path(item.folder) / item.file) as image:
                    ax.imshow(image.convert("RGB"))
            if r == 0:
                ax.set_title(column_title(scale), fontsize=10)
            if c == 0:
                source = match.iloc[0].prompt_source if not match.empty else None
                ax.text(-0.04, 0.5, row_label(prompt, int(seed), source), transform=ax.transAxes,
                        ha="right", va="center", fontsize=7)
    title = "rows: prompt (seed) · columns: base model | LoRA scale"
    if base_model:
        # The demo's pictures come from random weights: the grid must say so wherever it is shown.
        demo = " (tiny RANDOM-weight demo model)" if base_model.startswith(BUILTIN_PREFIX) else ""
        title = f"{base_model}{demo}\n{title}"
    fig.suptitle(title, fontsize=9,
                 x=0.5, y=1 - 0.08 / fig.get_figheight(), va="top")
    return fig
