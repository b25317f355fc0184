"""Stages ``encode_latents`` and ``encode_text``: cache VAE latents and text embeddings once, so
training never runs the VAE or the text encoders.

Two halves, two DVC stages, two folders (``data/cache/latents``, ``data/cache/text``), each keyed on
what it reads: the latents on the base model, ``encode.*`` and data/filtered; the text embeddings on
the base model, ``caption.max_sequence_length`` and data/captions. A caption or template change so
re-encodes only the text, a resolution change only the latents, and ``lora.*`` / ``train.*`` neither.
Every image is cached at each resolution of ``encode.resolution`` (one value or a list, e.g.
``[512, 768, 1024]``): at each, it is assigned to an aspect-ratio bucket of about resolution^2 pixels
(sides multiples of 16) and centre-cropped to it. Shards are flushed as they fill. Images are decoded
and resized by ``encode.dataloader_workers`` processes a few batches ahead of the VAE, so memory
stays bounded by the shard size and the prefetch depth, not the number of images.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from diffusers.training_utils import free_memory
from PIL import Image
from tqdm import tqdm

from .errors import UserError, atomic_dir, first_line, stage_main
from .latent_cache import EMPTY_CAPTION_KEY, INDEX, CacheReader, ShardWriter, caption_key
from .layout import CACHE_DIR, CAPTIONS, FILTERED_DIR, LATENT_CACHE_DIR, TEXT_CACHE_DIR
from .models import encode_prompts, load_vae, resolve_base_model, resolve_device, resolve_dtype
from .params import DEFAULT_PARAMS, fingerprint, load_params
from .params.data import CaptionParams, EncodeParams
from .params.model import ModelParams
from .tables import read_captions, read_filtered


def aspect_buckets(resolution: int, min_aspect: float, max_aspect: float) -> list[tuple[int, int]]:
    """(height, width) buckets of about resolution^2 pixels, sides multiples of 16."""
    from diffusers.training_utils import generate_aspect_ratio_buckets

    buckets = generate_aspect_ratio_buckets(resolution, divisibility=16)
    kept = [(h, w) for h, w in buckets if min_aspect <= w / h <= max_aspect]
    return sorted(kept, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    from diffusers.training_utils import find_nearest_bucket

    return buckets[find_nearest_bucket(height, width, buckets)]


def load_image(path: Path) -> Image.Image:
    """An RGB image of data/filtered; an unreadable file is one clear line, not a traceback."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{path} cannot be read as an image ({first_line(err)}); re-run the filter stage "
                        "(`dvc repro -f filter`)") from err


def crop_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize so the image covers the bucket, then centre-crop (keeps the painting's proportions)."""
    bh, bw = bucket
    scale = max(bh / image.height, bw / image.width)
    size = (max(bw, round(image.width * scale)), max(bh, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (image.width - bw) // 2, (image.height - bh) // 2
    return image.crop((left, top, left + bw, top + bh))


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


# Keys of encode.* that do not change what is cached (EncodeParams declares them `operational`): left
# out of the cache fingerprint and of the DVC stage's params.
NOT_CACHED = EncodeParams.operational_settings()
# The encode.* keys the text half reads (the rest shape only the latents).
TEXT_KEYS = ("batch_size", "shard_size")


def _latent_rows(filtered_dir: Path) -> pd.DataFrame:
    """The training split of data/filtered, sorted by id: the images ``encode_latents`` caches."""
    meta = read_filtered(filtered_dir, ("id", "file", "split"))
    rows = meta[meta["split"] == "train"]
    if rows.empty:
        raise UserError("no training images after filtering; add images or relax filter params")
    return rows.sort_values("id").reset_index(drop=True)


def _text_rows(captions_path: Path) -> pd.DataFrame:
    """The training split's captions, sorted by id: what ``encode_text`` embeds."""
    captions = read_captions(captions_path, ("id", "split", "caption"))
    rows = captions[captions["split"] == "train"][["id", "caption"]]
    if rows["caption"].isna().any():
        missing = rows.loc[rows["caption"].isna(), "id"].iloc[0]
        raise UserError(f"image {missing} has no caption; re-run the caption stage")
    if rows.empty:
        raise UserError("no training captions; check the filter and caption stages")
    return rows.sort_values("id").reset_index(drop=True)


class BucketBatchImages(torch.utils.data.Dataset):
    """Item ``i``: the pixels of the ``i``-th encode batch (its rows' images cropped to their bucket),
    one tensor per flip setting.

    Served through a DataLoader, whose worker processes decode and resize upcoming batches while the
    VAE encodes the current one; the loader keeps the order, so the workers never change the cache.
    An unreadable image comes back as its UserError (raised by the caller): an exception raised in a
    worker would reach the user wrapped in a traceback.
    """

    def __init__(self, batches: list[tuple[tuple[int, int], list[int]]], rows: pd.DataFrame,
                 filtered_dir: Path, flips: tuple[bool, ...]):
        self.batches, self.rows, self.filtered_dir, self.flips = batches, rows, filtered_dir, flips

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[bool, torch.Tensor] | UserError:
        bucket, indices = self.batches[i]
        try:
            images = [crop_to_bucket(load_image(self.filtered_dir / f), bucket)
                      for f in self.rows.loc[indices, "file"]]
        except UserError as err:
            return err
        return {flip: to_pixels([im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
                                if flip else images)
                for flip in self.flips}


def encode_batches(rows: pd.DataFrame, cfg: EncodeParams,
                   resolution: int) -> list[tuple[tuple[int, int], list[int]]]:
    """(bucket, row indices) of every encode batch at ``resolution``: rows grouped by nearest
    bucket, buckets in order."""
    buckets = aspect_buckets(resolution, cfg.bucket_min_aspect, cfg.bucket_max_aspect)
    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, row in rows.iterrows():
        by_bucket[nearest_bucket(int(row["height"]), int(row["width"]), buckets)].append(i)
    return [(bucket, by_bucket[bucket][start:start + cfg.batch_size])
            for bucket in sorted(by_bucket)
            for start in range(0, len(by_bucket[bucket]), cfg.batch_size)]


@torch.no_grad()
def _encode_latents(rows: pd.DataFrame, filtered_dir: Path, cfg: EncodeParams, model_folder: str,
                    dtype: torch.dtype, device: torch.device, out: Path) -> list[dict[str, Any]]:
    plan = [(resolution, bucket, indices) for resolution in cfg.resolutions
            for bucket, indices in encode_batches(rows, cfg, resolution)]
    batches = [(bucket, indices) for _, bucket, indices in plan]
    flips = (False, True) if cfg.flip else (False,)
    workers = cfg.dataloader_workers
    loader = torch.utils.data.DataLoader(
        BucketBatchImages(batches, rows, filtered_dir, flips), batch_size=None, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None)

    vae = load_vae(model_folder, dtype).to(device).eval()
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    writer = ShardWriter(out, "latents", cfg.shard_size)
    samples = []
    progress = tqdm(total=len(rows) * len(flips) * len(cfg.resolutions), desc="encode latents",
                    unit="img")
    for (resolution, bucket, indices), pixels_by_flip in zip(plan, loader, strict=True):
        if isinstance(pixels_by_flip, UserError):
            raise pixels_by_flip
        batch = rows.loc[indices]
        for flip, pixels in pixels_by_flip.items():
            pixels = pixels.to(device=device, dtype=dtype, non_blocking=True)
            # The posterior mean, not a sample: the cache (and so training) stays deterministic.
            latents = (vae.encode(pixels).latent_dist.mode() - shift) * scale
            for (_, row), latent in zip(batch.iterrows(), latents):
                key = f"{row['id']}@{resolution}" + (":flip" if flip else "")
                writer.add(key, {"latent": latent})
                samples.append({"key": key, "id": row["id"], "resolution": resolution, "bucket": list(bucket),
                                "flip": flip,
                                "shard": writer.location[key], "bytes": latent.numel() * latent.element_size()})
            progress.update(len(batch))
    progress.close()
    writer.flush()
    del vae
    free_memory()
    return samples


def _encode_texts(captions: list[str], cfg: EncodeParams, max_sequence_length: int,
                  model_folder: str, dtype: torch.dtype, device: torch.device,
                  out: Path) -> dict[str, str]:
    writer = ShardWriter(out, "text", cfg.shard_size)
    keyed = {caption_key(c): c for c in captions}
    items = [(EMPTY_CAPTION_KEY, "")] + sorted(keyed.items())
    batches = encode_prompts(model_folder, dtype, device, [text for _, text in items], max_sequence_length,
                             batch_size=cfg.batch_size)
    done = 0
    with tqdm(total=len(items), desc="encode captions") as progress:
        for prompt_embeds, pooled in batches:  # written shard by shard as they come
            chunk = items[done:done + len(prompt_embeds)]
            for (key, _), embeds, pool in zip(chunk, prompt_embeds, pooled, strict=True):
                writer.add(key, {"prompt_embeds": embeds, "pooled": pool})
            done += len(chunk)
            progress.update(len(chunk))
    writer.flush()
    return writer.location


def _checked(params: Mapping[str, Any]):
    model, cfg = ModelParams.check(params), EncodeParams.check(params)
    max_sequence_length = CaptionParams.check(params).max_sequence_length
    return model, cfg, max_sequence_length, resolve_device(model), resolve_dtype(model)


def run_latents(params: Mapping[str, Any], filtered_dir: Path = FILTERED_DIR,
                out_dir: Path = LATENT_CACHE_DIR) -> dict[str, Any]:
    """Stage ``encode_latents``: every training image's VAE latents at each ``encode.resolution``.

    Reads data/filtered only, so a caption change never re-runs the VAE."""
    model, cfg, _, device, dtype = _checked(params)
    rows = _latent_rows(Path(filtered_dir))
    base = resolve_base_model(model.pretrained, model.revision)
    with atomic_dir(out_dir) as tmp:
        samples = _encode_latents(rows, Path(filtered_dir), cfg, base.folder, dtype, device, tmp)
        index = {
            # The commit, not model.revision: a branch that moved is another model (and so, through
            # this fingerprint, another training run hash).
            # encode.* as written in params.yaml, as the training run hash hashes its sections: a
            # cache keeps its key across this code's versions.
            "fingerprint": fingerprint(model.pretrained, base.commit, str(dtype),
                                       {k: v for k, v in params["encode"].items() if k not in NOT_CACHED},
                                       rows["id"].tolist()),
            "base_model": model.pretrained,
            "base_model_commit": base.commit,
            "resolution": cfg.resolution,
            "resolutions": cache_summary(samples),
            "samples": samples,
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
    for resolution, summary in index["resolutions"].items():
        print(f"encode: {resolution} px: {summary['latents']} latents ({summary['mib']:.1f} MiB) in "
              f"{len(summary['buckets'])} buckets {[tuple(b) for b in summary['buckets']]}")
    print(f"encode: {len(samples)} latents -> {out_dir} ({model.pretrained} at {base.commit})")
    return index


def run_text(params: Mapping[str, Any], captions_path: Path = CAPTIONS,
             out_dir: Path = TEXT_CACHE_DIR) -> dict[str, Any]:
    """Stage ``encode_text``: the text embeddings of every distinct training caption (and of "").

    Reads data/captions only, so a caption or template change never re-runs the VAE."""
    model, cfg, max_sequence_length, device, dtype = _checked(params)
    rows = _text_rows(Path(captions_path))
    base = resolve_base_model(model.pretrained, model.revision)
    with atomic_dir(out_dir) as tmp:
        text = _encode_texts(rows["caption"].tolist(), cfg, max_sequence_length, base.folder,
                             dtype, device, tmp)
        index = {
            "fingerprint": fingerprint(model.pretrained, base.commit, str(dtype),
                                       {k: params["encode"][k] for k in TEXT_KEYS}, max_sequence_length,
                                       rows[["id", "caption"]].values.tolist()),
            "base_model": model.pretrained,
            "base_model_commit": base.commit,
            "max_sequence_length": max_sequence_length,
            "captions": {row.id: caption_key(row.caption) for row in rows.itertuples()},
            "text": text,
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
    print(f"encode: {len(text) - 1} distinct captions of {len(rows)} training images -> {out_dir} "
          f"({model.pretrained} at {base.commit})")
    return index


def run(params: Mapping[str, Any], filtered_dir: Path = FILTERED_DIR, captions_path: Path = CAPTIONS,
        out_dir: Path = CACHE_DIR) -> dict[str, Any]:
    """Both halves into ``out_dir/latents`` and ``out_dir/text`` (``impressionist encode``, tests,
    benchmarks); the inputs are checked before either starts, and a failure leaves no ``out_dir``.
    Returns the joined index, as train reads it."""
    _checked(params)
    _latent_rows(Path(filtered_dir)), _text_rows(Path(captions_path))
    with atomic_dir(out_dir) as tmp:
        run_latents(params, filtered_dir, tmp / LATENT_CACHE_DIR.name)
        run_text(params, captions_path, tmp / TEXT_CACHE_DIR.name)
    return CacheReader(out_dir).index


def cache_summary(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per resolution: latents cached, their size and their buckets (the index and the log report it)."""
    summary: dict[str, dict[str, Any]] = {}
    for sample in samples:
        entry = summary.setdefault(str(sample["resolution"]), {"latents": 0, "mib": 0.0, "buckets": []})
        entry["latents"] += 1
        entry["mib"] += sample["bytes"] / 2**20
        if list(sample["bucket"]) not in entry["buckets"]:
            entry["buckets"].append(list(sample["bucket"]))
    for entry in summary.values():
        entry["buckets"].sort()
        entry["mib"] = round(entry["mib"], 3)
    return summary


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    half = parser.add_mutually_exclusive_group()
    half.add_argument("--latents", action="store_true", help="only the VAE latents (stage encode_latents)")
    half.add_argument("--text", action="store_true", help="only the text embeddings (stage encode_text)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.latents:
        run_latents(params)
    elif args.text:
        run_text(params)
    else:
        run(params)


if __name__ == "__main__":
    main()
