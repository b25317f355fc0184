"""Bytes read and seconds of the download stage with and without the style filter pushed down.

    python benchmarks/bench_download.py                       # 2000 synthetic rows, 5 repeats
    python benchmarks/bench_download.py --rows 4000 --repeats 3 --out benchmarks/RESULTS.md

Builds two local Parquet mirrors in the `huggan/wikiart` schema with
`impressionist.synthetic.write_wikiart_mirror` (the tests' helper: SYNTHETIC noise JPEGs, 16% of the
rows Impressionism, 100-row row groups as `datasets` writes image datasets): one with the rows
grouped by style, as WikiArt's style folders lay them out, and one shuffled. The real
`huggan/wikiart` is the shuffled case, and worse: rows mixed across styles and one ~520 MB row group per
shard, so pushdown saves nothing there (see the README for the one command that reads a shard's footer);
the style-grouped mirror shows only what pushdown can do on a layout that allows it. It then runs the
download stage on each, with and without pushdown, ``--repeats`` times, each into a fresh
``data/raw``, and reports per case the median and the min–max of:

- **bytes read**, counted by the stage's file-level meter (every ``read`` pyarrow makes on a shard,
  `impressionist.source_reads`) — what the summary line and ``metrics/download.json`` report;
- **kernel rchar**, the process's ``/proc/self/io`` read counter over the same run: the bytes the
  kernel handed to read calls, an independent check on the meter (it also sees the schema reads made
  while opening the stream, which the meter does not, and any other file the process reads);
- **seconds**, the stage's wall time (reading the mirror and writing the kept images).

The mirrors sit in the page cache, so the seconds show the CPU side (parquet decoding, the
Python check); on the Hub the bytes are what a slow connection pays for.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from results_file import command_line, publish

PROC_IO = Path("/proc/self/io")


def kernel_read_chars() -> int | None:
    """``rchar`` of /proc/self/io (Linux): bytes the kernel returned to this process's reads."""
    if not PROC_IO.is_file():
        return None
    for line in PROC_IO.read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return None


def measure(mirror: Path, pushdown: bool, raw: Path) -> dict:
    from impressionist import download

    cfg = {"source": str(mirror), "style": "Impressionism", "artists": [], "max_images": 0}
    rchar_before = kernel_read_chars()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the stage's summary line, once per run
        summary = download.run({"download": cfg}, raw, pushdown=pushdown)
    seconds = time.perf_counter() - start
    rchar_after = kernel_read_chars()
    return {"bytes": summary.bytes_read, "rchar": None if rchar_before is None else rchar_after - rchar_before,
            "seconds": seconds, "kept": summary.kept, "scanned": summary.rows_scanned}


def spread(values: list[float], scale: float, digits: int) -> str:
    """Median and min–max of ``values`` / ``scale``."""
    if any(v is None for v in values):
        return "n/a"
    scaled = [v / scale for v in values]
    return f"{statistics.median(scaled):.{digits}f} ({min(scaled):.{digits}f}–{max(scaled):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows per mirror (default 2000)")
    parser.add_argument("--share", type=float, default=0.16, help="share of Impressionism rows (default 0.16)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows-per-group", type=int, default=100, help="rows per parquet row group (default 100)")
    parser.add_argument("--image-side", type=int, default=128, help="side of the noise JPEGs in px (default 128)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="append the results as Markdown to this file")
    args = parser.parse_args()

    from impressionist.synthetic import write_wikiart_mirror

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        root = Path(tmp)
        for order in ("by_style", "shuffled"):
            mirror = root / order
            paths = write_wikiart_mirror(mirror, args.rows, order, wanted_share=args.share, shards=args.shards,
                                         rows_per_group=args.rows_per_group, image_side=args.image_side)
            mirror_bytes = sum(p.stat().st_size for p in paths)
            runs = {True: [], False: []}
            for repeat in range(args.repeats):
                for pushdown in (False, True):  # alternate, so drift affects both alike
                    runs[pushdown].append(measure(mirror, pushdown, root / f"raw-{order}-{pushdown}-{repeat}"))
            kept = {run["kept"] for case in runs.values() for run in case}
            assert len(kept) == 1, f"pushdown changed the kept rows: {kept}"
            full = statistics.median(run["bytes"] for run in runs[False])
            for pushdown in (False, True):
                case = runs[pushdown]
                bytes_read = [run["bytes"] for run in case]
                rows.append(f"| {order} | {'yes' if pushdown else 'no'} | {mirror_bytes / 1e6:.1f} | "
                            f"{spread(bytes_read, 1e6, 2)} | {statistics.median(bytes_read) / full:.0%} | "
                            f"{spread([run['rchar'] for run in case], 1e6, 2)} | "
                            f"{case[0]['scanned']} / {case[0]['kept']} | "
                            f"{spread([run['seconds'] for run in case], 1, 2)} |")
    lines = [f"### download pushdown — {dt.date.today()}",
             f"`{command_line(__file__)}` ({args.rows} SYNTHETIC rows per mirror, {args.share:.0%} Impressionism, "
             f"{args.shards} shards of {args.rows_per_group}-row row groups, {args.image_side}² noise JPEGs; "
             f"{platform.machine()}, {os.cpu_count()} CPUs; median (min–max) of n = {args.repeats} runs each; "
             "mirrors in the page cache)", "",
             "| mirror | pushdown | mirror MB | bytes read MB | of no pushdown | kernel rchar MB | "
             "rows scanned / kept | seconds |",
             "|---|---|---|---|---|---|---|---|", *rows]
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
