"""The parquet tables the data stages hand each other (docs/layout.md), and one checked reader.

Every reader of a table wants the same four checks before any work: the file exists, it is a
readable parquet table, it has the columns the reader needs, and it lists at least one row. Each
failure is one line naming the table and the stage that writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd

from .errors import UserError, first_line

# data/raw/metadata.parquet, written by the download stage. `revision` is the Hub dataset commit
# the rows were streamed from ("" for local and synthetic sources).
RAW_COLUMNS = ["id", "file", "artist", "genre", "style", "width", "height", "sha256", "source", "revision"]
METADATA_FILE = "metadata.parquet"  # the table of data/raw and of data/filtered


def read_table(path: Path | str, columns: Iterable[str], stage: str) -> pd.DataFrame:
    """The parquet table at ``path``, checked to exist, be readable, have ``columns`` and a row.

    ``stage`` is the stage that writes it, named in the message that says what to do.
    """
    path = Path(path)
    rerun = f"rerun the {stage} stage (`dvc repro {stage}`)"
    if not path.is_file():
        raise UserError(f"{path} not found; run the {stage} stage first (`dvc repro {stage}`)")
    try:
        table = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a truncated or foreign file
        raise UserError(f"{path} is not a readable parquet table ({first_line(err, 160)}); {rerun}") from err
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}; {rerun}")
    if table.empty:
        raise UserError(f"{path} lists no images; {rerun}")
    return table
