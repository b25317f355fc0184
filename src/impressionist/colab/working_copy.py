"""The local clone pointed at Drive: DVC cache, checkpoint folder, and the last session's state."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from ..dvc_cli import dvc_environment, run_dvc
from ..errors import UserError
from ..layout import CHECKPOINT_ROOT, DVC_PIPELINE
from .console import say
from .drive import DriveLayout
from .state_mirror import StateMirror, state_paths

PREPARED_MARKER = Path(".dvc/tmp/impressionist-colab.json")  # .dvc/tmp is git-ignored


def run_environment(repo: Path | str) -> dict[str, str]:
    # Stage commands call `python` and import `impressionist`: the interpreter of this kernel (first
    # on PATH), and the checkout's own code (the one DVC hashes as deps), whatever else is installed.
    pythonpath = os.pathsep.join(p for p in [str(Path(repo).resolve() / "src"), os.environ.get("PYTHONPATH", "")]
                                 if p)
    return dvc_environment(PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath)


def link_checkpoints(repo: Path | str, target: Path | str) -> Path:
    """Make ``.cache/checkpoints`` a symlink to ``target`` on Drive, moving any local checkpoints
    there first."""
    link, target = Path(repo) / CHECKPOINT_ROOT, Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if link.resolve() == target.resolve():
            return link
        link.unlink()
    elif link.is_dir():
        for entry in sorted(link.iterdir()):
            if not (target / entry.name).exists():
                shutil.move(str(entry), str(target / entry.name))
        shutil.rmtree(link)
    elif link.exists():
        raise UserError(f"{link} is a file; expected the checkpoint folder: remove it and rerun")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve(), target_is_directory=True)
    return link


def drop_incomplete_checkpoints(folder: Path | str, log: Callable[[str], None] = say) -> list[Path]:
    """Remove checkpoints that a disconnect left incomplete on Drive.

    Drive uploads in the background, so files written just before a disconnect can be missing or
    empty afterwards, and the trainer would fail to load its newest checkpoint on every rerun.
    A checkpoint is incomplete when a file that the metadata lists (``files``: name -> size) has
    another size, or when it lacks, or has empty, a file that another checkpoint of the same run
    has with content. (Unreadable metadata is the trainer's case: it discards those itself.)
    """
    from ..checkpoints import list_checkpoints, list_runs

    found = [(path, meta) for run in list_runs(Path(folder))
             for path, meta in list_checkpoints(run) if meta is not None]

    def sizes(path: Path) -> dict[str, int]:
        return {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}

    contents = {path: sizes(path) for path, _ in found}
    removed = []
    for path, meta in found:
        have = contents[path]
        listed = meta.get("files") if isinstance(meta.get("files"), dict) else {}
        expected = {name for other, other_meta in found if other != path
                    and other_meta.get("run_hash") == meta.get("run_hash")
                    for name, size in contents[other].items() if size > 0}
        problem = next((f"{name} missing or truncated" for name, size in listed.items()
                        if have.get(name) != size), None)
        problem = problem or next((f"{name} missing or empty" for name in sorted(expected)
                                   if not have.get(name)), None)
        if problem:
            log(f"removing incomplete checkpoint {path.name} ({problem})")
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def prepare(repo: Path | str, layout: DriveLayout) -> None:
    """Point the working copy at Drive: DVC cache, checkpoint folder, and (in a fresh clone) the
    dvc.lock and uncached outs of the last session."""
    repo = Path(repo).resolve()
    if not (repo / DVC_PIPELINE).is_file() or not (repo / ".git").exists():
        raise UserError(f"{repo} is not a checkout of the project (no dvc.yaml or .git)")
    layout.create()
    # --local: .dvc/config.local is git-ignored, so the committed config stays as it is. Workspace
    # (local disk) and cache (Drive) are on different filesystems: copy is the only link type.
    run_dvc(repo, "cache", "dir", "--local", str(layout.dvc_cache), env=run_environment(repo))
    run_dvc(repo, "config", "--local", "cache.type", "copy", env=run_environment(repo))
    drop_incomplete_checkpoints(layout.checkpoints)
    link_checkpoints(repo, layout.checkpoints)

    marker = repo / PREPARED_MARKER
    previous = json.loads(marker.read_text()) if marker.is_file() else {}
    if previous.get("drive") == str(layout.root):
        # The same runtime, prepared before: the local files are the newest (the mirror copies them).
        say(f"working copy {repo} already set up in this runtime")
    else:
        mirror = StateMirror(repo, layout.state, state_paths(repo / DVC_PIPELINE))
        restored = mirror.restore()
        if restored:
            say(f"restored dvc.lock and {len(restored) - ('dvc.lock' in restored)} uncached outputs "
                 f"of the last session from {layout.state}")
        else:
            say("no earlier session on Drive: starting from scratch")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"drive": str(layout.root)}))
    steps = sorted(p.name for p in layout.checkpoints.glob("*/step-*"))
    say(f"DVC cache {layout.dvc_cache}; checkpoints {layout.checkpoints} "
         f"({', '.join(steps) if steps else 'none yet'})")
