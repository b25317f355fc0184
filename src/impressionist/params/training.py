"""The ``lora``, ``train`` and ``train.validation`` sections and the choices they offer (LoRA target
presets, optimizers, schedulers, timestep samplers, loss weightings). No torch."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Any, ClassVar

from ..errors import UserError
from . import ParamsSection, operational, require_choice, require_int, require_keys, require_multiple, require_positive
from .model import EVERY_GPU, check_split

TIMESTEP_SAMPLINGS = ("logit_normal", "flux_shift", "mode", "uniform", "style")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def check_decay(decay: Any) -> float:
    """``train.ema_decay`` (checked by ``TrainParams``): 0 = no EMA; otherwise in (0, 1)."""
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or math.isnan(decay) or not 0 <= decay < 1:
        raise UserError(f"params.yaml: train.ema_decay={decay!r} must be in [0, 1) (0 = no EMA; "
                        "ai-toolkit's FLUX LoRA default is 0.99)")
    return float(decay)


def parse_mix(mix: Any, name: str = "train.resolution_mix") -> dict[int, Fraction]:
    """``{resolution: weight}`` from params (YAML or `dvc exp run -S` may give keys as strings);
    ``{}``/None: every cached resolution in proportion to its batches. Checks needing no cache."""
    if mix in (None, {}):
        return {}
    if not isinstance(mix, dict):
        raise UserError(f"params.yaml: {name}={mix!r} must be a mapping resolution: weight, e.g. "
                        "{512: 1, 768: 1, 1024: 2}, or {} (each cached resolution once per epoch)")
    parsed = {}
    for key, weight in mix.items():
        try:
            resolution = int(key)
        except (TypeError, ValueError):
            raise UserError(f"params.yaml: {name} key {key!r} must be a resolution (an integer)") from None
        # a Fraction: a mix parse_mix already read (TrainParams keeps it parsed)
        number = isinstance(weight, (int, float, Fraction)) and not isinstance(weight, bool)
        if not number or weight < 0 or math.isnan(weight):
            raise UserError(f"params.yaml: {name}[{key}]={weight!r} must be a number >= 0")
        parsed[resolution] = Fraction(weight)
    if not any(parsed.values()):
        raise UserError(f"params.yaml: {name} gives every resolution weight 0; give one a positive weight")
    return parsed


OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")


# diffusers' get_scheduler names (piecewise_constant needs step rules we do not expose).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                 "polynomial")


PRODIGY_MIN_LR = 0.1  # Prodigy estimates the step size itself; its lr is a multiplier around 1.0


MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


TRACKERS = ("dvclive", "tensorboard")


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


@dataclass(frozen=True)
class TrainParams(ParamsSection):
    """params.yaml ``train``: every check that needs neither this machine nor a checkpoint (those
    are ``train.check_machine`` and ``train.check_resume_from``)."""

    SECTION: ClassVar[str] = "train"
    seed: int
    max_steps: int
    batch_size: int
    gradient_accumulation_steps: int  # micro-batches per optimizer step over all processes
    learning_rate: float
    lr_scheduler: str
    lr_warmup_steps: int
    optimizer: str
    adam_weight_decay: float
    max_grad_norm: float  # 0: no clipping
    mixed_precision: str
    gradient_checkpointing: bool = operational()  # recomputes activations with the same RNG state
    guidance_scale: float
    timestep_sampling: str
    logit_mean: float
    logit_std: float
    mode_scale: float
    loss_weighting: str
    caption_dropout: float
    checkpoint_every: int = operational()  # 0: no checkpoints
    keep_checkpoints: int = operational()
    log_every: int = operational()
    base_quantization: str = "none"
    compile: bool = operational(default=False)  # the same maths, up to float rounding
    attention_backend: str = operational(default="native")  # likewise: a resumed run may switch
    dataloader_workers: int = operational(default=0)
    num_processes: int = operational(default=EVERY_GPU)  # any count trains the same LoRA
    ema_decay: float = 0.0  # 0: no EMA
    # {resolution: weight}, as parse_mix reads it; {}: each cached resolution once per epoch
    resolution_mix: dict[int, Fraction] | None = None
    report_to: list[str] = operational(default_factory=lambda: list(TRACKERS))
    resume_from: str | None = operational(default=None)
    validation: ValidationParams = operational(default_factory=ValidationParams)

    def __post_init__(self) -> None:
        require_int(self.seed, "train.seed")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every", "keep_checkpoints"):
            require_int(getattr(self, name), f"train.{name}", minimum=1)
        for name in ("checkpoint_every", "lr_warmup_steps", "dataloader_workers", "num_processes"):
            require_int(getattr(self, name), f"train.{name}")
        require_positive(self.learning_rate, "train.learning_rate")
        require_positive(self.adam_weight_decay, "train.adam_weight_decay", allow_zero=True)
        require_positive(self.max_grad_norm, "train.max_grad_norm", allow_zero=True)
        require_positive(self.logit_std, "train.logit_std")
        require_positive(self.guidance_scale, "train.guidance_scale", allow_zero=True)
        self._set("ema_decay", check_decay(self.ema_decay))
        self._set("resolution_mix", parse_mix(self.resolution_mix))
        require_choice(self.lr_scheduler, LR_SCHEDULERS, "train.lr_scheduler")
        require_choice(self.optimizer, OPTIMIZERS, "train.optimizer")
        require_choice(self.mixed_precision, MIXED_PRECISION, "train.mixed_precision")
        require_choice(self.timestep_sampling, TIMESTEP_SAMPLINGS, "train.timestep_sampling")
        require_choice(self.loss_weighting, LOSS_WEIGHTINGS, "train.loss_weighting")
        if not isinstance(self.report_to, list):
            raise UserError(f"params.yaml: train.report_to={self.report_to!r} must be a list of "
                            f"{', '.join(TRACKERS)}")
        for tracker in self.report_to:
            require_choice(tracker, TRACKERS, "train.report_to[]")
        dropout = self.caption_dropout
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise UserError(f"params.yaml: train.caption_dropout={dropout!r} must be in [0, 1]")
        if self.num_processes != EVERY_GPU:
            check_split(self.num_processes, self.gradient_accumulation_steps)
        if self.base_quantization == "nf4" and self.compile and self.gradient_checkpointing:
            # Seen with torch 2.14, bitsandbytes 0.50.2 and peft 0.21 (dynamic or static shapes alike):
            # dynamo breaks the graph inside Linear4bit.forward and recompiles it per weight shape, and
            # the recomputation then runs another graph than the forward did.
            raise UserError("train.compile cannot be combined with train.base_quantization=nf4 and "
                            "train.gradient_checkpointing: torch.compile recompiles inside bitsandbytes' 4-bit "
                            "layers and checkpointing's recomputation then saves other tensors than the forward "
                            "(torch CheckpointError); set train.compile: false")
        if self.optimizer == "prodigy" and self.learning_rate < PRODIGY_MIN_LR:
            # Prodigy multiplies its own step-size estimate by lr: 1e-4 would barely train at all.
            raise UserError(f"train.optimizer=prodigy expects train.learning_rate around 1.0 (it "
                            f"estimates the step size itself), not {self.learning_rate}; set "
                            "train.learning_rate: 1.0")


ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


# The set diffusers' train_dreambooth_lora_flux.py adapts when --lora_layers is not given.
DIFFUSERS_DEFAULT = ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                 "ff_context.net.2"]


ALL_LINEAR = DIFFUSERS_DEFAULT + ["proj_mlp", "proj_out", "norm1.linear", "norm1_context.linear",
                                  "norm.linear"]


# all-linear-blocks: the same layers inside the double/single blocks only, without the top-level final
# layer (proj_out, which all-linear's suffix "proj_out" also adapts): the set kohya sd-scripts builds for
# FLUX (create_network_from_weights: DoubleStreamBlock/SingleStreamBlock Linears), so every client
# (sd-scripts strict load and merge, ComfyUI, diffusers' kohya reader) loads the export whole.
# A regex (peft full-matches a str target_modules against each module name).
BLOCK_LINEAR_REGEX = (r"(transformer_blocks|single_transformer_blocks)\.\d+\.("
                      + "|".join(re.escape(name) for name in ALL_LINEAR) + ")")


TARGET_PRESETS = {"attention": ATTENTION, "default": DIFFUSERS_DEFAULT, "all-linear": ALL_LINEAR,
                  "all-linear-blocks": BLOCK_LINEAR_REGEX}


PRESET_NAMES = ", ".join(TARGET_PRESETS)


INITS = {"gaussian": "gaussian", "default": True}  # lora.init -> peft's init_lora_weights


@dataclass(frozen=True)
class LoraParams(ParamsSection):
    """params.yaml ``lora``: every check that needs no model. Only an explicit targets list waits
    for the model (its names are checked against the model's layers in :func:`resolve_targets`)."""

    SECTION: ClassVar[str] = "lora"
    rank: int
    alpha: float
    targets: str | list[str]
    dropout: float = 0.0
    init: str = "gaussian"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise UserError(f"params.yaml: lora.rank={self.rank!r} must be a positive integer")
        require_positive(self.alpha, "lora.alpha")
        dropout = self.dropout
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
            raise UserError(f"params.yaml: lora.dropout={dropout!r} must be in [0, 1)")
        require_choice(self.init, INITS, "lora.init")
        targets = self.targets
        if isinstance(targets, str):
            require_choice(targets, TARGET_PRESETS, "lora.targets")
        elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise UserError(f"params.yaml: lora.targets must be a preset name ({PRESET_NAMES}) "
                            "or a non-empty list of module names")
