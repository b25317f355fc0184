"""LoRA on the Flux transformer with peft: target-module presets and their validation."""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig

from .errors import UserError
from .params import require_choice
from .params.training import INITS, PRESET_NAMES, TARGET_PRESETS, LoraParams


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
