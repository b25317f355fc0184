"""The encode stage's cache format: safetensors shards plus an ``index.json``.

Written by ``encode``, read by ``train``. Shards are flushed every ``shard_size`` entries so memory
stays bounded however many images there are, and read through memory-mapped ``safe_open`` handles
so training never holds the whole cache in RAM either.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError

INDEX = "index.json"
EMPTY_CAPTION_KEY = "empty"  # text embeddings of "" for caption dropout


class ShardWriter:
    """Accumulates named tensors and writes ``<prefix>-NNNNN.safetensors`` every ``shard_size`` keys."""

    def __init__(self, folder: Path, prefix: str, shard_size: int):
        self.folder, self.prefix, self.shard_size = Path(folder), prefix, shard_size
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_keys = 0
        self.shard_count = 0
        self.location: dict[str, str] = {}  # key -> shard file name

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        shard = f"{self.prefix}-{self.shard_count:05d}.safetensors"
        for name, tensor in tensors.items():
            self.pending[f"{key}/{name}"] = tensor.detach().to("cpu").contiguous()
        self.location[key] = shard
        self.pending_keys += 1
        if self.pending_keys >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, str(self.folder / f"{self.prefix}-{self.shard_count:05d}.safetensors"))
        self.pending, self.pending_keys = {}, 0
        self.shard_count += 1


class CacheReader:
    """Random access to cached latents and text embeddings by key."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        index_path = self.folder / INDEX
        if not index_path.is_file():
            raise UserError(f"{self.folder} holds no encoded cache ({INDEX} missing); "
                            "run the encode stage first (`dvc repro encode`)")
        self.index: dict[str, Any] = json.loads(index_path.read_text())
        if not self.index.get("samples"):
            raise UserError(f"the encoded cache in {self.folder} is empty: no training images; "
                            "check the filter stage's metrics/data.json")
        self._open = lru_cache(maxsize=8)(self._open_shard)

    def __getstate__(self):  # data-loader workers re-open shards themselves: handles don't pickle
        state = dict(self.__dict__)
        del state["_open"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open = lru_cache(maxsize=8)(self._open_shard)

    def _open_shard(self, shard: str):
        return safe_open(str(self.folder / shard), framework="pt")

    def _get(self, shard: str, key: str, name: str) -> torch.Tensor:
        return self._open(shard).get_tensor(f"{key}/{name}")

    @property
    def samples(self) -> list[dict[str, Any]]:
        return self.index["samples"]

    def latent(self, sample: dict[str, Any]) -> torch.Tensor:
        return self._get(sample["shard"], sample["key"], "latent")

    def text(self, caption_key: str) -> tuple[torch.Tensor, torch.Tensor]:
        shard = self.index["text"][caption_key]
        return self._get(shard, caption_key, "prompt_embeds"), self._get(shard, caption_key, "pooled")
