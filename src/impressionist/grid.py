"""The base-vs-LoRA sample grid: rows are prompts (one per seed), columns base | LoRA scales."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
from PIL import Image


def save_sample_grid(base_dir: Path, lora_dir: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = pd.read_csv(Path(base_dir) / "samples.csv").assign(folder=str(base_dir))
    lora = pd.read_csv(Path(lora_dir) / "samples.csv").assign(folder=str(lora_dir))
    table = pd.concat([base, lora])
    scales = sorted(table["lora_scale"].unique())
    rows = table[["prompt", "seed"]].drop_duplicates().values.tolist()
    fig, axes = plt.subplots(len(rows), len(scales), squeeze=False,
                             figsize=(2.2 * len(scales), 2.2 * len(rows)))
    for r, (prompt, seed) in enumerate(rows):
        for c, scale in enumerate(scales):
            ax = axes[r][c]
            ax.axis("off")
            match = table[(table.prompt == prompt) & (table.seed == seed) & (table.lora_scale == scale)]
            if not match.empty:
                item = match.iloc[0]
                ax.imshow(Image.open(Path(item.folder) / item.file))
            if r == 0:
                ax.set_title("base" if scale == 0 else f"LoRA x{scale:g}", fontsize=9)
            if c == 0:
                ax.text(-0.05, 0.5, "\n".join(textwrap.wrap(f"{prompt} (seed {seed})", 28)),
                        transform=ax.transAxes, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
