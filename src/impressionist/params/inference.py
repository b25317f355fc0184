"""The inference settings the sample stages and the app share. No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import require_bool, require_choice

LORA_MODES = ("adapter", "fused")


QUANTIZATIONS = ("none", "fp8", "nf4")


OFFLOAD_MODES = ("none", "model", "sequential")


@dataclass(frozen=True, kw_only=True)
class InferenceSettings:
    """The four settings the sample stages and the app share; ``SampleParams`` and ``AppParams``
    are InferenceSettings, so these keys, their defaults and checks are written once, here."""

    SECTION: ClassVar[str] = "inference"  # names the settings in messages (sample.*, app.*)
    lora_mode: str = "adapter"
    quantization: str = "none"
    offload: str = "none"
    compile: bool = False

    def __post_init__(self) -> None:
        require_choice(self.lora_mode, LORA_MODES, f"{self.SECTION}.lora_mode")
        require_choice(self.quantization, QUANTIZATIONS, f"{self.SECTION}.quantization")
        require_choice(self.offload, OFFLOAD_MODES, f"{self.SECTION}.offload")
        require_bool(self.compile, f"{self.SECTION}.compile")

    def describe(self) -> str:
        return (f"LoRA {self.lora_mode}, transformer {self.quantization if self.quantization != 'none' else 'unquantized'}, "
                f"offload {self.offload}{', compiled' if self.compile else ''}")
