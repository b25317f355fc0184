"""Images at fixed prompts and seeds during training, to watch the LoRA take hold.

Prompt embeddings are computed once before training (text encoders loaded, used and freed), so at
each validation only the small VAE sits beside the transformer being trained.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch

from .errors import UserError
from .models import encode_prompts, load_vae
from .params import ParamsSection, require_int, require_keys, require_multiple, require_positive

@dataclass(frozen=True)
class ValidationParams(ParamsSection):
    """params.yaml ``train.validation``: images every ``every`` steps (0: off); the other settings
    are needed only when it is on.

    Every setting is checked here, before training starts, not where it is first used (at step
    ``every``), so a mistake stops the run before any model loads, on every DDP rank alike.
    """

    SECTION: ClassVar[str] = "train.validation"
    every: int = 0
    prompts: list[str] | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    resolution: int | None = None

    def __post_init__(self) -> None:
        require_int(self.every, "train.validation.every")
        if not self.every:
            return
        # the settings after `every`: all needed once it is on
        needed = [f.name for f in fields(self) if f.name != "every"]
        require_keys({name: value for name in needed if (value := getattr(self, name)) is not None},
                     needed, self.SECTION)
        prompts = self.prompts
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) and p.strip() for p in prompts)):
            raise UserError("params.yaml: train.validation.every > 0 needs train.validation.prompts, "
                            "a list of non-empty prompts")
        require_int(self.seed, "train.validation.seed")
        require_int(self.steps, "train.validation.steps", minimum=1)
        require_positive(self.guidance_scale, "train.validation.guidance_scale", allow_zero=True)
        require_multiple(self.resolution, 16, "train.validation.resolution")


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
