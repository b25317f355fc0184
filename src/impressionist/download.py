"""Stage `download`: stream WikiArt rows of one style into ``data/raw``.

Sources (``download.source``):

- a Hub dataset id (``huggan/wikiart``): streamed shard by shard, nothing stored but the kept
  images; with the style filter pushed down, row groups that hold no wanted row are not fetched
  (how much of the 37 GB that spares depends on how the shards are ordered);
- a local parquet file, or a folder of parquet files, with the same schema (a mirror);
- ``synthetic``: a SYNTHETIC parquet (see :mod:`impressionist.synthetic`) written to a temporary
  folder and then read through the very same parquet code path as a local mirror;
- a folder of your own images (jpg, jpeg, png, webp, bmp, tif; searched recursively, hidden
  folders skipped) that holds no parquet files: streamed with the ``imagefolder`` builder of
  `datasets`. An optional ``metadata.csv``, ``metadata.jsonl`` or ``metadata.json`` (a list of
  objects) at the top of the folder labels the images, keyed by ``file_name`` (the path relative to
  the folder, as in Hugging Face's ImageFolder), with optional ``artist``, ``genre`` and ``style``
  columns of plain text. An image it does not label counts as "Unknown Artist", "Unknown Genre" and
  ``download.style``: a plain folder is assumed to be in the requested style unless its metadata
  says otherwise. A kohya caption ``<stem>.txt`` next to an image is copied to
  ``data/raw/images/<id>.txt``, where the caption stage uses it instead of its template.

Every source is then read by the same code: a streaming `datasets.IterableDataset` with the
columns image, artist, genre and style, filtered by ``download.style`` and ``download.artists``.
For the Hub and parquet sources that filter is also pushed down into the Parquet reads (the
builder's ``filters=`` on the ClassLabel ids, and ``columns=`` the four columns), so row groups
whose statistics rule the style out are never fetched; the check in Python stays as the safety net
and decides what is kept, so the kept rows are the same either way. The bytes read from the source
(counted as they are read, see :mod:`impressionist.source_reads`), the rows scanned and kept and the
time taken go to the summary line and to ``metrics/download.json``.

Writes ``data/raw/images/<id>.<ext>`` (the original bytes, never re-encoded) and
``data/raw/metadata.parquet`` (see docs/layout.md). ``id`` is the first 16 hex digits of the
image's sha256, so exact duplicates collapse to one file. A Hub dataset is read at
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
import glob
import hashlib
import io
import json
import posixpath
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .errors import DEMO_HINT, UserError, atomic_write_bytes, atomic_write_text, first_line, stage_main
from .hub import hub_offline
from .layout import DOWNLOAD_METRICS, RAW_DIR
from .params import fingerprint, load_params, require, require_int, require_positive, section
from .source_reads import ReadMeter, local_file_sizes, metering_parquet_reads
from .tables import METADATA_FILE, RAW_COLUMNS
from .wikiart import HUB_DATASET, UNKNOWN_ARTIST, UNKNOWN_GENRE

SYNTHETIC = "synthetic"
PARTIAL_DIR = ".partial"
REQUIRED_COLUMNS = ("image", "artist", "genre", "style")  # of the source (huggan/wikiart's schema)
DEFAULT_REVISION = "main"
METRICS_PATH = DOWNLOAD_METRICS
PUSHDOWN_KINDS = ("hub", "parquet")  # sources read by datasets' Parquet builder, which takes filters=

# A plain folder of images (the "imagefolder" source).
FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
FOLDER_METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.json")
FOLDER_LABEL_COLUMNS = ("artist", "genre", "style")
FOLDER_METADATA_EXPECTED = ("expected a file_name column (each image's path relative to the folder) and optional "
                            "artist, genre and style columns of text")
CAPTION_SUFFIX = ".txt"  # kohya sidecar caption, <stem>.txt next to the image


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors a streamed read raises when the network or a file system hiccups; worth a retry.

    huggingface_hub's HTTP errors are OSErrors, but the transport errors of its HTTP client
    (httpx, or httpx2 in recent releases) are not, so they are added when installed.
    """
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(__import__(module_name).TransportError)
    return tuple(errors)


TRANSIENT_ERRORS = _transient_errors()
HUB_CHECK_TIMEOUT_S = 15
SAVE_EVERY_SKIPPED = 200  # rows skipped between saves of the stream position
# How many rows of the synthetic source to paint when download.max_images is 0 ("all").
SYNTHETIC_DEFAULT_ROWS = 120
# PIL format name -> file extension for the saved original bytes.
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


@dataclass
class FolderIndex:
    """The images of a plain folder source and the labels its metadata file gives them."""

    root: Path
    images: list[str]                       # absolute paths, sorted: the order of the stream
    labels: dict[str, dict[str, str]]       # absolute image path -> the label columns its metadata row sets
    metadata_file: Path | None
    default_style: str

    def default(self, column: str) -> str:
        return {"artist": UNKNOWN_ARTIST, "genre": UNKNOWN_GENRE, "style": self.default_style}[column]

    def label(self, image_path: str, column: str) -> str:
        return self.labels.get(image_path, {}).get(column) or self.default(column)

    def names(self, column: str) -> list[str]:
        """Every name that ``column`` takes in this folder (what download.style/artists may ask for)."""
        return sorted({self.label(path, column) for path in self.images})

    def names_note(self, column: str) -> str:
        if self.metadata_file is None:
            return (f" ({self.root} has no {', '.join(FOLDER_METADATA_FILES)}, so every image counts as "
                    f"{self.default(column)})")
        return f" (from {self.metadata_file}; an image it gives no {column} counts as {self.default(column)})"

    def add_labels(self, example: dict) -> dict:
        """`IterableDataset.map` function: the artist, genre and style columns of one image."""
        path = example["image"]["path"]
        return {column: self.label(path, column) for column in FOLDER_LABEL_COLUMNS}

    def caption(self, image_path: str) -> bytes | None:
        """The bytes of the kohya sidecar caption next to the image, if there is one."""
        sidecar = Path(image_path).with_suffix(CAPTION_SUFFIX)
        return sidecar.read_bytes() if sidecar.is_file() else None


@dataclass
class Source:
    """Where rows come from: ``kind`` is "hub", "parquet", "imagefolder" or "synthetic"."""

    kind: str
    name: str                       # as written in params (recorded in metadata's `source` column)
    data_files: list[str] = field(default_factory=list)
    folder: FolderIndex | None = None  # only for "imagefolder"
    revision: str = ""              # only for "hub": the dataset commit read (metadata's `revision`)
    # column -> the class names the stage keeps; pushed down into the Parquet reads of the Hub and
    # parquet sources (empty: read every row and let the Python check do all the filtering)
    wanted: dict[str, list[str]] = field(default_factory=dict)


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


def find_folder_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted; hidden files and folders are skipped."""
    return sorted(p for p in root.rglob("*")
                  if p.suffix.lower() in FOLDER_IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _metadata_records(path: Path) -> list[dict]:
    """The rows of a folder's metadata file as dicts; raises ValueError (or OSError) when unreadable."""
    if path.suffix == ".csv":
        # All text: an artist called "NA" or a file called "1.jpg" must stay as written.
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        return table.to_dict("records")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as err:
                    raise ValueError(f"line {number}: {err}") from err
    else:
        records = json.loads(text)
        if not isinstance(records, list):
            raise ValueError("a .json metadata file must hold a list of objects, one per image")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise ValueError(f"row {number} is {type(record).__name__}, not an object")
    return records


def read_folder_metadata(root: Path, images: list[Path]) -> tuple[Path | None, dict[str, dict[str, str]]]:
    """The folder's metadata file (or None) and the labels it gives, keyed by absolute image path."""
    found = [root / name for name in FOLDER_METADATA_FILES if (root / name).is_file()]
    nested = sorted(p for p in root.rglob("metadata.*") if p.name in FOLDER_METADATA_FILES and p.parent != root
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if nested:
        raise UserError(f"download.source folder {root} has a metadata file below its top level ({nested[0]}); "
                        f"only {root}/metadata.csv, .jsonl or .json is read: move its rows there, with "
                        "file_name relative to the folder")
    if len(found) > 1:
        raise UserError(f"download.source folder {root} holds {' and '.join(p.name for p in found)}; keep one "
                        "metadata file")
    if not found:
        return None, {}
    path = found[0]
    try:
        records = _metadata_records(path)
    except (ValueError, OSError, UnicodeDecodeError) as err:  # pandas' parser errors are ValueErrors
        raise UserError(f"cannot read the metadata file {path} ({first_line(err, 160)}); "
                        f"{FOLDER_METADATA_EXPECTED}") from err
    if not records:
        raise UserError(f"the metadata file {path} has no rows; {FOLDER_METADATA_EXPECTED}, or delete it")

    if not any("file_name" in record for record in records):
        raise UserError(f"the metadata file {path} has no file_name column; {FOLDER_METADATA_EXPECTED}")
    by_relative = {p.relative_to(root).as_posix(): str(p) for p in images}
    labels: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for number, record in enumerate(records, 1):
        file_name = record.get("file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            raise UserError(f"the metadata file {path} has no file_name in row {number}; {FOLDER_METADATA_EXPECTED}")
        relative = posixpath.normpath(file_name.strip().replace("\\", "/"))
        if relative not in by_relative:
            unknown.append(file_name)
            continue
        row = {}
        for column in FOLDER_LABEL_COLUMNS:
            value = record.get(column)
            if value is None or (isinstance(value, float) and value != value) or value == "":
                continue  # an empty cell: the default applies
            if not isinstance(value, str):
                raise UserError(f"the metadata file {path} has {column}={value!r} in row {number}; "
                                f"{FOLDER_METADATA_EXPECTED}")
            if value.strip():
                row[column] = value.strip()
        if by_relative[relative] in labels:
            raise UserError(f"the metadata file {path} lists {file_name} twice; keep one row per image")
        labels[by_relative[relative]] = row
    if unknown:
        raise UserError(f"the metadata file {path} lists {len(unknown)} file_name(s) that are not images in "
                        f"{root} ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); give each "
                        f"image's path relative to the folder, or remove those rows")
    return path, labels


def index_image_folder(root: Path, default_style: str) -> FolderIndex | None:
    """The images of a plain folder and their labels; None if the folder holds no images."""
    root = root.resolve()
    images = find_folder_images(root)
    if not images:
        return None
    metadata_file, labels = read_folder_metadata(root, images)
    unlisted = len(images) - len(labels)
    if metadata_file is not None and unlisted:
        print(f"download: {unlisted} of the {len(images)} images in {root} have no row in {metadata_file.name}; "
              f"they count as {UNKNOWN_ARTIST}, {UNKNOWN_GENRE}, {default_style}", file=sys.stderr)
    return FolderIndex(root, [str(p) for p in images], labels, metadata_file, default_style)


def resolve_source(source: str, default_style: str = "") -> Source:
    """Decide what ``download.source`` names, raising one clear line for a missing local source.

    ``default_style`` is the style of the images of a plain folder whose metadata gives none.
    """
    if not isinstance(source, str) or not source.strip():
        raise UserError("params.yaml: download.source is empty; set it to huggan/wikiart, a local parquet "
                        "file or folder, a folder of images, or 'synthetic'")
    if source == SYNTHETIC:
        return Source("synthetic", source)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".parquet":
                raise UserError(f"download.source {source} is not a .parquet file; point it at a parquet file "
                                "or a folder of parquet files with the huggan/wikiart schema, or at a folder "
                                "of images")
            files = [path]
        else:
            files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
            if not files:
                folder = index_image_folder(path, default_style)
                if folder is None:
                    raise UserError(f"download.source folder {source} holds no .parquet files and no images "
                                    f"({', '.join(s[1:] for s in FOLDER_IMAGE_SUFFIXES)}); point it at a mirror "
                                    "of huggan/wikiart's parquet shards or at a folder of your own images")
                return Source("imagefolder", source, folder.images, folder)
        return Source("parquet", source, [str(f) for f in files])
    looks_like_path = source.startswith((".", "/", "~")) or source.endswith(".parquet") or source.count("/") != 1
    if looks_like_path or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise UserError(f"download.source {source} does not exist; give an existing parquet file or folder, "
                        f"a Hub dataset id such as {HUB_DATASET}, or 'synthetic'")
    return Source("hub", source)


def check_hub_reachable(dataset_id: str, revision: str = DEFAULT_REVISION) -> str | None:
    """Fail fast, with one line saying what to do, when the Hub dataset cannot be reached.

    Returns the commit that ``revision`` (a branch, tag or commit) names now, when the Hub says.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    fix = (f"check the network and your Hugging Face token (`hf auth login`), or set download.source to a "
           f"local parquet mirror of {dataset_id}; {DEMO_HINT}")
    if hub_offline():
        raise UserError(f"download.source is the Hub dataset {dataset_id} but HF_HUB_OFFLINE is set; unset it "
                        f"and {fix}")
    try:
        info = HfApi().dataset_info(dataset_id, revision=revision, timeout=HUB_CHECK_TIMEOUT_S)
    except RevisionNotFoundError as err:
        raise UserError(f"the Hub dataset {dataset_id} has no revision {revision!r}; set download.revision to "
                        f"one of its branches, tags or commits (default: {DEFAULT_REVISION})") from err
    except GatedRepoError as err:
        raise UserError(f"the Hub dataset {dataset_id} is gated: accept its terms on huggingface.co and log in "
                        f"(`hf auth login`), or {fix.split(', or ', 1)[1]}") from err
    except RepositoryNotFoundError as err:
        local_note = f"no local path named {dataset_id} exists either; " if "/" in dataset_id else ""
        raise UserError(f"the Hub has no dataset {dataset_id} (or it is private); {local_note}{fix}") from err
    except Exception as err:  # network errors come in many types (requests, httpx, OSError)
        raise UserError(f"cannot reach the Hugging Face Hub for {dataset_id} ({first_line(err, 160)}); "
                        f"{fix}") from err
    return getattr(info, "sha", None)


def hub_parquet_files(dataset_id: str, revision: str) -> list[tuple[str, int]]:
    """The Hub dataset's parquet files and their sizes, in name order, for the progress bar's ETA.

    Empty when the Hub does not say: the download then runs without an ETA.
    """
    from huggingface_hub import HfApi

    if hub_offline():
        return []
    try:
        info = HfApi().dataset_info(dataset_id, revision=revision, files_metadata=True, timeout=HUB_CHECK_TIMEOUT_S)
    except Exception:  # the reachability check already passed; sizes are a nicety
        return []
    return sorted((sibling.rfilename, sibling.size) for sibling in (getattr(info, "siblings", None) or [])
                  if sibling.rfilename.endswith(".parquet") and sibling.size)


def pushdown_filter(features, wanted: dict[str, list[str]]) -> list[tuple] | None:
    """The Parquet builder's ``filters=`` for the wanted class names, on their ClassLabel ids.

    Only ClassLabel columns are pushed down (a mirror with plain-text labels is filtered in Python
    alone), and only names the labels know: unknown names are reported by validate_names.
    """
    from datasets import ClassLabel

    conditions = []
    for column, names in wanted.items():
        feature = features[column] if features is not None and column in features else None
        if not names or not isinstance(feature, ClassLabel):
            continue
        ids = sorted({feature.str2int(name) for name in names if name in feature.names})
        if ids:
            conditions.append((column, "==", ids[0]) if len(ids) == 1 else (column, "in", ids))
    return conditions or None


def _load(source: Source, **read_options):
    """``datasets.load_dataset`` of the source, streaming; ``read_options`` go to the Parquet builder."""
    import datasets

    try:
        if source.kind == "hub":
            stream = datasets.load_dataset(source.name, split="train", streaming=True,
                                           revision=source.revision or DEFAULT_REVISION, **read_options)
        elif source.kind == "imagefolder":
            # The images only: the folder's metadata was read by resolve_source, and labels added
            # below, because ImageFolder would drop the images its metadata file does not list.
            # data_files rather than data_dir: no split inference from folder names like "test".
            # Escaped, because data_files are glob patterns: "view [1890].jpg" would match nothing.
            stream = datasets.load_dataset("imagefolder", data_files=[glob.escape(f) for f in source.data_files],
                                           split="train", streaming=True, drop_labels=True, drop_metadata=True)
        else:
            stream = datasets.load_dataset("parquet", data_files=source.data_files, split="train", streaming=True,
                                           **read_options)
    except TRANSIENT_ERRORS:
        raise
    except Exception as err:
        raise UserError(f"cannot read download.source {source.name}: {first_line(err, 200)}") from err
    return stream


def open_stream(source: Source):
    """A streaming `datasets.IterableDataset` of the source, with images left as undecoded bytes.

    For the Hub and parquet sources, ``source.wanted`` is pushed down into the Parquet reads.
    """
    import datasets

    stream = _load(source)
    if source.folder is not None:
        label = datasets.Value("string")
        stream = stream.cast_column("image", datasets.Image(decode=False)).map(
            source.folder.add_labels,
            features=datasets.Features({"image": datasets.Image(decode=False), "artist": label, "genre": label,
                                        "style": label}))
    features = stream.features
    missing = [c for c in REQUIRED_COLUMNS if features is None or c not in features]
    if missing:
        raise UserError(f"download.source {source.name} lacks column(s) {', '.join(missing)}; it must have the "
                        f"huggan/wikiart schema (image, artist, genre, style)")
    read_filter = pushdown_filter(features, source.wanted) if source.kind in PUSHDOWN_KINDS else None
    if read_filter:
        # Reopen with the filter and the columns handed to the Parquet reader: row groups whose
        # statistics rule the wanted ids out are skipped unread. Opening only read the schema.
        stream = _load(source, filters=read_filter, columns=list(REQUIRED_COLUMNS))
    # Keep the original bytes: no decode here (filter decodes once), no re-encoding, exact sha256.
    return stream.cast_column("image", datasets.Image(decode=False))


def label_decoder(features, column: str) -> tuple[Callable[[Any], str], list[str] | None]:
    """How to turn a row's ``column`` value into a class name, and the valid names if known."""
    from datasets import ClassLabel, Value

    feature = features[column]
    if isinstance(feature, ClassLabel):
        return feature.int2str, list(feature.names)
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return str, None
    raise UserError(f"column {column!r} of download.source is {feature}, expected a ClassLabel as in huggan/wikiart")


def validate_names(wanted: list[str], valid: list[str] | None, what: str, param: str, note: str = "") -> None:
    unknown = [name for name in wanted if valid is not None and name not in valid]
    if unknown:
        raise UserError(f"params.yaml: {param} has unknown {what} {', '.join(map(repr, unknown))}; valid "
                        f"{what} names: {', '.join(valid)}{note}")


def describe_filter(read_filter: list[tuple] | None) -> str:
    """``style == 12 and artist in [3, 7]``: a pushed-down filter as its origin strings name it."""
    return " and ".join(f"{column} {op} {value}" for column, op, value in read_filter or [])


def origin_locator(source: Source, read_filter: list[tuple] | None = None) -> Callable[[int, dict], str]:
    """How to name where a row was in the source, from its position in the stream (0-based, in
    source order) and the row: a folder image's path relative to the folder; a parquet row's file
    (relative to the source) and row in it; a Hub row's row in the train split (at the commit the
    ``revision`` column records: ``load_dataset(name, split="train", revision=...)[n]``).

    With a filter pushed down into the Parquet reads the rows of other styles never reach the stream,
    so positions count the rows that pass it: the origin then says so ("row n of the rows where
    style == 12", i.e. ``pyarrow.parquet.read_table(file, filters=...)`` row n, or the Hub split
    loaded with the same ``filters=``). The per-file counts come from reading only the filter's
    columns of each local file."""
    where = f" of the rows where {describe_filter(read_filter)}" if read_filter else ""
    if source.folder is not None:
        root = source.folder.root
        return lambda position, example: Path(example["image"]["path"]).relative_to(root).as_posix()
    if source.kind == "hub":
        return lambda position, example: f"train row {position}{where}"
    import bisect

    import pyarrow.parquet as pq

    top = Path(source.name).expanduser() if source.name != SYNTHETIC else None
    names = [Path(f).relative_to(top).as_posix() if top is not None and top.is_dir() else Path(f).name
             for f in source.data_files]
    starts = [0]
    for data_file in source.data_files:
        if read_filter:  # only the filtered columns are read: a small fraction of the file
            rows = pq.read_table(data_file, columns=sorted({c for c, _, _ in read_filter}), filters=read_filter).num_rows
        else:  # row counts from the footers: no data is read
            rows = pq.ParquetFile(data_file).metadata.num_rows
        starts.append(starts[-1] + rows)

    def locate(position: int, example: dict) -> str:
        shard = bisect.bisect_right(starts, position) - 1
        return f"{names[shard]} row {position - starts[shard]}{where}"

    return locate


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


def image_bytes(cell: Any) -> bytes:
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return bytes(cell["bytes"])
        if cell.get("path") and Path(cell["path"]).is_file():
            return Path(cell["path"]).read_bytes()
    return b""


class Progress:
    """The resumable state of an unfinished download, kept in ``data/raw/.partial/``.

    ``rows.jsonl`` gets one line per kept image, appended after the image file is in place;
    ``state.json`` holds the stream position (`IterableDataset.state_dict()`) and is rewritten
    atomically. A crash between the two only means a few rows are read again; kept ids are
    skipped, so nothing is counted twice.
    """

    def __init__(self, raw_dir: Path, config_key: str):
        self.dir = raw_dir / PARTIAL_DIR
        self.rows_file = self.dir / "rows.jsonl"
        self.state_file = self.dir / "state.json"
        self.config_key = config_key
        self.rows: list[dict] = []
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
        except (ValueError, OSError) as err:
            print(f"download: discarding unfinished earlier download ({first_line(err)})", file=sys.stderr)
            shutil.rmtree(self.dir, ignore_errors=True)
            return False
        # Drop a row whose image vanished, and a torn last line (JSON error above covers garbage).
        self.rows = [row for row in rows if (self.dir.parent / row["file"]).is_file()]
        self.stream_state = state.get("stream")
        self.rows_read = int(state.get("rows_read", 0))
        return True

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Rewrite rows.jsonl so that it holds exactly the rows we trust.
        atomic_write_text(self.rows_file, "".join(json.dumps(row) + "\n" for row in self.rows))
        self.save_state(self.stream_state, self.rows_read)

    def add(self, row: dict) -> None:
        with self.rows_file.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        self.rows.append(row)

    def save_state(self, stream_state: dict | None, rows_read: int) -> None:
        self.stream_state, self.rows_read = stream_state, rows_read
        atomic_write_text(self.state_file, json.dumps({"config": self.config_key, "stream": stream_state,
                                                       "rows_read": rows_read}))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _read_config(cfg: dict) -> dict:
    source = require(cfg, "source", "download")
    style = require(cfg, "style", "download")
    if not isinstance(style, str) or not style:
        raise UserError("params.yaml: download.style must be a style name such as Impressionism")
    artists = cfg.get("artists") or []
    if isinstance(artists, str):
        artists = [artists]
    if not isinstance(artists, list) or not all(isinstance(a, str) for a in artists):
        raise UserError("params.yaml: download.artists must be a list of artist names, e.g. [claude-monet]")
    max_images = require_positive(cfg.get("max_images", 0), "download.max_images", allow_zero=True)
    if int(max_images) != max_images:
        raise UserError(f"params.yaml: download.max_images={max_images!r} must be a whole number")
    seed = require_int(cfg.get("seed", 0), "download.seed")
    revision = cfg.get("revision", DEFAULT_REVISION)
    if not isinstance(revision, str) or not revision.strip():
        raise UserError(f"params.yaml: download.revision={revision!r} must be a branch, tag or commit of the Hub "
                        f"dataset (default: {DEFAULT_REVISION})")
    return {"source": str(source), "style": style, "artists": list(artists), "max_images": int(max_images),
            "seed": seed, "revision": revision.strip()}


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


def run(cfg: dict, raw_dir: Path | str = RAW_DIR, *, retries: int = 5, backoff_s: float = 2.0,
        pushdown: bool = True, metrics_path: Path | str | None = None) -> DownloadSummary:
    """Download the rows selected by the ``download`` params section into ``raw_dir``.

    Transient errors while reading the source restart the stream from the last saved position, up
    to ``retries`` times in a row with exponential backoff (``backoff_s``, doubled each time); then
    one UserError. Errors writing ``raw_dir`` are not retried. ``pushdown=False`` reads every row
    of a Hub or parquet source and filters in Python only (the benchmark's baseline). With
    ``metrics_path`` the transfer statistics are written there as JSON.
    """
    config = _read_config(cfg)
    raw_dir = Path(raw_dir)
    source = resolve_source(config["source"], config["style"])
    if source.kind == "hub":
        # Pin the commit once: every (re)opened stream of this run reads the same rows.
        source.revision = check_hub_reachable(source.name, config["revision"]) or config["revision"]

    with contextlib.ExitStack() as cleanup:
        if source.kind == "synthetic":
            from .synthetic import write_synthetic_wikiart

            tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="synthetic-wikiart-")))
            rows = 2 * config["max_images"] if config["max_images"] else SYNTHETIC_DEFAULT_ROWS
            write_synthetic_wikiart(tmp / "synthetic-wikiart.parquet", n_images=rows, seed=config["seed"])
            source = Source("parquet", SYNTHETIC, [str(tmp / "synthetic-wikiart.parquet")])
        if pushdown:
            source.wanted = {"style": [config["style"]], "artist": config["artists"]}
        if source.kind == "hub":
            meter = ReadMeter(hub_parquet_files(source.name, source.revision))
        else:
            meter = ReadMeter(local_file_sizes(source.data_files) if source.kind == "parquet" else [])

        def fresh_stream():
            try:
                return open_stream(source)
            except TRANSIENT_ERRORS as err:
                raise UserError(f"cannot open download.source {source.name}: {first_line(err, 160)}; check the "
                                f"network or the files, then rerun") from err

        # Open once before touching data/raw: a bad source or bad names must leave nothing behind.
        stream = fresh_stream()
        # From here every read of a parquet shard is counted (the open above installed the
        # streaming `open` that the meter wraps).
        cleanup.enter_context(metering_parquet_reads(meter))
        style_name, style_names = label_decoder(stream.features, "style")
        artist_name, artist_names = label_decoder(stream.features, "artist")
        genre_name, _ = label_decoder(stream.features, "genre")
        folder = source.folder
        if folder is not None:  # plain text labels: the valid names are those the folder's images carry
            style_names, artist_names = folder.names("style"), folder.names("artist")
        validate_names([config["style"]], style_names, "style", "download.style",
                       folder.names_note("style") if folder else "")
        validate_names(config["artists"], artist_names, "artist", "download.artists",
                       folder.names_note("artist") if folder else "")

        # Which rows qualify depends on these; max_images only says when to stop, so a resumed run
        # may raise or lower it. The seed only matters for the synthetic source, the revision for
        # the Hub, where the commit it resolved to counts: a moved branch is another dataset.
        key_parts = {k: v for k, v in config.items()
                     if k != "max_images" and (k != "seed" or config["source"] == SYNTHETIC)
                     and (k != "revision" or source.kind == "hub")}
        if source.kind == "hub":
            key_parts["commit"] = source.revision
        # A saved stream position counts the rows the reader yields, so it only fits the same filter.
        read_filter = pushdown_filter(stream.features, source.wanted) if source.kind in PUSHDOWN_KINDS else None
        if read_filter:
            key_parts["read_filter"] = repr(read_filter)
        key_parts["columns"] = RAW_COLUMNS  # a partial download written with other columns starts afresh
        if folder is not None and folder.metadata_file is not None:  # edited labels: start afresh
            key_parts["folder_metadata"] = hashlib.sha256(folder.metadata_file.read_bytes()).hexdigest()
        progress = Progress(raw_dir, fingerprint(key_parts))
        with _writing_to(raw_dir):
            (raw_dir / METADATA_FILE).unlink(missing_ok=True)  # the completion marker must not outlive a rerun
            resumed = progress.load()
            if config["max_images"]:
                progress.rows = progress.rows[: config["max_images"]]
            progress.start()
            images_dir = raw_dir / "images"
            images_dir.mkdir(parents=True, exist_ok=True)
        resumed_from = len(progress.rows)
        if resumed:
            print(f"download: resuming an unfinished download with {resumed_from} images already kept",
                  file=sys.stderr)

        kept_ids = {row["id"] for row in progress.rows}
        max_images = config["max_images"]
        skipped: Counter[str] = Counter()

        def skip_reason(example: dict) -> str | None:
            """Why a streamed row is not wanted, or None to keep it."""
            if style_name(example["style"]) != config["style"]:
                return "other style"
            if config["artists"] and artist_name(example["artist"]) not in config["artists"]:
                return "other artist"
            return None

        def read_source(example: dict) -> tuple[bytes, bytes | None]:
            """The image's bytes and its sidecar caption's, if any: reads of the source."""
            data = image_bytes(example["image"])
            caption = folder.caption(example["image"]["path"]) if folder is not None and data else None
            if folder is not None:  # the stage reads a plain folder's files itself (not the Parquet reader)
                meter.add(len(data) + len(caption or b""))
            return data, caption

        locate = origin_locator(source, read_filter)

        def keep(example: dict, data: bytes, caption: bytes | None, origin: str) -> bool:
            """Write the image (unless an interrupted run already did) and record the row."""
            if not data:
                skipped["no image bytes"] += 1
                return False
            digest = hashlib.sha256(data).hexdigest()
            if digest[:16] in kept_ids:
                skipped["duplicate"] += 1
                return False
            ext, width, height = image_header(data)
            relative = f"images/{digest[:16]}.{ext}"
            if not (raw_dir / relative).is_file():
                atomic_write_bytes(raw_dir / relative, data)
            # The images are renamed to <id>.<ext>, so a sidecar caption follows as <id>.txt, where
            # the caption stage looks for it. Written before the row is recorded, like the image.
            caption_file = f"images/{digest[:16]}{CAPTION_SUFFIX}" if caption is not None else None
            if caption is not None:
                atomic_write_bytes(raw_dir / caption_file, caption)
            progress.add({"id": digest[:16], "file": relative, "artist": artist_name(example["artist"]),
                          "genre": genre_name(example["genre"]), "style": style_name(example["style"]),
                          "width": width, "height": height, "sha256": digest, "source": source.name,
                          "revision": source.revision, "origin": origin,
                          "caption_file": caption_file})  # not a metadata column; kept for the sweep below
            kept_ids.add(digest[:16])
            return True

        failures = 0
        exhausted = False
        rows_scanned = 0
        started = time.perf_counter()
        # With max_images the bar counts images towards it; otherwise the bytes of the source passed
        # (the files before the one being read plus what was read of it), so its ETA holds with or
        # without row groups skipped. Either way it shows the bytes actually read.
        by_images = bool(max_images)
        bar = cleanup.enter_context(tqdm(
            total=max_images if by_images else meter.total, initial=len(progress.rows) if by_images else 0,
            unit="img" if by_images else "B", unit_scale=not by_images, unit_divisor=1000, desc="download",
            disable=None))

        def show_progress(at_end: bool = False) -> None:
            if not by_images:
                if not meter.files:  # sizes unknown (a plain folder, or the Hub did not say): bytes read
                    passed = meter.bytes_read
                else:
                    passed = meter.total if at_end else meter.position()
                bar.update(passed - bar.n)
            bar.set_postfix_str(f"kept {len(progress.rows)}, scanned {rows_scanned}, "
                                f"read {format_bytes(meter.bytes_read)}", refresh=False)

        with _writing_to(raw_dir):
            while not exhausted and not (max_images and len(progress.rows) >= max_images):
                if progress.stream_state is not None:
                    stream.load_state_dict(progress.stream_state)
                position = progress.rows_read  # rows of the source before the stream's position
                iterator = iter(stream)
                try:
                    unsaved_rows = 0
                    while True:
                        # Only reading the source is retried; what follows writes data/raw.
                        try:
                            example = next(iterator, None)
                            position += example is not None
                            reason = None if example is None else skip_reason(example)
                            data, caption = (read_source(example) if example is not None and reason is None
                                             else (b"", None))
                        except TRANSIENT_ERRORS as err:
                            failures += 1
                            if failures > retries:
                                raise UserError(
                                    f"reading download.source {source.name} failed {failures} times in a row "
                                    f"({type(err).__name__}: {first_line(err, 160)}); the {len(progress.rows)} "
                                    f"images kept so far stay in {raw_dir}, rerun the stage to resume") from err
                            wait = backoff_s * 2 ** (failures - 1)
                            print(f"download: {type(err).__name__}: {first_line(err, 160)}; retrying in "
                                  f"{wait:.0f}s ({failures}/{retries})", file=sys.stderr)
                            time.sleep(wait)
                            stream = fresh_stream()
                            break  # reopen, continuing from the last saved position
                        if example is None:
                            progress.save_state(stream.state_dict(), position)
                            exhausted = True
                            show_progress(at_end=True)
                            break
                        rows_scanned += 1
                        if reason:
                            skipped[reason] += 1
                            show_progress()
                            unsaved_rows += 1
                            # Save the position now and then, so that a retry does not reread long
                            # stretches of other styles.
                            if unsaved_rows >= SAVE_EVERY_SKIPPED:
                                progress.save_state(stream.state_dict(), position)
                                unsaved_rows = 0
                            continue
                        if keep(example, data, caption, locate(position - 1, example)):
                            if by_images:
                                bar.update(1)
                            failures = 0  # progress: the retry budget is for errors in a row
                        show_progress()
                        progress.save_state(stream.state_dict(), position)
                        unsaved_rows = 0
                        if max_images and len(progress.rows) >= max_images:
                            break
                finally:
                    close = getattr(iterator, "close", None)
                    if close:  # end the parquet reader now rather than at interpreter exit
                        close()

    if not progress.rows:
        progress.remove()
        with contextlib.suppress(OSError):  # leave no empty folders behind
            images_dir.rmdir()
            raw_dir.rmdir()
        raise UserError(f"no images of style {config['style']}"
                        + (f" by {', '.join(config['artists'])}" if config["artists"] else "")
                        + f" in download.source {config['source']}; check download.style and download.artists")
    table = pd.DataFrame(progress.rows, columns=RAW_COLUMNS)
    with _writing_to(raw_dir):
        # Images left over from an earlier run with other params are not part of this download.
        wanted = {raw_dir / name for name in table["file"]}
        wanted |= {raw_dir / row["caption_file"] for row in progress.rows if row.get("caption_file")}
        for stray in images_dir.iterdir():
            if stray not in wanted:
                stray.unlink()
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        atomic_write_bytes(raw_dir / METADATA_FILE, buffer.getvalue())  # last: marks the download complete
    progress.remove()

    per_artist = dict(Counter(table["artist"]).most_common())
    summary = DownloadSummary(len(table), per_artist, dict(skipped), resumed_from, rows_scanned=rows_scanned,
                              bytes_read=meter.bytes_read, seconds=time.perf_counter() - started,
                              read_filter=repr(read_filter) if read_filter else None)
    artists_text = ", ".join(f"{name} {count}" for name, count in per_artist.items())
    skipped_text = ", ".join(f"{count} {why}" for why, count in sorted(skipped.items())) or "none"
    at = f" at {source.revision[:12]}" if source.revision else ""
    pushed = f", filter {summary.read_filter} pushed down to the Parquet reads" if read_filter else ""
    print(f"download: kept {len(table)} images of {config['style']} from {config['source']}{at} "
          f"({artists_text}); skipped {skipped_text}; scanned {rows_scanned} rows and read "
          f"{format_bytes(summary.bytes_read)} from the source in {summary.seconds:.1f} s{pushed}")
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
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    run(section(load_params(args.params), "download"), RAW_DIR, metrics_path=METRICS_PATH)


if __name__ == "__main__":
    main()
