"""How fast the trainer's data loader serves micro-batches from an encode cache of full-size shapes.

    python benchmarks/bench_data_loader.py                       # 1024² latents, T5-XXL embeddings
    python benchmarks/bench_data_loader.py --resolution 512 --workers 0 2 4

Writes a cache shaped like FLUX.1-dev's (bf16 latents of 16 × side/8 × side/8, 512 × 4096 T5 and
768 CLIP embeddings) into a temporary folder with the encode stage's shard writer, then times the
trainer's own loader (``MicroBatches`` through ``micro_batch_loader``) at each worker count. The
files were just written, so they are read from the page cache: this is the loader's CPU cost, not
the disk's. Compare ms per micro-batch with the step time the GPU needs (``bench_train_step.py``;
the estimate profile's floor is about 250 ms per 1024² image on an H100).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

import torch
from results_file import command_line, publish

from impressionist.flux_math import TimestepSampling
from impressionist.latent_cache import EMPTY_CAPTION_KEY, INDEX, CacheReader, ShardWriter
from impressionist.layout import LATENT_CACHE_DIR, TEXT_CACHE_DIR
from impressionist.params import load_params
from impressionist.params.training import TrainParams
from impressionist.train import MicroBatches, micro_batch_loader


def write_cache(folder: Path, images: int, captions: int, side: int, shard_size: int) -> None:
    latent = side // 8
    generator = torch.Generator().manual_seed(0)
    latent_dir, text_dir = folder / LATENT_CACHE_DIR.name, folder / TEXT_CACHE_DIR.name
    latent_dir.mkdir(parents=True)
    text_dir.mkdir(parents=True)
    latents = ShardWriter(latent_dir, "latents", shard_size)
    samples = []
    for i in range(images):
        key = f"{i:016x}"
        latents.add(key, {"latent": torch.randn(16, latent, latent, generator=generator).bfloat16()})
        samples.append({"key": key, "id": key, "bucket": [side, side], "flip": False,
                        "shard": latents.location[key]})
    latents.flush()
    texts = ShardWriter(text_dir, "text", shard_size)
    for key in [EMPTY_CAPTION_KEY] + [f"caption{c}" for c in range(captions)]:
        texts.add(key, {"prompt_embeds": torch.randn(512, 4096, generator=generator).bfloat16(),
                        "pooled": torch.randn(768, generator=generator).bfloat16()})
    texts.flush()
    common = {"fingerprint": "benchmark", "base_model": "benchmark", "base_model_commit": "benchmark"}
    (latent_dir / INDEX).write_text(json.dumps({**common, "samples": samples}))
    (text_dir / INDEX).write_text(json.dumps({**common, "text": texts.location, "max_sequence_length": 512,
                                              "captions": {s["id"]: f"caption{i % captions}"
                                                           for i, s in enumerate(samples)}}))


def time_loader(cache: CacheReader, workers: int, batch_size: int, batches: int) -> float:
    """Seconds per micro-batch, after the first (workers starting, shards opening)."""
    recipe = TrainParams.check(load_params(Path(__file__).resolve().parents[1] / "params.yaml"))
    cfg = dataclasses.replace(recipe, batch_size=batch_size, seed=0, max_steps=batches + 1,
                              gradient_accumulation_steps=1, caption_dropout=0.05)
    loader = iter(micro_batch_loader(MicroBatches(cache, cfg, TimestepSampling(), 1, 0), 0, workers,
                                     pin=torch.cuda.is_available()))
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
    assert batch["latents"].shape[0] == batch_size
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--captions", type=int, default=64, help="distinct captions (template captions repeat)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--out", help="append the results as Markdown to this file")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_cache(Path(tmp), args.images, args.captions, args.resolution, shard_size=256)
        cache = CacheReader(tmp)
        for workers in args.workers:
            seconds = time_loader(cache, workers, args.batch_size, args.batches)
            rows.append(f"| {workers} | {seconds * 1e3:.1f} | {1 / seconds:.0f} |")
    lines = [f"### data loader — {torch.get_num_threads()} CPU threads, {dt.date.today()}",
             f"`{command_line(__file__)}` (torch {torch.__version__}; "
             f"{args.resolution}² bf16 latents, 512×4096 T5 embeddings, batch {args.batch_size}, "
             f"{args.images} images, {args.captions} distinct captions, {args.batches} micro-batches timed)", "",
             "| workers | ms per micro-batch | micro-batches/s |", "|---|---|---|", *rows]
    text = "\n".join(lines) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
