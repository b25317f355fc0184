"""The encode stages' cache format: two folders of safetensors shards, each with an ``index.json``.

``latents/`` (written by ``encode_latents``) and ``text/`` (by ``encode_text``) under one cache folder;
``train`` reads both through `CacheReader`, which joins them by image id. Shards are flushed every ``shard_size`` entries so memory
stays bounded however many images there are, and read through memory-mapped ``safe_open`` handles
so training never holds the whole cache in RAM either.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError
from .layout import LATENT_CACHE_DIR, TEXT_CACHE_DIR
from .params import fingerprint

INDEX = "index.json"
EMPTY_CAPTION_KEY = "empty"  # text embeddings of "" for caption dropout


def caption_key(caption: str) -> str:
    """Identical captions (common with template captions) share one cached embedding."""
    return hashlib.sha256(caption.encode()).hexdigest()[:16]


def _read_index(folder: Path, stage: str) -> dict[str, Any]:
    path = folder / INDEX
    if not path.is_file():
        raise UserError(f"{folder} holds no encoded cache ({INDEX} missing); "
                        f"run the {stage} stage first (`dvc repro {stage}`)")
    return json.loads(path.read_text())


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
        latents_name, text_name = LATENT_CACHE_DIR.name, TEXT_CACHE_DIR.name
        latents = _read_index(self.folder / latents_name, "encode_latents")
        text = _read_index(self.folder / text_name, "encode_text")
        if not latents.get("samples"):
            raise UserError(f"the encoded cache in {self.folder} is empty: no training images; "
                            "check the filter stage's metrics/data.json")
        if (latents["base_model"], latents["base_model_commit"]) != (text["base_model"], text["base_model_commit"]):
            raise UserError(f"{self.folder}: the latents were encoded with {latents['base_model']} at "
                            f"{latents['base_model_commit']}, the text with {text['base_model']} at "
                            f"{text['base_model_commit']}; re-run both (`dvc repro -f encode_latents encode_text`)")
        missing = sorted({s["id"] for s in latents["samples"]} - set(text["captions"]))
        if missing:
            raise UserError(f"{self.folder}: training image {missing[0]} has latents but no caption embedding "
                            f"({len(missing)} such); re-run `dvc repro encode_text`")
        samples = [dict(s, shard=f"{latents_name}/{s['shard']}", caption_key=text["captions"][s["id"]])
                   for s in latents["samples"]]
        # One index as train reads it; its fingerprint covers both halves (so the training run hash does).
        self.index: dict[str, Any] = {
            **latents, "samples": samples,
            "fingerprint": fingerprint(latents["fingerprint"], text["fingerprint"]),
            "max_sequence_length": text["max_sequence_length"],
            "text": {key: f"{text_name}/{shard}" for key, shard in text["text"].items()},
        }
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
