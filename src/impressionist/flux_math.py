"""The FLUX.1 rectified-flow training objective, as diffusers' Flux LoRA script computes it.

Reference: diffusers ``examples/dreambooth/train_dreambooth_lora_flux.py``. Latents are the VAE's
``(latent - shift_factor) * scaling_factor``; they are packed into 2x2 patches, noised as
``(1 - sigma) * x + sigma * noise`` and the transformer predicts the velocity ``noise - x`` given
the timestep ``sigma`` (the pipeline's ``t / 1000``) and, for FLUX.1-dev, a guidance embedding.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

# The smallest noise level the loss weighting sees. diffusers' reference script draws sigma from the
# scheduler's grid t / num_train_timesteps, t = 1..1000 (FlowMatchEulerDiscreteScheduler), so its
# sigma_sqrt weights (sigma ** -2) stay <= 1e6; our continuous sigmas reach ~1e-6 under `uniform`
# sampling, where sigma ** -2 (~1e12) would let one sample swamp the batch.
MIN_WEIGHTING_SIGMA = 1e-3


@dataclass(frozen=True)
class TimestepSampling:
    method: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # FLUX.1-dev scheduler values for the resolution-dependent shift (flux_shift only).
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens, exactly as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def latent_image_ids(latent_height: int, latent_width: int, device, dtype) -> torch.Tensor:
    """Position ids (row, column) of the packed latent tokens, shape (H/2 * W/2, 3).

    On an accelerator they are made once per bucket shape: diffusers builds them on the CPU and
    copies them over with a blocking copy, which in every training step would make the host wait
    for the GPU. CPU tensors are built each time (no copy; and fake tensors must not be cached).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return FluxPipeline._prepare_latent_image_ids(None, latent_height // 2, latent_width // 2, device, dtype)
    return _latent_image_ids(latent_height // 2, latent_width // 2, device, dtype)


@functools.lru_cache(maxsize=64)
def _latent_image_ids(rows: int, columns: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return FluxPipeline._prepare_latent_image_ids(None, rows, columns, device, dtype)


def text_ids(seq_len: int, device, dtype) -> torch.Tensor:
    """Text tokens all sit at position zero in FLUX's 3-axis RoPE."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)


def style_sigmas(batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise levels biased toward high noise for style training: ``sigma = 1 - u**3``, u ~ U[0, 1).

    This is the cubic timestep sampling of T2I-Adapter (Mou et al. 2023, section 3.4), as diffusers'
    ``train_t2i_adapter_sdxl.py`` writes it (``timesteps = (1 - u**3) * num_train_timesteps``):
    global structure and style form at the early, noisy timesteps. It is in the spirit of
    ostris/ai-toolkit's ``content_or_style: style``, which (from memory of its trainer; its source
    could not be checked when this was written) draws the same cubic ``(1 - u**3)`` but as an index
    into its scheduler's timestep table, clamped to its min/max noise steps (``content``: ``u**3``).
    How that index maps to noise depends on the scheduler's table, so no claim of equality is made:
    this is a documented high-noise bias in sigma space.

    Distribution: P(sigma <= s) = 1 - (1 - s)**(1/3); mean 3/4, median 7/8, P(sigma > 1/2) = 0.79
    (uniform: 1/2, 1/2, 0.5). sigma lies in (0, 1] (1 only when u is exactly 0).
    """
    u = torch.rand((batch_size,), generator=generator)
    return 1.0 - u ** 3


def sample_sigmas(sampling: TimestepSampling, batch_size: int, image_seq_len: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise levels in (0, 1) for one batch, drawn with ``generator`` (on CPU, for determinism).

    Their distributions (tests/test_flux_math.py checks each against its CDF):
    ``logit_normal``: sigmoid(N(logit_mean, logit_std)); ``uniform``: U(0, 1); ``mode`` (SD3):
    1 - u - mode_scale * (cos^2(pi u / 2) - 1 + u) of u ~ U(0, 1); ``flux_shift``:
    sigmoid(N(logit_mean + mu, logit_std)), mu rising linearly from base_shift at base_seq_len
    tokens to max_shift at max_seq_len; ``style``: 1 - u^3 (:func:`style_sigmas`).
    """
    if sampling.method == "style":
        return style_sigmas(batch_size, generator)
    if sampling.method == "flux_shift":
        # FLUX.1's inference shift: larger images spend more of training at high noise.
        u = torch.sigmoid(torch.normal(sampling.logit_mean, sampling.logit_std, (batch_size,),
                                       generator=generator))
        mu = calculate_shift(image_seq_len, sampling.base_seq_len, sampling.max_seq_len,
                             sampling.base_shift, sampling.max_shift)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    return compute_density_for_timestep_sampling(
        sampling.method, batch_size, logit_mean=sampling.logit_mean, logit_std=sampling.logit_std,
        mode_scale=sampling.mode_scale, generator=generator)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1.0 - s) * latents + s * noise


def loss_weights(weighting: str, sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' SD3 loss weights per sample, at sigma clamped to ``MIN_WEIGHTING_SIGMA`` (the noise
    itself is not clamped). "none" gives weights of one (diffusers' fallback for any other name)."""
    return compute_loss_weighting_for_sd3(weighting, sigmas=sigmas.clamp(min=MIN_WEIGHTING_SIGMA)).float()


def flow_matching_loss(transformer, latents: torch.Tensor, noise: torch.Tensor,
                       sigmas: torch.Tensor, prompt_embeds: torch.Tensor,
                       pooled_prompt_embeds: torch.Tensor, guidance_scale: float | None,
                       weighting: str = "none") -> torch.Tensor:
    """Weighted MSE between the transformer's velocity and ``noise - latents`` (scalar)."""
    b, _, h, w = latents.shape
    model = getattr(transformer, "module", transformer)  # config and dtype live on the unwrapped model (DDP)
    dtype = model.dtype
    device = latents.device
    model_input = pack_latents(noisy_latents(latents, noise, sigmas))
    guidance = None
    if model.config.guidance_embeds:
        guidance = torch.full((b,), float(guidance_scale), device=device, dtype=torch.float32)
    prediction = transformer(
        hidden_states=model_input.to(dtype),
        timestep=sigmas.to(device=device, dtype=dtype),
        guidance=guidance,
        pooled_projections=pooled_prompt_embeds.to(dtype),
        encoder_hidden_states=prompt_embeds.to(dtype),
        txt_ids=text_ids(prompt_embeds.shape[1], device, dtype),
        img_ids=latent_image_ids(h, w, device, dtype),
        return_dict=False,
    )[0]
    # Packing is a permutation of elements, so the loss is the same as in unpacked space.
    target = pack_latents(noise - latents)
    weights = loss_weights(weighting, sigmas.to(device))
    per_sample = ((prediction.float() - target.float()) ** 2).reshape(b, -1).mean(dim=1)
    return (weights * per_sample).mean()
