"""The training objective against the diffusers reference formula, computed independently here;
the timestep samplers as distributions (Kolmogorov-Smirnov against their CDFs)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from impressionist.flux_math import (MIN_WEIGHTING_SIGMA, TimestepSampling, flow_matching_loss,
                                     latent_image_ids, loss_weights, pack_latents, sample_sigmas)
from impressionist.models import load_transformer


def reference_loss(transformer, x, noise, sigmas, prompt_embeds, pooled, guidance):
    """train_dreambooth_lora_flux.py's loss, written out by hand (no impressionist code)."""
    b, c, h, w = x.shape
    noisy = (1.0 - sigmas[:, None, None, None]) * x + sigmas[:, None, None, None] * noise
    packed = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    pred = transformer(hidden_states=packed, timestep=sigmas, guidance=torch.full((b,), guidance),
                       pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                       txt_ids=torch.zeros(prompt_embeds.shape[1], 3), img_ids=ids.reshape(-1, 3),
                       return_dict=False)[0]
    pred = pred.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    target = noise - x
    return torch.mean(((pred - target) ** 2).reshape(b, -1), 1).mean()


def test_loss_matches_reference_formula(tiny_flux_dir):
    torch.manual_seed(0)
    transformer = load_transformer(tiny_flux_dir, torch.float32).eval()
    x = torch.randn(2, 16, 8, 6)
    noise = torch.randn_like(x)
    sigmas = torch.tensor([0.2, 0.9])
    prompt_embeds, pooled = torch.randn(2, 7, 32), torch.randn(2, 32)
    with torch.no_grad():
        ours = flow_matching_loss(transformer, x, noise, sigmas, prompt_embeds, pooled, 1.0)
        expected = reference_loss(transformer, x, noise, sigmas, prompt_embeds, pooled, 1.0)
        other_guidance = flow_matching_loss(transformer, x, noise, sigmas, prompt_embeds, pooled, 3.5)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(ours, other_guidance), "guidance must reach the transformer"


def test_packing_and_ids_follow_flux_layout():
    x = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).view(2, 16, 4, 6)
    packed = pack_latents(x)
    assert packed.shape == (2, 6, 64)
    # token (row 0, col 1) holds channel 0's 2x2 patch at rows 0-1, columns 2-3, first
    assert packed[0, 1, :4].tolist() == [x[0, 0, 0, 2].item(), x[0, 0, 0, 3].item(),
                                         x[0, 0, 1, 2].item(), x[0, 0, 1, 3].item()]
    ids = latent_image_ids(4, 6, "cpu", torch.float32)
    assert ids.tolist()[:4] == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0]]


def test_timestep_samplings_are_seeded_and_in_range():
    for method in ("logit_normal", "flux_shift", "mode", "uniform"):
        sampling = TimestepSampling(method)
        a = sample_sigmas(sampling, 512, 1024, torch.Generator().manual_seed(1))
        b = sample_sigmas(sampling, 512, 1024, torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
        assert a.min() > 0 and a.max() < 1, method


# Kolmogorov-Smirnov on N_DRAWS draws from a fixed generator: deterministic, so never flaky; ALPHA
# says how unlikely the accepted statistic would be if the sampler were right by chance.
N_DRAWS = 20_000
ALPHA = 1e-3


def draw(sampling: TimestepSampling, image_seq_len: int = 1024, seed: int = 0) -> np.ndarray:
    sigmas = sample_sigmas(sampling, N_DRAWS, image_seq_len, torch.Generator().manual_seed(seed))
    assert sigmas.shape == (N_DRAWS,)
    return sigmas.double().numpy()


def logit_normal_cdf(mean: float, std: float):
    """sigmoid(N(mean, std)): P(sigma <= x) = Phi((logit x - mean) / std)."""
    return lambda x: stats.norm.cdf((np.log(x) - np.log1p(-x) - mean) / std)


def mode_map(u, scale):
    """SD3's f_mode: sigma = 1 - u - s (cos^2(pi u / 2) - 1 + u) of u ~ U(0, 1)."""
    return 1 - u - scale * (np.cos(np.pi * u / 2) ** 2 - 1 + u)


def mode_cdf(scale: float):
    """f_mode falls from 1 to 0 (for -1 <= s <= 2/(pi-2)), so P(sigma <= x) = 1 - f_mode^-1(x),
    inverted here by bisection."""
    grid = np.linspace(0, 1, 10_001)
    assert np.all(np.diff(mode_map(grid, scale)) < 0), "f_mode must be decreasing at this scale"

    def cdf(x):
        lo, hi = np.zeros_like(x), np.ones_like(x)
        for _ in range(60):
            mid = (lo + hi) / 2
            right = mode_map(mid, scale) > x  # the root lies right of mid
            lo, hi = np.where(right, mid, lo), np.where(right, hi, mid)
        return 1 - (lo + hi) / 2
    return cdf


def flux_mu(image_seq_len: int) -> float:
    """FLUX.1-dev's shift: 0.5 at 256 tokens (256 px), 1.15 at 4096 (1024 px), linear in between."""
    return 0.5 + (1.15 - 0.5) * (image_seq_len - 256) / (4096 - 256)


# (sampling, image_seq_len, the CDF its docstring states)
DISTRIBUTIONS = {
    "logit_normal": (TimestepSampling("logit_normal"), 1024, logit_normal_cdf(0.0, 1.0)),
    "logit_normal(-0.5,1.5)": (TimestepSampling("logit_normal", logit_mean=-0.5, logit_std=1.5), 1024,
                                logit_normal_cdf(-0.5, 1.5)),
    "mode": (TimestepSampling("mode"), 1024, mode_cdf(1.29)),
    "mode(0.5)": (TimestepSampling("mode", mode_scale=0.5), 1024, mode_cdf(0.5)),
    "uniform": (TimestepSampling("uniform"), 1024, lambda x: x),
    # sigmoid(z) shifted by exp(mu) is sigmoid(z + mu): logit-normal with its mean moved by mu
    "flux_shift@256": (TimestepSampling("flux_shift"), 256, logit_normal_cdf(flux_mu(256), 1.0)),
    "flux_shift@1024": (TimestepSampling("flux_shift"), 1024, logit_normal_cdf(flux_mu(1024), 1.0)),
    "flux_shift@4096": (TimestepSampling("flux_shift"), 4096, logit_normal_cdf(flux_mu(4096), 1.0)),
    "flux_shift(0.3,0.7)@4096": (TimestepSampling("flux_shift", logit_mean=0.3, logit_std=0.7), 4096,
                                  logit_normal_cdf(0.3 + flux_mu(4096), 0.7)),
}


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_timestep_sampling_follows_its_distribution(name):
    sampling, seq_len, cdf = DISTRIBUTIONS[name]
    result = stats.kstest(draw(sampling, seq_len), cdf)
    assert result.pvalue > ALPHA, f"{name}: KS D={result.statistic:.4f} (n={N_DRAWS}), p={result.pvalue:.2g}"


@pytest.mark.parametrize("drawn", DISTRIBUTIONS)
def test_the_ks_test_tells_the_samplers_apart(drawn):
    """The test above has the power to notice a wrong sampler: each distribution's draws are rejected
    against every other distribution's CDF (uniform draws against the logit-normal CDF, and so on)."""
    sampling, seq_len, _ = DISTRIBUTIONS[drawn]
    sigmas = draw(sampling, seq_len)
    for other, (_, _, cdf) in DISTRIBUTIONS.items():
        if other != drawn:
            assert stats.kstest(sigmas, cdf).pvalue < ALPHA, f"draws of {drawn} pass as {other}"


def test_flux_shift_depends_on_the_resolution_alone():
    """The same generator state gives sigmoid(logit(u) + mu(seq_len)) at every size: a pure shift."""
    sampling = TimestepSampling("flux_shift")
    logit = {n: torch.logit(sample_sigmas(sampling, 64, n, torch.Generator().manual_seed(3)).double())
             for n in (256, 1024, 4096)}
    for n in (1024, 4096):
        shift = torch.full_like(logit[n], flux_mu(n) - flux_mu(256))
        torch.testing.assert_close(logit[n] - logit[256], shift, rtol=0, atol=1e-5)  # float32 sigmas


def test_flux_shift_moves_large_images_to_higher_noise():
    sampling = TimestepSampling("flux_shift")
    small = sample_sigmas(sampling, 4096, 256, torch.Generator().manual_seed(0))
    large = sample_sigmas(sampling, 4096, 4096, torch.Generator().manual_seed(0))
    assert large.mean() > small.mean() + 0.1


def test_latent_image_ids_are_built_once_per_bucket_shape_on_an_accelerator(monkeypatch):
    """diffusers builds the ids on the CPU and copies them to the device (a blocking copy on CUDA):
    the training loop must not do that every step. ("meta" stands in for the GPU here.)"""
    from diffusers import FluxPipeline

    from impressionist import flux_math

    real = FluxPipeline._prepare_latent_image_ids
    built = []
    monkeypatch.setattr(FluxPipeline, "_prepare_latent_image_ids",
                        staticmethod(lambda *args: (built.append((args[1:3], str(args[3]))), real(*args))[1]))
    flux_math._latent_image_ids.cache_clear()
    for _ in range(3):
        wide = latent_image_ids(8, 12, "meta", torch.float32)
    tall = latent_image_ids(12, 8, torch.device("meta"), torch.float32)
    assert built == [((4, 6), "meta"), ((6, 4), "meta")]
    assert wide.shape == (24, 3) and tall.shape == (24, 3) and wide.device.type == "meta"
    # on the CPU there is no copy to save: each call builds them (fake tensors of the estimate
    # benchmark must not outlive their mode in a cache)
    for _ in range(2):
        on_cpu = latent_image_ids(8, 12, "cpu", torch.float32)
    assert built[2:] == [((4, 6), "cpu")] * 2
    assert torch.equal(on_cpu, real(None, 4, 6, "cpu", torch.float32))


@pytest.fixture(scope="module")
def eval_transformer(tiny_flux_dir):
    return load_transformer(tiny_flux_dir, torch.float32).eval()


@pytest.mark.parametrize("weighting, formula", [
    ("none", lambda s: 1.0),
    ("sigma_sqrt", lambda s: s ** -2.0),  # diffusers' name for 1 / sigma^2
    ("cosmap", lambda s: 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))),
], ids=["none", "sigma_sqrt", "cosmap"])
def test_loss_weighting_equals_its_formula(eval_transformer, weighting, formula):
    """Each sample's squared error (the hand-written reference, one sample at a time) times the
    scheme's weight at its sigma, averaged over the batch. Moderate sigmas: the formulas' values."""
    torch.manual_seed(1)
    sigmas = [0.1, 0.3, 0.6, 0.9]
    x = torch.randn(len(sigmas), 16, 4, 4)
    noise = torch.randn_like(x)
    prompt_embeds, pooled = torch.randn(len(sigmas), 5, 32), torch.randn(len(sigmas), 32)
    with torch.no_grad():
        errors = [reference_loss(eval_transformer, x[i:i + 1], noise[i:i + 1], torch.tensor([s]),
                                 prompt_embeds[i:i + 1], pooled[i:i + 1], 1.0) for i, s in enumerate(sigmas)]
        ours = flow_matching_loss(eval_transformer, x, noise, torch.tensor(sigmas), prompt_embeds, pooled, 1.0,
                                  weighting=weighting)
    expected = sum(formula(s) * e for s, e in zip(sigmas, errors)) / len(sigmas)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    if weighting != "none":  # the weights are far from one at these sigmas: a test that can fail
        assert not torch.isclose(ours, sum(errors) / len(sigmas), rtol=1e-2)


def test_sigma_sqrt_weights_are_bounded_at_tiny_sigma():
    """uniform sampling draws sigma down to ~1e-6, where sigma ** -2 is ~1e12: the weighting sees sigma
    clamped to the reference scheduler's smallest noise level, so no weight exceeds 1e6."""
    sigmas = torch.tensor([7e-6, MIN_WEIGHTING_SIGMA, 0.5])
    torch.testing.assert_close(loss_weights("sigma_sqrt", sigmas), torch.tensor([1e6, 1e6, 4.0]))
    torch.testing.assert_close(loss_weights("none", sigmas), torch.ones(3))
    drawn = sample_sigmas(TimestepSampling("uniform"), 100_000, 1024, torch.Generator().manual_seed(0))
    assert drawn.min() < MIN_WEIGHTING_SIGMA  # the case this guards: uniform does reach below the bound
    assert loss_weights("sigma_sqrt", drawn).max() <= 1e6


def test_loss_with_sigma_sqrt_stays_finite_at_tiny_sigma(tiny_flux_dir):
    torch.manual_seed(0)
    transformer = load_transformer(tiny_flux_dir, torch.float32).eval()
    x, noise = torch.randn(2, 16, 8, 6), torch.randn(2, 16, 8, 6)
    prompt_embeds, pooled = torch.randn(2, 7, 32), torch.randn(2, 32)
    with torch.no_grad():
        tiny = flow_matching_loss(transformer, x, noise, torch.tensor([7e-6, 0.5]), prompt_embeds, pooled, 1.0,
                                  weighting="sigma_sqrt")
        plain = flow_matching_loss(transformer, x, noise, torch.tensor([7e-6, 0.5]), prompt_embeds, pooled, 1.0)
    # per-sample MSE is O(1): the weighted mean is at most (1e6 + 4) / 2 times the plain one
    assert torch.isfinite(tiny) and tiny <= plain * (1e6 + 4)
