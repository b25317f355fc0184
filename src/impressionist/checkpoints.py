"""Training checkpoints that survive disconnects, and know which run they belong to.

Each checkpoint is an ``accelerator.save_state`` folder (LoRA weights, optimizer and RNG state; the
learning-rate schedule is recomputed from the step) plus ``impressionist.json`` with the hash of
every param that shapes training and the loss history. They live outside DVC's outputs, in
``<root>/<run hash>/step-NNNNNNNN`` (root: ``$IMPRESSIONIST_CHECKPOINTS``, else
``.cache/checkpoints``, git- and DVC-ignored), so neither ``dvc repro`` nor the forced checkout
that starts every ``dvc exp run`` touches them. A run resumes only from its own folder, so
``dvc exp run -S lora.rank=32`` never continues a rank-16 run, while raising ``train.max_steps``
continues when the learning-rate schedule is constant (a decaying schedule depends on
``max_steps``, so it is part of the hash then). Other runs' folders stay (switching back to an
experiment resumes it) until ``impressionist clean-checkpoints`` removes them. Each run keeps its
newest ``train.keep_checkpoints``. Folders appear by rename, so a kill during a save leaves no
half checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .layout import CHECKPOINT_ROOT

META = "impressionist.json"
PREFIX = "step-"
ROOT_ENV = "IMPRESSIONIST_CHECKPOINTS"


def default_root() -> Path:
    """Where the train stage keeps checkpoints: ``$IMPRESSIONIST_CHECKPOINTS`` or ``.cache/checkpoints``."""
    return Path(os.environ.get(ROOT_ENV) or CHECKPOINT_ROOT)


def run_folder(root: Path, run_hash: str) -> Path:
    return Path(root) / run_hash


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
    """Newest checkpoint of this run (in ``root/<run_hash>``) at or below ``max_steps``.

    Discards unreadable checkpoints in the run's folder (except ``protect``: the
    ``train.resume_from`` folder) and temporary folders left by a save that was killed midway.
    Other runs' folders are left alone; one log line says how much they hold.
    """
    others = [run for run in list_runs(root) if run.name != run_hash]
    if others:
        size = sum(folder_bytes(run) for run in others)
        log(f"train: {len(others)} other run(s) keep checkpoints in {root} ({size / 2**20:.1f} MiB); "
            "`impressionist clean-checkpoints` removes them")
    folder_of_run = run_folder(root, run_hash)
    if folder_of_run.is_dir():
        for leftover in folder_of_run.glob(f".{PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    protected = Path(protect).resolve() if protect else None
    best = None
    for folder, meta in list_checkpoints(folder_of_run):
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


def staging_folder(folder: Path, step: int) -> Path:
    """Where a save is written before :func:`publish` renames it (``folder``: the run's folder)."""
    return folder / f".{checkpoint_name(step)}.tmp"


def publish(folder: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Write metadata into the staged save, rename it into place, keep the newest ``keep`` of this
    run (``folder``: the run's folder) at or below ``step``.

    Checkpoints of this run beyond ``step`` (left when ``train.max_steps`` was lowered) are not
    counted, so the checkpoint just written is never the one pruned.
    """
    staged, final = staging_folder(folder, step), folder / checkpoint_name(step)
    (staged / META).write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    same_run = [p for p, m in list_checkpoints(folder)
                if m and m.get("run_hash") == meta["run_hash"] and m.get("step", step + 1) <= step]
    for old in same_run[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def explicit_resume(folder: Path, base_model: str, lora_fingerprint: str,
                    optimizer: str) -> tuple[Path, dict[str, Any]]:
    """``train.resume_from``: continue a checkpoint the user points at (e.g. copied from Drive).

    Other training params may differ (a new learning rate or weight decay: the trainer applies
    them after loading, see :func:`apply_hyperparameters`; more steps); the base model, the LoRA's
    shape and the optimizer may not, since the saved tensors and optimizer state would not fit.
    """
    from .errors import UserError

    meta = read_meta(folder) if folder.is_dir() else None
    if meta is None:
        raise UserError(f"train.resume_from={folder} is not a checkpoint written by the train stage "
                        f"(no {META}); point it at a {CHECKPOINT_ROOT}/<run>/{PREFIX}* folder")
    if meta.get("base_model") != base_model:
        raise UserError(f"train.resume_from={folder} was trained on {meta.get('base_model')}, not "
                        f"{base_model}; resume it with that model.pretrained or clear resume_from")
    if meta.get("lora") != lora_fingerprint:
        raise UserError(f"train.resume_from={folder} has another LoRA shape (rank/alpha/targets); "
                        "use the lora params it was trained with or clear resume_from")
    if meta.get("optimizer", optimizer) != optimizer:
        raise UserError(f"train.resume_from={folder} was trained with train.optimizer={meta['optimizer']}, "
                        f"whose state {optimizer} cannot continue; set train.optimizer: {meta['optimizer']} "
                        "or clear resume_from")
    return folder, meta


def apply_hyperparameters(optimizer, learning_rate: float, weight_decay: float) -> None:
    """Give a just-loaded optimizer the params' learning rate and weight decay.

    ``load_state_dict`` restores every param group's hyper-parameters from the checkpoint, so a
    resumed run would otherwise keep the old ones. ``initial_lr`` is the base the learning-rate
    schedule scales (a scheduler built with ``last_epoch`` reads it).
    """
    for group in optimizer.param_groups:
        group.update(lr=learning_rate, initial_lr=learning_rate, weight_decay=weight_decay)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def list_runs(root: Path) -> list[Path]:
    """The run folders under ``root`` (one per run hash), oldest newest-checkpoint first."""
    if not Path(root).is_dir():
        return []
    runs = [p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(runs, key=lambda run: max((c.stat().st_mtime for c, _ in list_checkpoints(run)),
                                            default=run.stat().st_mtime))


def clean(root: Path, keep_runs: int, dry_run: bool = False, log=print) -> list[Path]:
    """Remove the checkpoint folders of all runs but the ``keep_runs`` most recently checkpointed."""
    runs = list_runs(root)
    doomed = runs[:max(len(runs) - keep_runs, 0)]
    for run in doomed:
        steps = ", ".join(c.name for c, _ in list_checkpoints(run)) or "no checkpoints"
        log(f"clean-checkpoints: {'would remove' if dry_run else 'removing'} {run} "
            f"({steps}; {folder_bytes(run) / 2**20:.1f} MiB)")
        if not dry_run:
            shutil.rmtree(run)
    kept = len(runs) - len(doomed)
    log(f"clean-checkpoints: {'would keep' if dry_run else 'kept'} {kept} run(s) in {root}")
    return doomed


def main(argv: list[str] | None = None) -> None:
    """``impressionist clean-checkpoints``: free the disk other runs' checkpoints hold."""
    import argparse

    from .errors import stage_main

    parser = argparse.ArgumentParser(
        prog="impressionist clean-checkpoints",
        description="Remove training checkpoints of earlier runs (each run hash has its own folder).")
    parser.add_argument("--root", type=Path, default=None,
                        help=f"checkpoint root (default: ${ROOT_ENV} or {CHECKPOINT_ROOT})")
    parser.add_argument("--keep", type=int, default=1,
                        help="runs to keep, most recently checkpointed first (default 1; 0 removes all)")
    parser.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    args = parser.parse_args(argv)

    @stage_main
    def run() -> None:
        from .errors import UserError

        if args.keep < 0:
            raise UserError(f"--keep {args.keep} must be 0 or more")
        clean(args.root or default_root(), args.keep, args.dry_run)

    run()
