"""Which cached samples make up each training micro-batch: one (resolution, aspect) bucket per
batch, resolutions mixed in a configured proportion.

Every order here is a pure function of the seed and the micro-batch number, so a resumed run, any
number of data-loader workers and any number of DDP ranks see exactly the batches an uninterrupted
single-process run would.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache
from typing import Any

import torch

from .errors import UserError


class BucketBatches:
    """Batches drawn within one aspect bucket, in an order that is a pure function of
    (seed, epoch): a resumed run sees exactly the batches the interrupted one would have."""

    def __init__(self, samples: list[dict[str, Any]], batch_size: int, seed: int):
        self.batch_size, self.seed = batch_size, seed
        self.by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, sample in enumerate(samples):
            self.by_bucket.setdefault(tuple(sample["bucket"]), []).append(i)
        self.batches_per_epoch = sum(math.ceil(len(v) / batch_size) for v in self.by_bucket.values())

    @lru_cache(maxsize=2)
    def epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for bucket in sorted(self.by_bucket):
            members = self.by_bucket[bucket]
            order = [members[i] for i in torch.randperm(len(members), generator=generator)]
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator)]

    def __getitem__(self, micro_batch: int) -> list[int]:
        epoch, position = divmod(micro_batch, self.batches_per_epoch)
        return self.epoch(epoch)[position]


def sample_resolution(sample: dict[str, Any], default: int = 0) -> int:
    """The encode resolution a cached sample belongs to (caches of one resolution may not say)."""
    return int(sample.get("resolution", default))


class ResolutionMix:
    """The micro-batch order over a cache of several resolutions.

    Each resolution has its own :class:`BucketBatches` stream (every image once per stream epoch).
    Resolution ``r`` of weight share ``w_r`` (weights normalised over the positive ones) has taken
    exactly ``round(w_r * B * e)`` batches after ``e`` mix epochs, where ``B`` is the number of
    batches of one epoch of every used resolution; within a mix epoch the batches are shuffled. So
    the proportions hold to half a batch at every epoch boundary, and with ``mix`` ``{}`` every
    image is seen once per resolution per epoch. A resolution of weight 0 (or missing from a
    non-empty ``mix``) is not trained on.
    """

    def __init__(self, samples: list[dict[str, Any]], batch_size: int, seed: int,
                 mix: dict[int, Fraction] | None = None, default_resolution: int = 0):
        members: dict[int, list[int]] = {}
        for i, sample in enumerate(samples):
            members.setdefault(sample_resolution(sample, default_resolution), []).append(i)
        mix = mix or {}
        unknown = sorted(set(mix) - set(members))
        if unknown:
            raise UserError(f"train.resolution_mix names {unknown}, which the encode cache does not hold "
                            f"(it has {sorted(members)}); add them to encode.resolution or change the mix")
        used = sorted(r for r in members if not mix or mix.get(r, 0) > 0)
        self.seed = seed
        self.members = {r: members[r] for r in used}
        # each resolution's stream has its own seed, so equal buckets at two resolutions differ in order
        self.streams = {r: BucketBatches([samples[i] for i in members[r]], batch_size, seed * 10_007 + r)
                        for r in used}
        self.batches_per_epoch = sum(s.batches_per_epoch for s in self.streams.values())
        weights = {r: Fraction(self.streams[r].batches_per_epoch) if not mix else mix[r] for r in used}
        total = sum(weights.values())
        # batches of resolution r per mix epoch (a Fraction: exact arithmetic, same on every machine)
        self.rate = {r: weights[r] / total * self.batches_per_epoch for r in used}

    def share(self) -> dict[int, float]:
        """Each used resolution's share of the micro-batches."""
        return {r: float(rate / self.batches_per_epoch) for r, rate in self.rate.items()}

    def _taken(self, resolution: int, epoch: int) -> int:
        """Batches of ``resolution`` in mix epochs ``0 .. epoch - 1``."""
        return round(self.rate[resolution] * epoch)

    def _start(self, epoch: int) -> int:
        """The first micro-batch of ``epoch``."""
        return sum(self._taken(r, epoch) for r in self.streams)

    @lru_cache(maxsize=2)
    def epoch(self, epoch: int) -> list[list[int]]:
        if len(self.streams) == 1:  # one resolution: its stream's epoch, as a one-resolution cache has
            (resolution, stream), = self.streams.items()
            return [[self.members[resolution][i] for i in batch] for batch in stream.epoch(epoch)]
        batches = []
        for resolution, stream in self.streams.items():
            for position in range(self._taken(resolution, epoch), self._taken(resolution, epoch + 1)):
                batches.append([self.members[resolution][i] for i in stream[position]])
        generator = torch.Generator().manual_seed(self.seed * 1_000_033 + epoch)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator)]

    def __getitem__(self, micro_batch: int) -> list[int]:
        epoch = micro_batch // self.batches_per_epoch  # epochs differ in length by rounding only:
        while self._start(epoch) > micro_batch:      # step to the epoch that holds micro_batch
            epoch -= 1
        while self._start(epoch + 1) <= micro_batch:
            epoch += 1
        return self.epoch(epoch)[micro_batch - self._start(epoch)]
