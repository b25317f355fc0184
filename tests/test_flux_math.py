"""The training objective against the diffusers reference formula, computed independently here."""

import torch

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
