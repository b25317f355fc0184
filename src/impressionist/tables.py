"""The tables the stages hand each other (docs/layout.md), and one checked reader for each.

Every reader of a table wants the same four checks before any work: the file exists, it is a
readable table (parquet, or the CSV the sample stages write), it has the columns the reader needs,
and it lists at least one row. Each failure is one line naming the table and the stage that writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd

from .errors import UserError, first_line

# data/raw/metadata.parquet, written by the download stage. `revision` is the Hub dataset commit
# the rows were streamed from ("" for local and synthetic sources); `origin` is where the image was
# in the source (a folder: its path relative to the folder; parquet: "<file> row <n>"; the Hub:
# "train row <n>"), so that a user can find their own file behind an id.
RAW_COLUMNS = ["id", "file", "artist", "genre", "style", "width", "height", "sha256", "source", "revision",
               "origin"]
METADATA_FILE = "metadata.parquet"  # the table of data/raw and of data/filtered


def read_table(path: Path | str, columns: Iterable[str], stage: str) -> pd.DataFrame:
    """The table at ``path`` (``.csv`` or parquet), checked to exist, be readable, have ``columns``
    and a row.

    ``stage`` is the stage that writes it, named in the message that says what to do.
    """
    path = Path(path)
    rerun = f"rerun the {stage} stage (`dvc repro {stage}`)"
    if not path.is_file():
        raise UserError(f"{path} not found; run the {stage} stage first (`dvc repro {stage}`)")
    kind = "CSV" if path.suffix == ".csv" else "parquet"
    try:
        table = pd.read_csv(path) if kind == "CSV" else pd.read_parquet(path)
    except pd.errors.EmptyDataError:  # a CSV without even a header: no rows, reported below
        table = pd.DataFrame(columns=list(columns))
    except Exception as err:  # pyarrow raises several types for a truncated or foreign file
        raise UserError(f"{path} is not a readable {kind} table ({first_line(err, 160)}); {rerun}") from err
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}; {rerun}")
    if table.empty:
        raise UserError(f"{path} lists no images; {rerun}")
    return table


def read_raw(raw_dir: Path | str, columns: Iterable[str] = RAW_COLUMNS) -> pd.DataFrame:
    """``data/raw``'s table (download writes it), checked to hold ``columns``."""
    return read_table(Path(raw_dir) / METADATA_FILE, columns, "download")


def read_filtered(filtered_dir: Path | str, columns: Iterable[str]) -> pd.DataFrame:
    """``data/filtered``'s table (filter writes it), checked to hold ``columns``."""
    return read_table(Path(filtered_dir) / METADATA_FILE, columns, "filter")


def read_captions(captions_path: Path | str, columns: Iterable[str]) -> pd.DataFrame:
    """``data/captions/captions.parquet`` (caption writes it), checked to hold ``columns``."""
    return read_table(captions_path, columns, "caption")


def validation_split(filtered_dir: Path | str) -> pd.DataFrame:
    """The validation rows (``split == "val"``) of ``data/filtered``'s table, sorted by id: the real
    paintings the reference stage extracts and evaluate must score against."""
    table = read_filtered(filtered_dir, ("id", "file", "split"))
    return table[table["split"] == "val"].sort_values("id", kind="stable")
