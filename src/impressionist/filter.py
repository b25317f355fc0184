"""Stage `filter`: keep the usable images of ``data/raw``, convert them to RGB PNG, split train/val.

Each raw image is either kept or rejected with one recorded reason (checked in this order):

- ``missing_file``: the metadata names a file that is not there;
- ``undecodable``: PIL cannot decode it completely (truncated or corrupt bytes are not patched up);
- ``too_small``: its shorter side is below ``filter.min_side``;
- ``extreme_aspect``: long side / short side is above ``filter.max_aspect``;
- ``grayscale``: (if ``filter.drop_grayscale``) a gray mode, or RGB whose channels are nearly equal;
- ``near_duplicate``: its perceptual hash is within ``filter.phash_threshold`` bits of another kept
  image's. Near-duplicates are grouped transitively and each group keeps its largest image
  (ties: the smallest id), so the result does not depend on the order of the rows.

Kept images are EXIF-rotated and converted to RGB (CMYK, palette, alpha over white, 16-bit).
``rejected.csv`` lists each rejected image's id, reason and ``origin`` (where it is in the source:
for a folder of images, the user's own file name), and the summary line points to it.

The split is a pure function of the image id: ``val`` when the first 8 hex digits of
``sha256("split:" + id)`` / 2**32 fall below ``filter.val_fraction``. Adding or removing other
images never moves an image between train and val. There is no "at least one val image" fix-up,
because it would break that stability; an empty val split stops the stage with a clear message.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageOps
from tqdm import tqdm

from .errors import UserError, atomic_dir, atomic_write_text, stage_main
from .layout import DATA_ARTISTS_PLOT, DATA_METRICS, FILTERED_DIR, IMAGES_SUBDIR, RAW_DIR
from .params import DEFAULT_PARAMS, load_params
from .params.data import FilterParams
from .plotting import save_figure
from .tables import METADATA_FILE, read_raw

REASONS = ["missing_file", "undecodable", "too_small", "extreme_aspect", "grayscale", "near_duplicate"]
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
# RGB counts as gray when 99% of pixels have channels within this many levels of each other;
# JPEG chroma noise on gray content stays well below it, sepia and muted colour stay above.
GRAY_CHANNEL_TOLERANCE = 12
# Below this many images, a process pool costs more than it saves.
PARALLEL_MIN_IMAGES = 64
PNG_COMPRESS_LEVEL = 1  # lossless either way; level 1 is several times faster on large paintings


def split_of(image_id: str, val_fraction: float) -> str:
    """``val`` or ``train``, from a hash of the id alone (stable when images are added)."""
    score = int(hashlib.sha256(("split:" + image_id).encode()).hexdigest()[:8], 16) / 2**32
    return "val" if score < val_fraction else "train"


def is_grayscale(image: Image.Image) -> bool:
    if image.mode in GRAY_MODES:
        return True
    rgb = image if image.mode == "RGB" else to_rgb(image)
    small = rgb.copy()
    small.thumbnail((128, 128))
    pixels = np.asarray(small, dtype=np.int16)
    spread = pixels.max(axis=2) - pixels.min(axis=2)
    return float(np.percentile(spread, 99)) <= GRAY_CHANNEL_TOLERANCE


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any PIL mode: alpha is composited over white, 16/32-bit gray is scaled, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit images use 0..65535; a 32-bit "I" image from a 16-bit PNG does too.
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        gray = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """Make PIL raise on truncated files instead of padding them with gray."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def inspect_image(task: tuple[str, str, str, FilterParams]) -> dict:
    """Check one raw image; if it passes, write it as RGB PNG to ``out_path`` and hash it.

    Returns ``{"id", "reason"}`` (reason None when kept) plus ``width``, ``height``, ``phash``
    for kept images. Runs in worker processes, so it takes and returns plain data.
    """
    import imagehash

    image_id, raw_path, out_path, cfg = task
    if not Path(raw_path).is_file():
        return {"id": image_id, "reason": "missing_file"}
    with strict_decoding():
        try:
            with Image.open(raw_path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
        except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            return {"id": image_id, "reason": "undecodable"}
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short < cfg.min_side:
        return {"id": image_id, "reason": "too_small"}
    if long / short > cfg.max_aspect:
        return {"id": image_id, "reason": "extreme_aspect"}
    if cfg.drop_grayscale and is_grayscale(image):
        return {"id": image_id, "reason": "grayscale"}
    rgb = to_rgb(image)
    rgb.save(out_path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    phash = int(str(imagehash.phash(rgb)), 16)
    return {"id": image_id, "reason": None, "width": width, "height": height, "phash": phash}


def near_duplicate_losers(ids: list[str], areas: list[int], hashes: list[int], threshold: int) -> dict[str, str]:
    """Map each image that loses to a near-duplicate onto the image its group keeps.

    Groups are connected components of "phash Hamming distance <= threshold"; the winner is the
    largest image, ties broken by the smallest id.
    """
    n = len(ids)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bits = np.array(hashes, dtype=np.uint64)
    for i in range(n - 1):
        distances = np.bitwise_count(bits[i + 1:] ^ bits[i])
        for j in np.nonzero(distances <= threshold)[0]:
            a, b = root(i), root(i + 1 + int(j))
            if a != b:
                parent[b] = a
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    losers: dict[str, str] = {}
    for members in groups.values():
        if len(members) > 1:
            winner = min(members, key=lambda i: (-areas[i], ids[i]))
            losers.update({ids[i]: ids[winner] for i in members if i != winner})
    return losers


def read_raw_metadata(raw_dir: Path) -> pd.DataFrame:
    return read_raw(raw_dir)


def plot_artists(table: pd.DataFrame, top: int = 30):
    """A horizontal bar chart of kept images per artist (train and val stacked); returns the Figure."""
    from .plotting import new_figure

    counts = table.groupby(["artist", "split"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=["train", "val"], fill_value=0)
    counts = counts.loc[counts.sum(axis=1).sort_values(ascending=False, kind="stable").index]
    if len(counts) > top:
        rest = counts.iloc[top:].sum()
        counts = pd.concat([counts.iloc[:top], pd.DataFrame([rest], index=[f"{len(counts) - top} other artists"])])
    counts = counts.iloc[::-1]  # largest at the top
    fig = new_figure(7, 1.5 + 0.28 * len(counts))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(counts.index, counts["train"], label="train", color="#4c72b0")
    ax.barh(counts.index, counts["val"], left=counts["train"], label="val", color="#dd8452")
    ax.set_xlabel("images")
    synthetic = "source" in table and (table["source"] == "synthetic").all()
    ax.set_title(f"Images per artist after filtering ({len(table)} total"
                 + (", SYNTHETIC demo images)" if synthetic else ")"))
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def run(params: Mapping[str, Any], raw_dir: Path | str = RAW_DIR, filtered_dir: Path | str = FILTERED_DIR,
        metrics_path: Path | str = DATA_METRICS, plot_path: Path | str = DATA_ARTISTS_PLOT) -> dict:
    """Filter ``raw_dir`` into ``filtered_dir``; write the data metrics and the artists plot.

    Returns the metrics written to ``metrics_path``.
    """
    cfg = FilterParams.check(params)
    raw_dir, filtered_dir = Path(raw_dir), Path(filtered_dir)
    raw = read_raw_metadata(raw_dir)

    with atomic_dir(filtered_dir) as out:
        (out / IMAGES_SUBDIR).mkdir()
        tasks = [(row.id, str(raw_dir / row.file), str(out / IMAGES_SUBDIR / f"{row.id}.png"), cfg)
                 for row in raw.itertuples()]
        workers = min(os.cpu_count() or 1, 8)
        if len(tasks) >= PARALLEL_MIN_IMAGES and workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = list(tqdm(pool.map(inspect_image, tasks, chunksize=8), total=len(tasks),
                                    desc="filter", unit="img", disable=None))
        else:
            results = [inspect_image(task) for task in tqdm(tasks, desc="filter", unit="img", disable=None)]

        reasons = {r["id"]: r["reason"] for r in results}
        passed = [r for r in results if r["reason"] is None]
        losers = near_duplicate_losers([r["id"] for r in passed], [r["width"] * r["height"] for r in passed],
                                       [r["phash"] for r in passed], cfg.phash_threshold)
        for loser in losers:
            reasons[loser] = "near_duplicate"
            (out / IMAGES_SUBDIR / f"{loser}.png").unlink()

        sizes = {r["id"]: (r["width"], r["height"]) for r in passed}
        kept = raw[[reasons[i] is None for i in raw["id"]]].copy()
        if kept.empty:
            counts = Counter(reason for reason in reasons.values() if reason)
            raise UserError(f"no image of {len(raw)} survived filtering ({', '.join(f'{n} {r}' for r, n in counts.items())}); "
                            "relax filter.min_side / max_aspect / drop_grayscale or download more images")
        kept["file"] = [f"{IMAGES_SUBDIR}/{i}.png" for i in kept["id"]]
        # Sizes as stored in the PNG (after EXIF rotation), which is what later stages read.
        kept["width"] = [sizes[i][0] for i in kept["id"]]
        kept["height"] = [sizes[i][1] for i in kept["id"]]
        kept["split"] = [split_of(i, cfg.val_fraction) for i in kept["id"]]
        n_val = int((kept["split"] == "val").sum())
        if n_val == 0 or n_val == len(kept):
            empty = "val" if n_val == 0 else "train"
            raise UserError(f"the {empty} split is empty ({len(kept)} images kept, filter.val_fraction="
                            f"{cfg.val_fraction}); {'raise' if n_val == 0 else 'lower'} filter.val_fraction "
                            "or download more images")
        kept = kept.reset_index(drop=True)
        kept.to_parquet(out / METADATA_FILE, index=False)

        # `origin` names the image as the source has it (for a folder: the user's own file name).
        rejected = pd.DataFrame([(row.id, reasons[row.id], row.origin) for row in raw.itertuples() if reasons[row.id]],
                                columns=["id", "reason", "origin"])
        rejected.to_csv(out / "rejected.csv", index=False)

        per_reason = Counter(rejected["reason"])
        metrics = {
            "images_in": int(len(raw)),
            "kept": int(len(kept)),
            "rejected": int(len(rejected)),
            "rejected_by_reason": {reason: int(per_reason.get(reason, 0)) for reason in REASONS},
            "train": int(len(kept) - n_val),
            "val": n_val,
            "artists": int(kept["artist"].nunique()),
        }
        plot = plot_artists(kept)

    atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    save_figure(plot, plot_path)
    reasons_text = ", ".join(f"{n} {r}" for r, n in metrics["rejected_by_reason"].items() if n) or "none"
    where = f" (each with its origin in the source: {Path(filtered_dir) / 'rejected.csv'})" if metrics["rejected"] else ""
    print(f"filter: kept {metrics['kept']} of {metrics['images_in']} images (train {metrics['train']}, "
          f"val {metrics['val']}); rejected {reasons_text}{where}")
    return metrics


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Filter data/raw into RGB PNGs with a train/val split.")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    run(load_params(args.params))


if __name__ == "__main__":
    main()
