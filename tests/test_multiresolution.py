"""Multi-resolution buckets: encode caches every image at each resolution, training draws one
(resolution, aspect) bucket per batch in the proportion train.resolution_mix sets."""

from __future__ import annotations

import copy
from collections import Counter
from fractions import Fraction

import pytest
import torch
from helpers import write_filtered_dataset

from impressionist import encode, train
from impressionist.batch_order import ResolutionMix
from impressionist.errors import UserError
from impressionist.latent_cache import CacheReader
from impressionist.params.data import EncodeParams
from impressionist.params.training import parse_mix

RESOLUTIONS = [32, 64]
# write_filtered_dataset's images are 96x96, 128x80 and 80x128 (4, 4 and 2 of the 10 training images)
EXPECTED_BUCKETS = {32: [[32, 32], [32, 48], [48, 32]], 64: [[48, 80], [64, 64], [80, 48]]}


@pytest.fixture(scope="module")
def multires_cache(tmp_path_factory, _demo_params_master, tiny_flux_dir):
    root = tmp_path_factory.mktemp("multires")
    filtered, captions = write_filtered_dataset(root)
    params = copy.deepcopy(_demo_params_master)
    params["encode"]["resolution"] = RESOLUTIONS
    encode.run(params, filtered, captions, root / "cache")
    return root / "cache"


def test_every_image_is_cached_at_each_resolution_with_its_own_buckets(multires_cache):
    cache = CacheReader(multires_cache)
    by_resolution = {r: [s for s in cache.samples if s["resolution"] == r] for r in RESOLUTIONS}
    ids = {r: sorted(s["id"] for s in samples) for r, samples in by_resolution.items()}
    assert len(ids[32]) == 10 and ids[32] == ids[64]  # each training image once per resolution
    for resolution, samples in by_resolution.items():
        assert sorted({tuple(s["bucket"]) for s in samples}) == [tuple(b) for b in EXPECTED_BUCKETS[resolution]]
        for sample in samples:
            height, width = sample["bucket"]
            assert cache.latent(sample).shape == (16, height // 8, width // 8)
            assert 0.5 <= height * width / resolution**2 <= 1.5  # about resolution^2 pixels
    summary = cache.index["resolutions"]
    assert {r: (v["latents"], v["buckets"]) for r, v in summary.items()} == {
        str(r): (10, EXPECTED_BUCKETS[r]) for r in RESOLUTIONS}
    # cache size per resolution: 16 float32 channels per latent pixel
    expected_mib = sum(16 * h * w // 64 * 4 for s in by_resolution[64] for h, w in [s["bucket"]]) / 2**20
    assert summary["64"]["mib"] == pytest.approx(expected_mib, abs=1e-3)
    assert summary["64"]["mib"] > summary["32"]["mib"]


def _resolution_of(latents: torch.Tensor) -> int:
    bucket = [latents.shape[2] * 8, latents.shape[3] * 8]
    return next(r for r, buckets in EXPECTED_BUCKETS.items() if bucket in buckets)


def _trained_buckets(params, cache, tmp_path, monkeypatch) -> list[tuple[int, tuple[int, int]]]:
    """(resolution, bucket) of every micro-batch the real trainer trains on, in order."""
    seen = []
    real_loss = train.flow_matching_loss

    def recording_loss(transformer, **batch):
        latents = batch["latents"]
        seen.append((_resolution_of(latents), (latents.shape[2] * 8, latents.shape[3] * 8)))
        return real_loss(transformer, **batch)

    monkeypatch.setattr(train, "flow_matching_loss", recording_loss)
    monkeypatch.chdir(tmp_path)
    train.run(params, cache, lora_dir=tmp_path / "lora", checkpoint_dir=tmp_path / "ckpt",
              metrics_path=tmp_path / "train.json", loss_plot=tmp_path / "loss.png",
              live_dir=tmp_path / "live", log_dir=tmp_path / "logs")
    return seen


def test_training_visits_every_bucket_in_the_configured_proportion(demo_params, multires_cache, tmp_path,
                                                                   monkeypatch):
    # batch 4 over 4+4+2 images: 3 batches per resolution, 6 per mix epoch; 1:3 is then 1.5 and 4.5
    # batches an epoch, so after 8 epochs (48 micro-batches) exactly 12 and 36.
    params = demo_params
    params["train"].update(max_steps=48, gradient_accumulation_steps=1, batch_size=4, checkpoint_every=0,
                           resolution_mix={32: 1, 64: 3}, log_every=48)
    params["train"]["validation"]["every"] = 0
    seen = _trained_buckets(params, multires_cache, tmp_path, monkeypatch)
    assert len(seen) == 48
    assert Counter(r for r, _ in seen) == {32: 12, 64: 36}
    assert sorted(set(seen)) == sorted((r, tuple(b)) for r, buckets in EXPECTED_BUCKETS.items() for b in buckets)
    # the order is shuffled across resolutions, not one resolution after the other
    assert {r for r, _ in seen[:12]} == {32, 64}


def test_an_empty_mix_sees_each_image_once_per_resolution_per_epoch(multires_cache):
    cache = CacheReader(multires_cache)
    order = ResolutionMix(cache.samples, batch_size=3, seed=5, mix=parse_mix({}))
    epoch = [i for k in range(order.batches_per_epoch) for i in order[k]]
    assert sorted(epoch) == list(range(len(cache.samples)))  # every (image, resolution) latent once
    for k in range(order.batches_per_epoch):
        assert len({(cache.samples[i]["resolution"], tuple(cache.samples[i]["bucket"])) for i in order[k]}) == 1
    assert order.share() == {32: 0.5, 64: 0.5}


def test_the_mix_is_exact_at_every_epoch_boundary_and_a_pure_function_of_the_micro_batch():
    samples = ([{"bucket": [32, 32], "resolution": 32}] * 7 + [{"bucket": [64, 64], "resolution": 64}] * 5
               + [{"bucket": [48, 80], "resolution": 64}] * 2 + [{"bucket": [96, 96], "resolution": 96}] * 3)
    mix = parse_mix({"32": 2, 64: 0.5, 96: 1.5})  # string keys: as `dvc exp run -S` may give them
    order = ResolutionMix(samples, batch_size=2, seed=1, mix=mix)
    share = {32: Fraction(1, 2), 64: Fraction(1, 8), 96: Fraction(3, 8)}
    counts, k = Counter(), 0
    for epoch in range(1, 30):
        while k < order._start(epoch):
            counts[samples[order[k][0]]["resolution"]] += 1
            k += 1
        for resolution, fraction in share.items():
            assert abs(counts[resolution] - fraction * k) <= 0.5 + 1e-9, (epoch, counts, k)
    # any micro-batch alone (a resumed run, a data-loader worker) gives the same batch
    fresh = ResolutionMix(samples, batch_size=2, seed=1, mix=mix)
    assert [fresh[j] for j in (k - 1, 0, 57, 3)] == [order[j] for j in (k - 1, 0, 57, 3)]
    other_seed = ResolutionMix(samples, batch_size=2, seed=2, mix=mix)
    assert [other_seed[j] for j in range(20)] != [order[j] for j in range(20)]


def test_a_mix_that_names_an_uncached_resolution_stops_before_any_model_loads(demo_params, multires_cache,
                                                                              tmp_path, monkeypatch):
    monkeypatch.setattr(train, "base_model_of_cache", lambda *a, **k: pytest.fail("model resolved"))
    demo_params["train"]["resolution_mix"] = {32: 1, 1024: 1}
    with pytest.raises(UserError, match=r"names \[1024\], which the encode cache does not hold") as err:
        _trained_buckets(demo_params, multires_cache, tmp_path, monkeypatch)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value, message", [
    ({32: -1}, "must be a number >= 0"),
    ({"big": 1}, "must be a resolution"),
    ({32: 0}, "weight 0"),
    ([32, 64], "must be a mapping"),
])
def test_bad_mixes_are_refused(value, message):
    with pytest.raises(UserError, match=message):
        parse_mix(value)


@pytest.mark.parametrize("resolution, message", [([], "at least one"), ([64, 40], "multiple of 16"),
                                                  ([64, 64], "twice")])
def test_bad_resolution_lists_are_refused(demo_params, resolution, message):
    with pytest.raises(UserError, match=message):
        EncodeParams.of({**demo_params["encode"], "resolution": resolution})
