"""Training checkpoints that survive disconnects, and know which run they belong to.

Each checkpoint is an ``accelerator.save_state`` folder (LoRA weights, optimizer, scheduler, RNG)
plus ``impressionist.json`` with the hash of every param that shapes training and the loss history.
A run resumes only from a checkpoint with its own hash; others are discarded with a log line, so
``dvc exp run -S lora.rank=32`` never continues a rank-16 run, while raising ``train.max_steps``
continues when the learning-rate schedule is constant (a decaying schedule depends on
``max_steps``, so it is part of the hash then). Folders appear by rename, so a kill during a save
leaves no half checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

META = "impressionist.json"
PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None


def list_checkpoints(root: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """Finished checkpoint folders under ``root`` in step order, with their metadata."""
    if not root.is_dir():
        return []
    found = [(p, read_meta(p)) for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda item: item[0].name)


def select_resume(root: Path, run_hash: str, max_steps: int, log=print,
                  protect: Path | None = None) -> tuple[Path, dict] | None:
    """Newest checkpoint of this run at or below ``max_steps``; discards other runs' checkpoints
    (except ``protect``: the ``train.resume_from`` folder, which may lie in ``root``).

    Also removes temporary folders left by a save that was killed midway.
    """
    if root.is_dir():
        for leftover in root.glob(f".{PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    protected = Path(protect).resolve() if protect else None
    best = None
    for folder, meta in list_checkpoints(root):
        if protected is not None and folder.resolve() == protected:
            continue
        if meta is None or meta.get("run_hash") != run_hash:
            reason = "unreadable metadata" if meta is None else (
                f"params hash {meta.get('run_hash')} != {run_hash}")
            log(f"train: discarding checkpoint {folder} (from another run: {reason})")
            shutil.rmtree(folder, ignore_errors=True)
        elif meta["step"] <= max_steps:
            best = (folder, meta)
    return best


def staging_folder(root: Path, step: int) -> Path:
    return root / f".{checkpoint_name(step)}.tmp"


def publish(root: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Write metadata into the staged save, rename it into place, keep the newest ``keep`` of this
    run at or below ``step``.

    Checkpoints of this run beyond ``step`` (left when ``train.max_steps`` was lowered) are not
    counted, so the checkpoint just written is never the one pruned.
    """
    staged, final = staging_folder(root, step), root / checkpoint_name(step)
    (staged / META).write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    same_run = [p for p, m in list_checkpoints(root)
                if m and m.get("run_hash") == meta["run_hash"] and m.get("step", step + 1) <= step]
    for old in same_run[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def explicit_resume(folder: Path, base_model: str, lora_fingerprint: str) -> tuple[Path, dict[str, Any]]:
    """``train.resume_from``: continue a checkpoint the user points at (e.g. copied from Drive).

    Other training params may differ (a new learning rate, more steps); the base model and the
    LoRA's shape may not, since the saved tensors would not fit.
    """
    from .errors import UserError

    meta = read_meta(folder) if folder.is_dir() else None
    if meta is None:
        raise UserError(f"train.resume_from={folder} is not a checkpoint written by the train stage "
                        f"(no {META}); point it at a models/checkpoints/{PREFIX}* folder")
    if meta.get("base_model") != base_model:
        raise UserError(f"train.resume_from={folder} was trained on {meta.get('base_model')}, not "
                        f"{base_model}; resume it with that model.pretrained or clear resume_from")
    if meta.get("lora") != lora_fingerprint:
        raise UserError(f"train.resume_from={folder} has another LoRA shape (rank/alpha/targets); "
                        "use the lora params it was trained with or clear resume_from")
    return folder, meta
