"""The ``app`` section: the Gradio app's limits and inference settings (each also ``IMPRESSIONIST_<KEY>``). No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import UserError
from ..layout import LORA_DIR
from . import ParamsSection
from .inference import InferenceSettings

MULTIPLE = 16  # FLUX image sides: 8x VAE downsampling, then 2x2 latent packing


POSITIVE_INTEGERS = ("max_steps", "max_resolution", "min_resolution", "max_prompt_chars", "concurrency_limit",
                     "max_queue_size", "gpu_duration")


@dataclass(frozen=True)
class AppParams(ParamsSection, InferenceSettings):
    """params.yaml ``app`` (each setting also ``IMPRESSIONIST_<KEY>``); every key has a default, so the
    app runs without the section, or without params.yaml (a bare Space). lora_mode, quantization,
    offload and compile are :class:`~impressionist.inference.InferenceSettings`, as in ``sample``."""

    SECTION: ClassVar[str] = "app"
    base_model: str = ""                 # "" = model.pretrained
    lora: str = LORA_DIR.as_posix()      # a LoRA folder or a Hub repo id
    dtype: str = ""                      # "" = model.dtype on a GPU, float32 on the CPU
    max_steps: int = 50
    max_resolution: int = 1024
    min_resolution: int = 256
    max_prompt_chars: int = 300
    max_guidance: float = 10.0
    max_lora_scale: float = 2.0
    concurrency_limit: int = 1
    max_queue_size: int = 16
    gpu_duration: int = 120              # ZeroGPU: seconds a call may hold the GPU (spaces.GPU duration)

    def __post_init__(self) -> None:
        for key in POSITIVE_INTEGERS:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"app.{key}={value!r} must be a positive integer")
        for key in ("min_resolution", "max_resolution"):  # the sliders step by 16 from the minimum
            if getattr(self, key) % MULTIPLE:
                raise UserError(f"app.{key}={getattr(self, key)} must be a multiple of {MULTIPLE} (FLUX image sides)")
        if self.min_resolution > self.max_resolution:
            raise UserError(f"app.max_resolution={self.max_resolution} must be at least "
                            f"app.min_resolution={self.min_resolution}")
        for key in ("max_guidance", "max_lora_scale"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise UserError(f"app.{key}={value!r} must be a positive number")
        super().__post_init__()  # lora_mode, quantization, offload, compile
