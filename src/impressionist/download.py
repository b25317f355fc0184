"""Stage `download`: stream WikiArt rows of one style into ``data/raw``.

``download.source`` is a Hub dataset id (``huggan/wikiart``), a local parquet file or folder of
parquet files (a mirror), ``synthetic``, or a folder of your own images with optional metadata and
kohya ``<stem>.txt`` captions; :mod:`impressionist.sources` describes each and reads them all
through the same streaming code, filtered by ``download.style`` and ``download.artists`` (pushed
down into the Parquet reads where it can be). A plain folder's sidecar caption is copied to
``data/raw/images/<id>.txt``, where the caption stage uses it instead of its template. The bytes
read from the source (counted as they are read, see :mod:`impressionist.source_reads`), the rows
scanned and kept and the time taken go to the summary line and to ``metrics/download.json``.

``run`` reads as its four steps: open the source (:func:`impressionist.sources.open_source`),
resume the progress of an interrupted run, keep the wanted rows (:func:`wanted_rows`, the
retry loop), finalise ``metadata.parquet``.

Writes ``data/raw/images/<id>.<ext>`` (the original bytes, never re-encoded),
``data/raw/metadata.parquet`` and ``data/raw/dropped.csv`` (see docs/layout.md). ``id`` is the first
16 hex digits of the image's sha256, so exact duplicates collapse to one file; ``dropped.csv`` names
every wanted row that left no file (an empty image, or the same bytes as a kept one) by its origin
in the source, with the reason and, for a copy, the id and origin of the image it repeats. (Rows of
other styles or artists are only counted: on WikiArt they are most of the dataset.) A Hub dataset is read at
``download.revision`` (a branch, tag or commit; "main" by default), resolved once to its commit,
which the ``revision`` column records: a rerun of the same params reads the same rows, and the
table says which version of the dataset it came from.

Resumable: images appear one by one (temp file + rename) and the kept rows plus the stream
position are recorded under ``data/raw/.partial/``. A rerun after an interruption continues from
there. ``metadata.parquet`` is written last, as the completion marker, and ``.partial`` is
removed then. (``atomic_dir`` would throw the partial work away, so it is not used here.) Only
reading the source is retried after a transient error; a failed write to ``data/raw`` (disk full,
permissions) stops at once with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .errors import UserError, atomic_write_bytes, atomic_write_text, first_line, stage_main
from .layout import DOWNLOAD_METRICS, IMAGES_SUBDIR, RAW_DIR, RESUME_ROWS, RESUME_STATE
from .params import DEFAULT_PARAMS, fingerprint, load_params
from .params.data import DownloadParams
from .source_reads import ReadMeter
from .sources import CAPTION_SUFFIX, SYNTHETIC, ScannedRow, SourceReader, SourceReadError, open_source
from .tables import METADATA_FILE, RAW_COLUMNS

PARTIAL_DIR = ".partial"
DROPPED_FILE = "dropped.csv"
DROPPED_COLUMNS = ["origin", "reason", "same_bytes_as", "same_bytes_as_origin"]
NO_BYTES, DUPLICATE = "no image bytes", "duplicate"
SAVE_EVERY_SKIPPED = 200  # rows skipped between saves of the stream position
# PIL format name -> file extension for the saved original bytes.
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


@dataclass
class DownloadSummary:
    kept: int
    per_artist: dict[str, int]
    skipped: dict[str, int]
    resumed_from: int               # rows already kept by an interrupted earlier run
    rows_scanned: int = 0           # rows this run's Python check saw (after any pushed-down filter)
    bytes_read: int = 0             # bytes this run read from the source
    seconds: float = 0.0            # this run's time reading the source and writing data/raw
    read_filter: str | None = None  # the filter pushed down into the Parquet reads, if any
    dropped_list: str = ""          # where the empty and duplicate files are named


def image_header(data: bytes) -> tuple[str, int, int]:
    """Extension, width and height from the image header only (no pixel decoding).

    Bytes PIL cannot identify, and images so large that PIL refuses them as a decompression bomb
    (over twice ``Image.MAX_IMAGE_PIXELS``, about 179 megapixels), are kept as ``.bin`` with size
    0x0; the filter stage rejects them with a recorded reason rather than the download silently
    dropping them or stopping.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            return EXTENSIONS.get(image.format, (image.format or "bin").lower()), image.width, image.height
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
        return "bin", 0, 0


class Progress:
    """The resumable state of an unfinished download, kept in ``data/raw/.partial/``.

    ``rows.jsonl`` gets one line per kept image, appended after the image file is in place;
    ``state.json`` holds the stream position (`IterableDataset.state_dict()`) and is rewritten
    atomically. A crash between the two only means a few rows are read again; kept ids are
    skipped, so nothing is counted twice.
    """

    def __init__(self, raw_dir: Path, config_key: str):
        self.raw_dir = raw_dir
        self.dir = raw_dir / PARTIAL_DIR
        self.rows_file = self.dir / RESUME_ROWS
        self.state_file = self.dir / RESUME_STATE
        self.dropped_file = self.dir / "dropped.jsonl"
        self.config_key = config_key
        self.rows: list[dict] = []
        # origin -> the dropped row's record; keyed by origin, so a row read again after a crash
        # between the record and the saved stream position is listed once
        self.dropped: dict[str, dict] = {}
        self.by_id: dict[str, dict] = {}  # the rows by id, once started
        self.stream_state: dict | None = None
        self.rows_read = 0  # source rows before stream_state's position (for each row's origin)

    def load(self) -> bool:
        """Pick up an earlier run with the same params; returns whether there was one."""
        if not self.state_file.is_file():
            shutil.rmtree(self.dir, ignore_errors=True)
            return False
        try:
            state = json.loads(self.state_file.read_text())
            if state.get("config") != self.config_key:
                raise ValueError("params changed")
            lines = self.rows_file.read_text().splitlines() if self.rows_file.is_file() else []
            rows = [json.loads(line) for line in lines if line.strip()]
            dropped_lines = self.dropped_file.read_text().splitlines() if self.dropped_file.is_file() else []
            dropped = [json.loads(line) for line in dropped_lines if line.strip()]
        except (ValueError, OSError) as err:
            print(f"download: discarding unfinished earlier download ({first_line(err)})", file=sys.stderr)
            shutil.rmtree(self.dir, ignore_errors=True)
            return False
        # Drop a row whose image vanished, and a torn last line (JSON error above covers garbage).
        self.rows = [row for row in rows if (self.dir.parent / row["file"]).is_file()]
        kept_ids = {row["id"] for row in self.rows}
        self.dropped = {record["origin"]: record for record in dropped
                        if record["reason"] != DUPLICATE or record["same_bytes_as"] in kept_ids}
        self.stream_state = state.get("stream")
        self.rows_read = int(state.get("rows_read", 0))
        return True

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Rewrite rows.jsonl so that it holds exactly the rows we trust.
        atomic_write_text(self.rows_file, "".join(json.dumps(row) + "\n" for row in self.rows))
        atomic_write_text(self.dropped_file, "".join(json.dumps(record) + "\n" for record in self.dropped.values()))
        self.by_id = {row["id"]: row for row in self.rows}
        self.save_state(self.stream_state, self.rows_read)

    def add(self, row: dict) -> None:
        with self.rows_file.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self.by_id[row["id"]] = row

    def drop(self, origin: str, reason: str, same_as: dict | None = None) -> None:
        """Record a wanted row that leaves no file (for ``dropped.csv``)."""
        record = {"origin": origin, "reason": reason, "same_bytes_as": same_as["id"] if same_as else "",
                  "same_bytes_as_origin": same_as["origin"] if same_as else ""}
        if origin not in self.dropped:
            with self.dropped_file.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        self.dropped[origin] = record

    def save_state(self, stream_state: dict | None, rows_read: int) -> None:
        self.stream_state, self.rows_read = stream_state, rows_read
        atomic_write_text(self.state_file, json.dumps({"config": self.config_key, "stream": stream_state,
                                                       "rows_read": rows_read}))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def _writing_to(raw_dir: Path):
    """A failed write to data/raw (disk full, permissions) is one line, not a network failure."""
    try:
        yield
    except OSError as err:
        raise UserError(f"cannot write to {raw_dir} ({first_line(err, 160)}); free disk space or fix its "
                        f"permissions, then rerun the stage: it resumes with the images kept so far") from err


def format_bytes(count: int) -> str:
    return tqdm.format_sizeof(count, "B", 1000)


class Tally:
    """What this run scanned and skipped, shown on a progress bar as it goes.

    With max_images the bar counts images towards it; otherwise the bytes of the source passed
    (the files before the one being read plus what was read of it), so its ETA holds with or
    without row groups skipped. Either way it shows the bytes actually read.
    """

    def __init__(self, progress: Progress, meter: ReadMeter, max_images: int):
        self.progress, self.meter = progress, meter
        self.rows_scanned = 0
        self.skipped: Counter[str] = Counter()
        self.by_images = bool(max_images)
        self.bar = tqdm(total=max_images if self.by_images else meter.total,
                        initial=len(progress.rows) if self.by_images else 0, unit="img" if self.by_images else "B",
                        unit_scale=not self.by_images, unit_divisor=1000, desc="download", disable=None)

    def show(self, at_end: bool = False) -> None:
        if self.by_images:
            passed = len(self.progress.rows)
        elif not self.meter.files:  # sizes unknown (a plain folder, or the Hub did not say): bytes read
            passed = self.meter.bytes_read
        else:
            passed = self.meter.total if at_end else self.meter.position()
        self.bar.update(passed - self.bar.n)
        self.bar.set_postfix_str(f"kept {len(self.progress.rows)}, scanned {self.rows_scanned}, "
                                 f"read {format_bytes(self.meter.bytes_read)}", refresh=False)

    def close(self) -> None:
        self.bar.close()


@dataclass
class RetryBudget:
    """Transient read errors in a row that are retried (``retries``), each after a wait doubling
    from ``backoff_s``; a kept row restores the budget."""

    retries: int
    backoff_s: float
    failures: int = 0

    def wait_after(self, err: BaseException) -> bool:
        """Count the failure and wait before a retry; False, at once, when the budget is spent."""
        self.failures += 1
        if self.failures > self.retries:
            return False
        wait = self.backoff_s * 2 ** (self.failures - 1)
        print(f"download: {type(err).__name__}: {first_line(err, 160)}; retrying in {wait:.0f}s "
              f"({self.failures}/{self.retries})", file=sys.stderr)
        time.sleep(wait)
        return True


def progress_key(reader: SourceReader) -> dict[str, Any]:
    """What decides which rows a download keeps, and so which saved progress it may resume."""
    params, source = reader.params, reader.source
    # max_images only says when to stop, so a resumed run may raise or lower it. The seed only
    # matters for the synthetic source, the revision for the Hub, where the commit it resolved to
    # counts: a moved branch is another dataset.
    key = {name: value for name, value in params.as_dict().items()
           if name != "max_images" and (name != "seed" or params.source == SYNTHETIC)
           and (name != "revision" or source.kind == "hub")}
    if source.kind == "hub":
        key["commit"] = source.revision
    # A saved stream position counts the rows the reader yields, so it only fits the same filter.
    if reader.read_filter:
        key["read_filter"] = repr(reader.read_filter)
    key["columns"] = RAW_COLUMNS  # a partial download written with other columns starts afresh
    folder = source.folder
    if folder is not None and folder.metadata_file is not None:  # edited labels: start afresh
        key["folder_metadata"] = hashlib.sha256(folder.metadata_file.read_bytes()).hexdigest()
    return key


def resume_progress(raw_dir: Path, reader: SourceReader) -> Progress:
    """The progress of an interrupted download of the same rows (or a fresh one), with data/raw
    ready for more images and its completion marker gone."""
    max_images = reader.params.max_images
    progress = Progress(raw_dir, fingerprint(progress_key(reader)))
    with _writing_to(raw_dir):
        (raw_dir / METADATA_FILE).unlink(missing_ok=True)  # the completion marker must not outlive a rerun
        resumed = progress.load()
        if max_images:
            progress.rows = progress.rows[:max_images]
        progress.start()
        (raw_dir / IMAGES_SUBDIR).mkdir(parents=True, exist_ok=True)
    if resumed:
        print(f"download: resuming an unfinished download with {len(progress.rows)} images already kept",
              file=sys.stderr)
    return progress


def wanted_rows(reader: SourceReader, progress: Progress, tally: Tally, retry: RetryBudget) -> Iterator[ScannedRow]:
    """The rows to keep, in stream order, from where ``progress`` stopped until the source ends or
    download.max_images are kept. Each is kept before the next is read; the stream position is
    saved after it.

    A transient error reading the source reopens the stream at the last saved position while the
    ``retry`` budget lasts; then one UserError. Errors writing data/raw are not retried.
    """
    while not reader.params.enough(len(progress.rows)):
        try:
            yield from rows_from_saved_position(reader, progress, tally, retry)
            return
        except SourceReadError as failed:
            err = failed.error
            if not retry.wait_after(err):
                raise UserError(f"reading download.source {reader.source.name} failed {retry.failures} times in "
                                f"a row ({type(err).__name__}: {first_line(err, 160)}); the {len(progress.rows)} "
                                f"images kept so far stay in {progress.raw_dir}, rerun the stage to resume") from err
            reader.reopen()


def rows_from_saved_position(reader: SourceReader, progress: Progress, tally: Tally,
                             retry: RetryBudget) -> Iterator[ScannedRow]:
    """One pass of :func:`wanted_rows` over the stream, from the saved position to its end. The
    position is saved after each wanted row, and now and then while skipping, so that a retry does
    not reread long stretches of other styles."""
    if progress.stream_state is not None:
        reader.stream.load_state_dict(progress.stream_state)
    position, unsaved = progress.rows_read, 0
    with contextlib.closing(reader.rows(position)) as rows:
        for row in rows:
            position = row.position
            tally.rows_scanned += 1
            if row.skip_reason:
                tally.skipped[row.skip_reason] += 1
                tally.show()
                unsaved += 1
                if unsaved >= SAVE_EVERY_SKIPPED:
                    progress.save_state(reader.stream.state_dict(), position)
                    unsaved = 0
                continue
            kept = len(progress.rows)
            yield row
            if len(progress.rows) > kept:
                retry.failures = 0  # progress: the retry budget is for errors in a row
            tally.show()
            progress.save_state(reader.stream.state_dict(), position)
            unsaved = 0
            if reader.params.enough(len(progress.rows)):
                return
    progress.save_state(reader.stream.state_dict(), position)
    tally.show(at_end=True)


def keep(row: ScannedRow, reader: SourceReader, progress: Progress, tally: Tally) -> None:
    """Write a wanted row's image and caption (unless an interrupted run already did) and record it."""
    origin = reader.locate(row.position - 1, row.example)
    if not row.data:
        tally.skipped[NO_BYTES] += 1
        progress.drop(origin, NO_BYTES)
        return
    digest = hashlib.sha256(row.data).hexdigest()
    image_id = digest[:16]
    if image_id in progress.by_id:
        original = progress.by_id[image_id]
        # The same row read again (a crash after keeping it, before its stream position was saved)
        # is no copy: nothing is dropped.
        if original["origin"] != origin:
            tally.skipped[DUPLICATE] += 1
            progress.drop(origin, DUPLICATE, original)
        return
    raw_dir = progress.raw_dir
    ext, width, height = image_header(row.data)
    relative = f"{IMAGES_SUBDIR}/{image_id}.{ext}"
    if not (raw_dir / relative).is_file():
        atomic_write_bytes(raw_dir / relative, row.data)
    # The images are renamed to <id>.<ext>, so a sidecar caption follows as <id>.txt, where the
    # caption stage looks for it. Written before the row is recorded, like the image.
    caption_file = f"{IMAGES_SUBDIR}/{image_id}{CAPTION_SUFFIX}" if row.caption is not None else None
    if row.caption is not None:
        atomic_write_bytes(raw_dir / caption_file, row.caption)
    progress.add({"id": image_id, "file": relative, **reader.labels(row.example), "width": width, "height": height,
                  "sha256": digest, "source": reader.source.name, "revision": reader.source.revision,
                  "origin": origin,
                  "caption_file": caption_file})  # not a metadata column; kept for the sweep in finalise


def finalise(raw_dir: Path, progress: Progress, params: DownloadParams) -> pd.DataFrame:
    """Write ``metadata.parquet``, last: it marks the download complete. Images left over from an
    earlier run with other params are removed first: they are not part of this download."""
    images_dir = raw_dir / IMAGES_SUBDIR
    if not progress.rows:
        progress.remove()
        with contextlib.suppress(OSError):  # leave no empty folders behind
            images_dir.rmdir()
            raw_dir.rmdir()
        raise UserError(f"no images of style {params.style}"
                        + (f" by {', '.join(params.artists)}" if params.artists else "")
                        + f" in download.source {params.source}; check download.style and download.artists")
    table = pd.DataFrame(progress.rows, columns=RAW_COLUMNS)
    with _writing_to(raw_dir):
        wanted = {raw_dir / name for name in table["file"]}
        wanted |= {raw_dir / row["caption_file"] for row in progress.rows if row.get("caption_file")}
        for stray in images_dir.iterdir():
            if stray not in wanted:
                stray.unlink()
        dropped = pd.DataFrame(list(progress.dropped.values()), columns=DROPPED_COLUMNS)
        atomic_write_text(raw_dir / DROPPED_FILE, dropped.to_csv(index=False))
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        atomic_write_bytes(raw_dir / METADATA_FILE, buffer.getvalue())
    progress.remove()
    return table


def print_summary(summary: DownloadSummary, reader: SourceReader) -> None:
    params, source = reader.params, reader.source
    artists_text = ", ".join(f"{name} {count}" for name, count in summary.per_artist.items())
    skipped_text = ", ".join(f"{count} {why}" for why, count in sorted(summary.skipped.items())) or "none"
    at = f" at {source.revision[:12]}" if source.revision else ""
    pushed = f", filter {summary.read_filter} pushed down to the Parquet reads" if summary.read_filter else ""
    if summary.skipped.get(NO_BYTES) or summary.skipped.get(DUPLICATE):
        skipped_text += f" (empty and duplicate files each named with its origin in {summary.dropped_list})"
    print(f"download: kept {summary.kept} images of {params.style} from {params.source}{at} "
          f"({artists_text}); skipped {skipped_text}; scanned {summary.rows_scanned} rows and read "
          f"{format_bytes(summary.bytes_read)} from the source in {summary.seconds:.1f} s{pushed}")


def run(params: Mapping[str, Any], raw_dir: Path | str = RAW_DIR, *, retries: int = 5, backoff_s: float = 2.0,
        pushdown: bool = True, metrics_path: Path | str | None = None) -> DownloadSummary:
    """Download the rows selected by the ``download`` params section into ``raw_dir``.

    Transient errors while reading the source restart the stream from the last saved position, up
    to ``retries`` times in a row with exponential backoff (``backoff_s``, doubled each time); then
    one UserError. Errors writing ``raw_dir`` are not retried. ``pushdown=False`` reads every row
    of a Hub or parquet source and filters in Python only (the benchmark's baseline). With
    ``metrics_path`` the transfer statistics are written there as JSON.
    """
    cfg = DownloadParams.check(params)
    raw_dir = Path(raw_dir)
    with contextlib.ExitStack() as cleanup:
        reader = open_source(cfg, cleanup, pushdown=pushdown)
        progress = resume_progress(raw_dir, reader)
        resumed_from = len(progress.rows)
        started = time.perf_counter()
        tally = cleanup.enter_context(contextlib.closing(Tally(progress, reader.meter, cfg.max_images)))
        rows = cleanup.enter_context(contextlib.closing(
            wanted_rows(reader, progress, tally, RetryBudget(retries, backoff_s))))
        with _writing_to(raw_dir):
            for row in rows:
                keep(row, reader, progress, tally)
    table = finalise(raw_dir, progress, cfg)

    summary = DownloadSummary(len(table), dict(Counter(table["artist"]).most_common()), dict(tally.skipped),
                              resumed_from, rows_scanned=tally.rows_scanned, bytes_read=reader.meter.bytes_read,
                              seconds=time.perf_counter() - started,
                              read_filter=repr(reader.read_filter) if reader.read_filter else None,
                              dropped_list=str(raw_dir / DROPPED_FILE))
    print_summary(summary, reader)
    if metrics_path is not None:
        write_metrics(summary, Path(metrics_path))
    return summary


def write_metrics(summary: DownloadSummary, path: Path) -> None:
    """What the download transferred, as ``metrics/download.json`` (this run's reads only)."""
    metrics = {
        "images": summary.kept,
        "resumed_from": summary.resumed_from,
        "rows_scanned": summary.rows_scanned,
        "rows_kept": summary.kept - summary.resumed_from,
        "bytes_read": summary.bytes_read,
        "seconds": round(summary.seconds, 3),
        "pushdown": summary.read_filter is not None,  # the filter itself is in the summary line
    }
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Download WikiArt images of one style into data/raw.")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    run(load_params(args.params), metrics_path=DOWNLOAD_METRICS)


if __name__ == "__main__":
    main()
