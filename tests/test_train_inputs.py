"""What the trainer actually feeds the transformer and the loss, for each ``train.*`` input of that
kind: caption dropout, the guidance value, the timestep sampler and its params, the loss weighting.

Each test runs the real ``train.run`` on the tiny model and records every call of the transformer
with a forward pre-hook (its keyword inputs: the noise levels, the guidance, the prompt embeddings),
so a param that is read but never passed on, or passed on wrong, fails here. Nothing of the
trainer's own code is re-implemented: the expected values come from the params and the cache.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from test_flux_math import logit_normal_cdf, mode_cdf

from impressionist import train
from impressionist.latent_cache import EMPTY_CAPTION_KEY, CacheReader

ALPHA = 1e-3  # KS-test level: the right law must pass at it, the wrong one must fail


class Calls:
    """The keyword inputs of every transformer forward during a training run."""

    def __init__(self) -> None:
        self.inputs: list[dict[str, torch.Tensor]] = []

    def hook(self, module, args, kwargs):
        self.inputs.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    def cat(self, name: str) -> torch.Tensor:
        return torch.cat([c[name] for c in self.inputs])


def recorded_run(params: dict, cache, root, monkeypatch, **train_changes) -> tuple[Calls, dict]:
    """``train.run`` with ``train_changes``; (the transformer calls, the run's summary)."""
    params["train"].update(checkpoint_every=0, gradient_accumulation_steps=1, **train_changes)
    params["train"]["validation"]["every"] = 0
    params["train"]["report_to"] = []
    calls = Calls()
    build = train.build_transformer

    def hooked(*args, **kwargs):
        transformer = build(*args, **kwargs)
        transformer.register_forward_pre_hook(calls.hook, with_kwargs=True)
        return transformer

    monkeypatch.setattr(train, "build_transformer", hooked)
    monkeypatch.chdir(root)
    summary = train.run(params, cache, lora_dir=root / "lora", checkpoint_dir=root / "ckpt",
                        metrics_path=root / "train.json", loss_plot=root / "loss.png",
                        live_dir=root / "dvclive", log_dir=root / "logs")
    assert len(calls.inputs) == params["train"]["max_steps"]  # one micro-batch per step
    return calls, summary


def empty_caption_flags(calls: Calls, cache_dir) -> list[bool]:
    """Per trained sample: was it fed the empty caption's embeddings?"""
    empty, _ = CacheReader(cache_dir).text(EMPTY_CAPTION_KEY)
    return [torch.equal(row, empty.to(row.dtype)) for row in calls.cat("encoder_hidden_states")]


@pytest.fixture(scope="module")
def long_run(tmp_path_factory, _demo_params_master, encoded_cache):
    """One run of 50 steps x 4 samples with caption dropout 0.5, guidance 3.5 and a logit-normal
    sampler away from its defaults."""
    import copy

    root = tmp_path_factory.mktemp("long-run")
    with pytest.MonkeyPatch.context() as patch:
        calls, _ = recorded_run(copy.deepcopy(_demo_params_master), encoded_cache, root, patch, max_steps=50,
                                batch_size=4, caption_dropout=0.5, guidance_scale=3.5,
                                timestep_sampling="logit_normal", logit_mean=1.0, logit_std=0.5)
    return calls


def test_half_the_samples_get_the_empty_caption_at_dropout_one_half(long_run, encoded_cache):
    flags = empty_caption_flags(long_run, encoded_cache)
    n, dropped = len(flags), sum(flags)
    assert n >= 150
    # Binomial(n, 0.5): 4 standard deviations either side (p ~ 6e-5 of a false alarm)
    assert abs(dropped - n / 2) <= 4 * math.sqrt(n * 0.25), (dropped, n)


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_caption_dropout_zero_never_and_one_always_drops(demo_params, encoded_cache, tmp_path, monkeypatch,
                                                         dropout):
    calls, _ = recorded_run(demo_params, encoded_cache, tmp_path, monkeypatch, max_steps=5, batch_size=4,
                            caption_dropout=dropout)
    flags = empty_caption_flags(calls, encoded_cache)
    assert len(flags) >= 10 and set(flags) == {bool(dropout)}


def test_the_guidance_scale_reaches_the_transformer(long_run):
    guidance = long_run.cat("guidance")
    assert guidance.numel() == long_run.cat("timestep").numel()
    assert torch.all(guidance == 3.5), guidance.unique()


def test_the_logit_normal_params_shape_the_noise_levels(long_run):
    sigmas = long_run.cat("timestep").double().numpy()
    assert stats.kstest(sigmas, logit_normal_cdf(1.0, 0.5)).pvalue > ALPHA
    for wrong in ((0.0, 1.0), (1.0, 1.0), (0.0, 0.5)):  # a param dropped on the way
        assert stats.kstest(sigmas, logit_normal_cdf(*wrong)).pvalue < ALPHA, wrong


def test_the_style_sampler_is_the_one_trained_with(demo_params, encoded_cache, tmp_path, monkeypatch):
    calls, _ = recorded_run(demo_params, encoded_cache, tmp_path, monkeypatch, max_steps=40, batch_size=4,
                            timestep_sampling="style")
    sigmas = calls.cat("timestep").double().numpy()
    style_cdf = lambda x: 1 - (1 - x) ** (1 / 3)  # noqa: E731  P(1 - u^3 <= x)
    assert stats.kstest(sigmas, style_cdf).pvalue > ALPHA
    assert stats.kstest(sigmas, logit_normal_cdf(0.0, 1.0)).pvalue < ALPHA
    assert stats.kstest(sigmas, "uniform").pvalue < ALPHA


def test_the_mode_scale_reaches_the_sampler(demo_params, encoded_cache, tmp_path, monkeypatch):
    # mode_scale 0 makes SD3's mode sampler uniform; the default 1.29 crowds the middle
    calls, _ = recorded_run(demo_params, encoded_cache, tmp_path, monkeypatch, max_steps=100, batch_size=4,
                            timestep_sampling="mode", mode_scale=0.0)
    sigmas = calls.cat("timestep").double().numpy()
    assert stats.kstest(sigmas, mode_cdf(0.0)).pvalue > ALPHA
    assert stats.kstest(sigmas, mode_cdf(1.29)).pvalue < ALPHA


@pytest.mark.parametrize("weighting, weight", [
    ("sigma_sqrt", lambda s: s ** -2.0),
    ("cosmap", lambda s: 2.0 / (math.pi * (1 - 2 * s + 2 * s ** 2))),
])
def test_the_loss_weighting_weights_the_logged_loss(demo_params, encoded_cache, tmp_path, monkeypatch,
                                                    weighting, weight):
    # One sample, one step: the LoRA starts at zero, so the unweighted and the weighted run see the
    # same prediction and the same target, and their first losses differ by the weight at the sigma
    # the transformer was given.
    runs = {}
    for name in ("none", weighting):
        root = tmp_path / name
        root.mkdir()
        with monkeypatch.context() as patch:
            runs[name] = recorded_run(__import__("copy").deepcopy(demo_params), encoded_cache, root, patch,
                                      max_steps=1, batch_size=1, log_every=1, loss_weighting=name)
    (sigma_none,), (sigma,) = runs["none"][0].cat("timestep").tolist(), runs[weighting][0].cat("timestep").tolist()
    assert sigma == sigma_none and sigma > 1e-3
    ratio = runs[weighting][1]["final_loss"] / runs["none"][1]["final_loss"]
    assert ratio == pytest.approx(weight(sigma), rel=1e-4)
    assert abs(ratio - 1) > 1e-3  # the weight is not one at this sigma


def test_a_buckets_images_are_batched_together_differently_every_epoch():
    """Each epoch reshuffles a bucket's images before cutting it into batches, so one image is not
    always trained beside the same others (a shuffle of whole batches alone would keep them)."""
    from impressionist.batch_order import BucketBatches

    samples = [{"bucket": [64, 64]}] * 6
    order = BucketBatches(samples, batch_size=2, seed=3)
    compositions = {frozenset(map(frozenset, order.epoch(e))) for e in range(6)}
    assert len(compositions) >= 3, compositions
