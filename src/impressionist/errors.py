"""One clear line for bad input, and outputs that appear only when complete.

Every stage raises :class:`UserError` for problems the user can fix (missing file, wrong param,
no GPU, no network). ``stage_main`` turns it into a single ``error: ...`` line on stderr and exit
code 2, instead of a traceback, so the message is the last thing a user sees in ``dvc repro``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator

DEMO_HINT = "to try the pipeline offline on CPU, run the demo: `impressionist demo`"


class UserError(Exception):
    """A problem with the input or environment that the user can fix; printed as one line."""


def first_line(err: BaseException, limit: int = 240) -> str:
    """An exception as one short line for an error message (its type when it has no text)."""
    text = (str(err).strip() or type(err).__name__).splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def stage_main(fn: Callable[..., None]) -> Callable[..., None]:
    """Wrap a stage entry point so UserError becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


@contextlib.contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final``, on error it is removed.

    A crashed or refused stage therefore never leaves a half-written output that DVC or the next
    stage could mistake for a finished one. A process killed outright (SIGKILL, a lost VM) cannot
    clean up, so temporary siblings of ``final`` found on entry are removed: only a killed earlier
    run of the same writer leaves them (callers that may run concurrently serialise themselves).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)


def _remove_leftovers(final: Path) -> None:
    prefix = f".{final.name}.tmp-"
    for leftover in final.parent.iterdir():
        if leftover.name.startswith(prefix):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write a file so that it appears only complete (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
