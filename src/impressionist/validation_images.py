"""Images at fixed prompts and seeds during training, to watch the LoRA take hold.

Prompt embeddings are computed once before training (text encoders loaded, used and freed), so at
each validation only the small VAE sits beside the transformer being trained.
"""

from __future__ import annotations

import numpy as np
import torch

from .models import encode_prompts, load_vae
from .params.training import ValidationParams


class ValidationSampler:
    """Images of the transformer being trained at the ``train.validation`` prompts and seed."""

    def __init__(self, cfg: ValidationParams, model_folder: str, dtype: torch.dtype, device: torch.device,
                 max_sequence_length: int):
        self.cfg, self.folder, self.dtype, self.device = cfg, model_folder, dtype, device
        batches = list(encode_prompts(model_folder, dtype, device, cfg.prompts, max_sequence_length))
        self.embeds = torch.cat([embeds for embeds, _ in batches])
        self.pooled = torch.cat([pooled for _, pooled in batches])
        self.vae = None

    @torch.no_grad()
    def images(self, transformer) -> list[np.ndarray]:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        if self.vae is None:
            self.vae = load_vae(self.folder, self.dtype).to(self.device)
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(self.folder, subfolder="scheduler"),
            vae=self.vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        was_training = transformer.training
        transformer.eval()
        out = []
        for embeds, pooled in zip(self.embeds, self.pooled):
            out.append(pipe(
                prompt_embeds=embeds[None].to(self.device, self.dtype),
                pooled_prompt_embeds=pooled[None].to(self.device, self.dtype),
                height=self.cfg.resolution, width=self.cfg.resolution,
                num_inference_steps=self.cfg.steps, guidance_scale=self.cfg.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(self.cfg.seed),
                output_type="np").images[0])
        transformer.train(was_training)
        return [(image * 255).round().astype(np.uint8) for image in out]
