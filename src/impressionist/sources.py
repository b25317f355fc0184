"""What ``download.source`` names, and how the download stage reads it: the ``download`` params.

Sources:

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
  says otherwise. A kohya caption ``<stem>.txt`` next to an image is read with it.

Every source is then read by the same code (:class:`SourceReader`): a streaming
`datasets.IterableDataset` with the columns image, artist, genre and style, filtered by
``download.style`` and ``download.artists``. For the Hub and parquet sources that filter is also
pushed down into the Parquet reads (the builder's ``filters=`` on the ClassLabel ids, and
``columns=`` the four columns), so row groups whose statistics rule the style out are never
fetched; the check in Python stays as the safety net and decides what is kept, so the kept rows are
the same either way. The bytes read from the source are counted as they are read (see
:mod:`impressionist.source_reads`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import posixpath
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from .errors import DEMO_HINT, UserError, first_line
from .hub import hub_offline
from .params.data import DEFAULT_REVISION, DownloadParams
from .source_reads import ReadMeter, local_file_sizes, metering_parquet_reads
from .wikiart import HUB_DATASET, UNKNOWN_ARTIST, UNKNOWN_GENRE

SYNTHETIC = "synthetic"
REQUIRED_COLUMNS = ("image", "artist", "genre", "style")  # of the source (huggan/wikiart's schema)
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
# How many rows of the synthetic source to paint when download.max_images is 0 ("all").
SYNTHETIC_DEFAULT_ROWS = 120


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


def image_bytes(cell: Any) -> bytes:
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return bytes(cell["bytes"])
        if cell.get("path") and Path(cell["path"]).is_file():
            return Path(cell["path"]).read_bytes()
    return b""


class SourceReadError(Exception):
    """A transient error while reading the source (its ``error``), worth reopening the stream for.
    Errors writing data/raw are never wrapped in it: those are not retried."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


@dataclass
class ScannedRow:
    """One row of the stream: ``position`` counts the stream's rows up to and including it."""

    position: int
    example: dict
    skip_reason: str | None      # why it is not wanted; None: keep it
    data: bytes = b""            # the image's bytes (only read for a wanted row)
    caption: bytes | None = None  # its sidecar caption's bytes, if any (a plain folder's)


@dataclass
class SourceReader:
    """An open ``download.source``: its stream of rows, how to name their labels, the bytes read
    from it and where each row sits in it."""

    params: DownloadParams
    source: Source
    stream: Any                   # the `datasets.IterableDataset`; replaced when reopened
    meter: ReadMeter
    read_filter: list[tuple] | None
    style_name: Callable[[Any], str]
    artist_name: Callable[[Any], str]
    genre_name: Callable[[Any], str]
    locate: Callable[[int, dict], str]  # a row's origin, from its position (0-based) and the row

    def reopen(self) -> None:
        """A fresh stream of the source (a retry continues it from a saved position)."""
        self.stream = open_or_fail(self.source)

    def rows(self, position: int) -> Iterator[ScannedRow]:
        """The stream's rows from its current state, ``position`` rows into the source. Only reads:
        a transient error is raised as a SourceReadError."""
        iterator = iter(self.stream)
        try:
            while True:
                try:
                    row = self._next_row(iterator, position)
                except TRANSIENT_ERRORS as err:
                    raise SourceReadError(err) from err
                if row is None:
                    return
                position = row.position
                yield row
        finally:
            close = getattr(iterator, "close", None)
            if close:  # end the parquet reader now rather than at interpreter exit
                close()

    def _next_row(self, iterator: Iterator[dict], position: int) -> ScannedRow | None:
        example = next(iterator, None)
        if example is None:
            return None
        row = ScannedRow(position + 1, example, self.skip_reason(example))
        if row.skip_reason is None:
            row.data, row.caption = self.read(example)
        return row

    def skip_reason(self, example: dict) -> str | None:
        """Why a streamed row is not wanted, or None to keep it."""
        if self.style_name(example["style"]) != self.params.style:
            return "other style"
        if self.params.artists and self.artist_name(example["artist"]) not in self.params.artists:
            return "other artist"
        return None

    def read(self, example: dict) -> tuple[bytes, bytes | None]:
        """The image's bytes and its sidecar caption's, if any: reads of the source."""
        folder = self.source.folder
        data = image_bytes(example["image"])
        caption = folder.caption(example["image"]["path"]) if folder is not None and data else None
        if folder is not None:  # the stage reads a plain folder's files itself (not the Parquet reader)
            self.meter.add(len(data) + len(caption or b""))
        return data, caption

    def labels(self, example: dict) -> dict[str, str]:
        """The row's artist, genre and style as class names."""
        return {"artist": self.artist_name(example["artist"]), "genre": self.genre_name(example["genre"]),
                "style": self.style_name(example["style"])}


def open_source(params: DownloadParams, cleanup: contextlib.ExitStack, *, pushdown: bool = True) -> SourceReader:
    """Resolve ``download.source``, open its stream and check the wanted names against its labels,
    before anything is written: a bad source or bad names leave nothing behind. ``cleanup`` holds
    what the open source needs until the download ends (the synthetic parquet, the read meter)."""
    source = resolve_source(params.source, params.style)
    if source.kind == "hub":
        # Pin the commit once: every (re)opened stream of this run reads the same rows.
        source.revision = check_hub_reachable(source.name, params.revision) or params.revision
    if source.kind == "synthetic":
        source = write_synthetic_source(params, cleanup)
    if pushdown:
        source.wanted = {"style": [params.style], "artist": params.artists}
    meter = read_meter(source)
    stream = open_or_fail(source)
    # From here every read of a parquet shard is counted (the open above installed the
    # streaming `open` that the meter wraps).
    cleanup.enter_context(metering_parquet_reads(meter))
    style_name, artist_name, genre_name = label_decoders(stream.features, source, params)
    read_filter = pushdown_filter(stream.features, source.wanted) if source.kind in PUSHDOWN_KINDS else None
    return SourceReader(params, source, stream, meter, read_filter, style_name, artist_name, genre_name,
                        origin_locator(source, read_filter))


def write_synthetic_source(params: DownloadParams, cleanup: contextlib.ExitStack) -> Source:
    """The synthetic source, written to a temporary parquet file read like a local mirror."""
    from .synthetic import write_synthetic_wikiart

    tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="synthetic-wikiart-")))
    rows = 2 * params.max_images if params.max_images else SYNTHETIC_DEFAULT_ROWS
    write_synthetic_wikiart(tmp / "synthetic-wikiart.parquet", n_images=rows, seed=params.seed)
    return Source("parquet", SYNTHETIC, [str(tmp / "synthetic-wikiart.parquet")])


def read_meter(source: Source) -> ReadMeter:
    """A meter for the bytes read from ``source``, with its files' sizes where they are known."""
    if source.kind == "hub":
        return ReadMeter(hub_parquet_files(source.name, source.revision))
    return ReadMeter(local_file_sizes(source.data_files) if source.kind == "parquet" else [])


def open_or_fail(source: Source):
    """:func:`open_stream`, with a transient error while opening as one line (opening is not retried)."""
    try:
        return open_stream(source)
    except TRANSIENT_ERRORS as err:
        raise UserError(f"cannot open download.source {source.name}: {first_line(err, 160)}; check the "
                        f"network or the files, then rerun") from err


def label_decoders(features, source: Source, params: DownloadParams) -> tuple[Callable[[Any], str], ...]:
    """How to name a row's style, artist and genre, once download.style and download.artists are
    known to be among the source's names."""
    style_name, style_names = label_decoder(features, "style")
    artist_name, artist_names = label_decoder(features, "artist")
    genre_name, _ = label_decoder(features, "genre")
    folder = source.folder
    if folder is not None:  # plain text labels: the valid names are those the folder's images carry
        style_names, artist_names = folder.names("style"), folder.names("artist")
    validate_names([params.style], style_names, "style", "download.style",
                   folder.names_note("style") if folder else "")
    validate_names(params.artists, artist_names, "artist", "download.artists",
                   folder.names_note("artist") if folder else "")
    return style_name, artist_name, genre_name
