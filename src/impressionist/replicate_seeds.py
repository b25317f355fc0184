"""Which LoRAs a recipe trains: ``replicates.count`` = R, replicate 0 from ``train.seed``, the others
from seeds derived from it (the statistics over them are :mod:`impressionist.replicates`).

Kept apart from the statistics so that the train and sample stages depend on this small file only.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Mapping

from .params.model import ReplicateParams


def replicate_seed(train_seed: int, k: int) -> int:
    """The training seed of replicate ``k``: ``train.seed`` itself for k = 0 (models/lora), else a
    31-bit number derived from (train.seed, k), so no two recipes' seeds line up by accident."""
    if k == 0:
        return int(train_seed)
    digest = hashlib.sha256(f"impressionist-replicate:{int(train_seed)}:{int(k)}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def replicate_params(params: Mapping[str, Any], k: int) -> dict[str, Any]:
    """``params`` with ``train.seed`` replaced by replicate ``k``'s seed (everything else the recipe's)."""
    out = copy.deepcopy(dict(params))
    out["train"] = dict(out["train"], seed=replicate_seed(int(params["train"]["seed"]), k))
    return out


def extra_replicates(params: Mapping[str, Any]) -> list[int]:
    """The replicate numbers beyond models/lora: 1 .. R-1 (empty for R = 1)."""
    return list(range(1, ReplicateParams.check(params).count))
