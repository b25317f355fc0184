"""Count the bytes the download stage reads from ``download.source``, where they are read.

`datasets`' Parquet builder opens every shard with the module-level ``open`` of
``datasets.packaged_modules.parquet.parquet``, which a streaming load replaces with `datasets`'
``xopen`` (a local file, or an fsspec file such as the Hub's ``HfFileSystemFile``), and then hands
the file object to pyarrow. :func:`metering_parquet_reads` wraps that ``open`` for the duration of a
``with`` block, so every ``read`` pyarrow makes on a shard — footer, column chunks, whatever the
pushed-down filter let through — is counted as it happens, not estimated. It is the only hook
`datasets` gives to the files its reader opens; the wrapper is removed again on exit.

For a Hub shard the count is what pyarrow asked the fsspec file for; the file's own read-ahead
may fetch somewhat more over the network.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from dataclasses import dataclass, field

PARQUET_BUILDER_MODULE = "datasets.packaged_modules.parquet.parquet"


@dataclass
class ReadMeter:
    """Bytes read from the source, and where in the source the reader is.

    ``files`` lists the source's files in the order the reader goes through them, with their sizes
    (the Parquet builder reads its data files in order); it gives :meth:`position`, the bytes of the
    source passed so far, for a progress bar's ETA. Empty when the sizes are not known.
    """

    files: list[tuple[str, int]] = field(default_factory=list)
    bytes_read: int = 0
    files_opened: int = 0
    _current: int = -1                     # index in ``files`` of the file read last
    _read_in_current: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def total(self) -> int | None:
        return sum(size for _, size in self.files) or None

    def add(self, count: int) -> None:
        """Count ``count`` bytes read (by the Parquet reader, or by the stage from a plain folder)."""
        with self._lock:
            self.bytes_read += count
            self._read_in_current += count

    def opened(self, path: str) -> None:
        with self._lock:
            self.files_opened += 1
            for index, (name, _) in enumerate(self.files):
                if path == name or path.endswith("/" + name.lstrip("/")):
                    if index != self._current:
                        self._current, self._read_in_current = index, 0
                    break

    def position(self) -> int:
        """Bytes of the source passed: the files before the one being read, and what was read of it.

        Within a file the pushed-down filter skips row groups, so this lags there and catches up
        when the next file opens.
        """
        if self._current < 0:
            return 0
        before = sum(size for _, size in self.files[: self._current])
        return before + min(self._read_in_current, self.files[self._current][1])


def local_file_sizes(paths: list[str]) -> list[tuple[str, int]]:
    return [(path, os.path.getsize(path)) for path in paths]


class MeteredFile:
    """A file object that counts the bytes read through it; everything else goes to the file."""

    def __init__(self, handle, meter: ReadMeter):
        self._handle, self._meter = handle, meter

    def read(self, size: int = -1):
        data = self._handle.read(size)
        self._meter.add(len(data))
        return data

    def readinto(self, buffer) -> int:
        count = self._handle.readinto(buffer)
        self._meter.add(count or 0)
        return count

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._handle.close()

    def __iter__(self):  # line iteration is not how pyarrow reads; keep it counted anyway
        for line in self._handle:
            self._meter.add(len(line))
            yield line


@contextlib.contextmanager
def metering_parquet_reads(meter: ReadMeter):
    """Count every read of the Parquet builder's shards into ``meter`` while the block runs.

    Enter it after the first streaming ``load_dataset`` of the run: that load installs `datasets`'
    streaming ``open`` in the builder module, which this wraps (and later loads keep).
    """
    module = importlib.import_module(PARQUET_BUILDER_MODULE)
    missing = object()
    original = module.__dict__.get("open", missing)
    inner = open if original is missing else original

    def metered_open(file, *args, **kwargs):
        handle = inner(file, *args, **kwargs)
        meter.opened(str(file))
        return MeteredFile(handle, meter)

    module.open = metered_open
    try:
        yield meter
    finally:
        if module.__dict__.get("open") is metered_open:  # unless `datasets` replaced it meanwhile
            if original is missing:
                del module.open
            else:
                module.open = original
