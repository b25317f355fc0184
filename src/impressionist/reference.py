"""The reference stage: features of the real paintings (the validation split), once per data version.

Reads the validation split of ``data/filtered`` and the feature-network params of the ``evaluate``
section; writes ``data/reference/`` (``features.safetensors``: FID/KID, CLIP and CMMD features of
every validation painting; ``reference.json``: their ids and the feature config). It depends on
neither the LoRA nor the samples, so a ``lora.*`` or ``sample.*`` change does not recompute it; the
evaluate stage reads it and refuses features computed with other networks or of other paintings
than the current validation split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import data_parallel
from .errors import UserError, atomic_dir, stage_main
from .image_features import EvaluateParams, Extractors, batch_count, save_reference
from .layout import FILTERED_DIR, REFERENCE_DIR
from .params import DEFAULT_PARAMS, load_params
from .stats import MIN_REAL  # the fewest paintings KID / CMMD intervals are computed from (why: stats.py)
from .tables import METADATA_FILE, validation_split


def validation_paintings(filtered_dir: Path | str) -> tuple[list[str], list[Path]]:
    """Ids and paths of the validation split of ``data/filtered`` (``split == "val"``), sorted by id."""
    filtered_dir = Path(filtered_dir)
    meta = filtered_dir / METADATA_FILE
    val = validation_split(filtered_dir)
    if len(val) < MIN_REAL:
        raise UserError(f"{meta} has {len(val)} validation image(s); KID and CMMD intervals need at least "
                        f"{MIN_REAL} real images — raise filter.val_fraction (or download.max_images)")
    paths = [filtered_dir / str(f) for f in val["file"]]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise UserError(f"{len(absent)} validation image(s) missing under {filtered_dir} (first: {absent[0]}); "
                        f"re-run the filter stage")
    return [str(i) for i in val["id"]], paths


def run(params: Mapping[str, Any], filtered_dir: Path | str = FILTERED_DIR,
        out_dir: Path | str = REFERENCE_DIR) -> int | None:
    """Extract and save the validation paintings' features; return how many paintings (``None`` on
    the ranks other than 0 of a data-parallel run, which only extract their share)."""
    cfg = EvaluateParams.check(params)  # cheap checks before any network loads
    ids, paths = validation_paintings(filtered_dir)
    features = Extractors.load(cfg).features(paths)
    if features is None:
        return None
    with atomic_dir(out_dir) as tmp:
        save_reference(tmp, features, ids, cfg)
    return len(ids)


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m impressionist reference", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (reads its `evaluate` section)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    EvaluateParams.check(params)
    _, paths = validation_paintings(FILTERED_DIR)
    if data_parallel.launch("reference", "impressionist.reference", sys.argv[1:] if argv is None else argv,
                            params, torch.cuda.is_available(), [batch_count(len(paths))]):
        return
    n = run(params)
    if n is not None:
        print(f"reference: features of {n} validation paintings -> {REFERENCE_DIR}")


if __name__ == "__main__":
    main()
