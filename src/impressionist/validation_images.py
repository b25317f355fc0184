"""Images at fixed prompts and seeds during training, to watch the LoRA take hold.

Prompt embeddings are computed once before training (text encoders loaded, used and freed), so at
each validation only the small VAE sits beside the transformer being trained.
"""

from __future__ import annotations

import gc
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .models import load_text_pipeline, load_vae


class ValidationSampler:
    def __init__(self, cfg: dict[str, Any], model_folder: str, dtype: torch.dtype, device: torch.device,
                 max_sequence_length: int):
        self.cfg, self.folder, self.dtype, self.device = cfg, model_folder, dtype, device
        prompts = cfg.get("prompts") or []
        if not prompts:
            raise UserError("train.validation.every > 0 needs train.validation.prompts")
        if cfg["resolution"] % 16:
            raise UserError(f"train.validation.resolution={cfg['resolution']} must be a multiple of 16")
        pipe = load_text_pipeline(model_folder, dtype).to(device)
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                                   max_sequence_length=max_sequence_length)
        self.embeds, self.pooled = embeds.cpu(), pooled.cpu()
        del pipe
        gc.collect()
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
                height=self.cfg["resolution"], width=self.cfg["resolution"],
                num_inference_steps=self.cfg["steps"], guidance_scale=self.cfg["guidance_scale"],
                generator=torch.Generator("cpu").manual_seed(int(self.cfg["seed"])),
                output_type="np").images[0])
        transformer.train(was_training)
        return [(image * 255).round().astype(np.uint8) for image in out]
