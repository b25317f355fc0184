"""LoRA on the Flux transformer with peft: target-module presets and their validation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from peft import LoraConfig

from .errors import UserError
from .params import ParamsSection, require_choice, require_positive

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


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """Names of nn.Linear layers inside the transformer blocks, without the block prefix."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            parts = name.split(".")
            if parts[0] in ("transformer_blocks", "single_transformer_blocks"):
                parts = parts[2:]
            names.add(".".join(parts))
    return names


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


def resolve_targets(targets: Any, model: torch.nn.Module) -> list[str] | str:
    """Expand a preset name (a list of suffixes, or a regex for ``all-linear-blocks``) or check an
    explicit list against the model's Linear layers."""
    if isinstance(targets, str):
        return TARGET_PRESETS[require_choice(targets, TARGET_PRESETS, "lora.targets")]
    if not isinstance(targets, list) or not targets:
        raise UserError(f"params.yaml: lora.targets must be a preset name ({PRESET_NAMES}) "
                        "or a non-empty list of module names")
    valid = linear_module_names(model)
    unknown = [t for t in targets if not any(v == t or v.endswith("." + t) for v in valid)]
    if unknown:
        raise UserError(f"lora.targets: unknown module(s) {', '.join(unknown)}; valid names: "
                        f"{', '.join(sorted(valid))}")
    return list(targets)


def lora_config(lora: LoraParams, model: torch.nn.Module) -> LoraConfig:
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      init_lora_weights=INITS[lora.init], target_modules=resolve_targets(lora.targets, model))
