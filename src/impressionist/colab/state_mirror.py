"""dvc.lock and the outs DVC does not cache, mirrored to Drive while the pipeline runs and restored
into a fresh clone."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterable

import yaml

from ..errors import atomic_write_bytes, first_line


def state_paths(dvc_yaml: Path | str) -> list[str]:
    """The outs, metrics and plots that DVC does not cache (``cache: false``), from dvc.yaml.

    DVC keeps no copy of them, and a stage whose uncached out is gone counts as changed: they are
    mirrored to Drive together with dvc.lock.
    """
    stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {})
    paths = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []) or []:
                if isinstance(entry, dict):
                    for path, options in entry.items():
                        if isinstance(options, dict) and options.get("cache") is False:
                            paths.append(path)
    return list(dict.fromkeys(paths))


def _files_under(root: Path, rel: str) -> dict[str, Path]:
    """``{relative path: file}`` for a file or every file below a folder (empty if missing)."""
    base = root / rel
    if base.is_file():
        return {rel: base}
    if base.is_dir():
        return {p.relative_to(root).as_posix(): p for p in sorted(base.rglob("*")) if p.is_file()}
    return {}


def _copy_atomic(source: Path, dest: Path) -> None:
    atomic_write_bytes(dest, source.read_bytes())  # the outs mirrored are small: metrics, plots, logs


class StateMirror:
    """Copies dvc.lock and the uncached outs from the working copy to Drive, every ``interval``
    seconds and right after DVC updates dvc.lock (``poke``), while the pipeline runs.

    Outs are copied before dvc.lock, so the mirror's dvc.lock never names an out it lacks. A path
    that exists locally is mirrored exactly (files gone from a local folder go from the mirror, or
    DVC would see a changed folder); a path missing locally (DVC deletes a stage's outs before it
    re-runs it) keeps its last mirrored version, which matches the mirrored dvc.lock.
    """

    def __init__(self, repo: Path | str, state: Path | str, paths: Iterable[str], interval: float = 2.0):
        self.repo, self.state = Path(repo), Path(state)
        self.paths = [p for p in paths if p != "dvc.lock"] + ["dvc.lock"]
        self.interval = interval
        self._seen: dict[str, tuple[int, int]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def sync(self) -> int:
        """One pass; returns how many files were copied or removed."""
        changes = 0
        for rel in self.paths:
            local = _files_under(self.repo, rel)
            if not local:
                continue
            for name, path in local.items():
                stat = path.stat()
                stamp = (stat.st_size, stat.st_mtime_ns)
                if self._seen.get(name) != stamp or not (self.state / name).is_file():
                    _copy_atomic(path, self.state / name)
                    self._seen[name] = stamp
                    changes += 1
            for name, stale in _files_under(self.state, rel).items():
                if name not in local:
                    stale.unlink()
                    self._seen.pop(name, None)
                    changes += 1
        return changes

    def restore(self) -> list[str]:
        """Copy every mirrored file into the working copy (a fresh clone); returns their paths."""
        restored = []
        for rel in self.paths:
            for name, path in _files_under(self.state, rel).items():
                _copy_atomic(path, self.repo / name)
                restored.append(name)
        return restored

    def poke(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            poked = self._wake.wait(self.interval)
            self._wake.clear()
            if poked:  # DVC logs the lock update just before writing it
                time.sleep(0.3)
            self._safe_sync()

    def _safe_sync(self) -> None:
        try:
            self.sync()
        except OSError as err:  # a Drive hiccup must not stop training; the next pass retries
            self.errors.append(f"{type(err).__name__}: {first_line(err)}")

    def __enter__(self) -> "StateMirror":
        self._thread = threading.Thread(target=self._loop, name="drive-state-mirror", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join()
        self._safe_sync()  # the final state, also after a failure or an interrupt
