"""Encode-stage throughput and peak memory as the number of images grows.

    python benchmarks/bench_encode.py                                # 1024² JPEGs, 32 and 128 images
    python benchmarks/bench_encode.py --images 64 256 --workers 0 2 4

Writes JPEG paintings-sized noise images (a SYNTHETIC stand-in: decoding cost, not content, matters
here) and their metadata in the filter/caption stages' formats, then runs the encode stage with the
builtin tiny Flux pipeline in a fresh process per case and reports images/s and that process's peak
resident memory. Bounded memory shows as a peak that stays flat while the image count grows; the
worker count shows how much image decoding the VAE was waiting for. The tiny VAE is cheap, so on a GPU
with FLUX.1-dev's VAE decoding matters even more than here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from results_file import command_line, publish


def write_dataset(root: Path, images: int, side: int) -> tuple[Path, Path]:
    filtered, rng = root / "filtered", np.random.default_rng(0)
    (filtered / "images").mkdir(parents=True)
    rows = []
    for i in range(images):
        name = f"images/{i:016x}.jpg"
        # smooth noise: JPEG-compressible like a painting, so decoding costs what a real file costs
        small = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC).save(filtered / name, quality=90)
        rows.append({"id": f"{i:016x}", "file": name, "height": side, "width": side, "split": "train"})
    pd.DataFrame(rows).to_parquet(filtered / "metadata.parquet")
    captions = root / "captions.parquet"
    pd.DataFrame({"id": [r["id"] for r in rows], "split": "train",
                  "caption": [f"impr3ssionism, a painting number {i % 8}" for i in range(images)]}).to_parquet(captions)
    return filtered, captions


def child(filtered: str, captions: str, out: str, side: int, workers: int) -> None:
    from impressionist import encode
    from impressionist.models import resolve_pretrained

    params = {"model": {"pretrained": "builtin:tiny-flux", "dtype": "float32", "device": "cpu"},
              "caption": {"trigger": "impr3ssionism", "template": "{trigger}", "max_sequence_length": 128},
              "encode": {"resolution": side, "bucket_min_aspect": 0.5, "bucket_max_aspect": 2.0, "flip": False,
                         "batch_size": 4, "shard_size": 16, "dataloader_workers": workers}}
    resolve_pretrained("builtin:tiny-flux", None)  # build the tiny model outside the timing
    start = time.perf_counter()
    index = encode.run(params, Path(filtered), Path(captions), Path(out))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "latents": len(index["samples"]),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--images", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--out", help="append the results as Markdown to this file")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        filtered, captions, out, side, workers = args.child
        return child(filtered, captions, out, int(side), int(workers))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for images in args.images:
            filtered, captions = write_dataset(Path(tmp) / f"n{images}", images, args.resolution)
            for workers in args.workers:
                out = Path(tmp) / f"cache-{images}-{workers}"
                result = subprocess.run([sys.executable, __file__, "--child", str(filtered), str(captions), str(out),
                                         str(args.resolution), str(workers)], capture_output=True, text=True)
                if result.returncode:
                    sys.exit(f"error: encode failed: {result.stderr.strip().splitlines()[-1]}")
                figures = json.loads(result.stdout.strip().splitlines()[-1])
                assert figures["latents"] == images
                rows.append(f"| {images} | {workers} | {images / figures['seconds']:.1f} | "
                            f"{figures['peak_rss_mib']:.0f} |")
    lines = [f"### encode — {dt.date.today()}",
             f"`{command_line(__file__)}` ({args.resolution}² JPEGs, "
             "builtin tiny Flux VAE and text encoders on the CPU, batch 4, 16 latents a shard; peak RSS of "
             "the encoding process, its workers not included)", "",
             "| images | workers | images/s | peak RSS MiB |", "|---|---|---|---|", *rows]
    text = "\n".join(lines) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
