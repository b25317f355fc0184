"""The results the notebook shows when the pipeline has finished."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..layout import EVAL_METRICS, SAMPLE_GRID, TRAIN_METRICS

RESULT_FILES = (SAMPLE_GRID.as_posix(), EVAL_METRICS.as_posix(), TRAIN_METRICS.as_posix())


def show_results(repo: Path | str) -> dict[str, Any]:
    """Display the sample grid and the metrics; returns the metrics read."""
    repo = Path(repo)
    missing = [name for name in RESULT_FILES if not (repo / name).is_file()]
    if missing:
        raise UserError(f"no {', '.join(missing)} in {repo}: the pipeline has not finished; run the "
                        "cells above")
    metrics = {name: json.loads((repo / name).read_text()) for name in RESULT_FILES if name.endswith(".json")}
    try:
        from IPython.display import Image, display
    except ImportError:
        display = None
    if display:
        display(Image(filename=str(repo / SAMPLE_GRID)))
    for name, values in metrics.items():
        print(f"{name}:\n{json.dumps(values, indent=1)}")
    return metrics
