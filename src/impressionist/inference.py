"""Inference settings that the Gradio app and the sample stages share, and the pipeline they build.

* ``lora_mode``: ``adapter`` keeps the LoRA as a switchable peft adapter (its scale changes per
  image, the base model is one ``disable_lora`` away); ``fused`` merges it into the base weights
  while an image is drawn (``fuse_lora`` / ``unfuse_lora``): no LoRA matmuls in the denoising loop.
* ``quantization`` of the transformer's block weights: ``none`` (``model.dtype``, bf16 on a GPU),
  ``fp8`` (torchao float8 weights and dynamic float8 activations, compute capability 8.9+, the model
  in bfloat16: torchao's per-row scales) or ``nf4`` (bitsandbytes 4-bit through diffusers, with the
  trainer's ``models.nf4_config``: embedders and ``norm_out`` stay 16-bit). The LoRA factors stay in
  16 bit. A fused LoRA cannot be unfused from quantized weights, so with a quantized transformer a
  fused LoRA is merged once, at one scale, before quantizing (``baked``).
* ``offload``: ``model`` (each model on the GPU while it runs) or ``sequential`` (layer by layer).
* ``compile``: ``torch.compile`` of the repeated transformer blocks (diffusers'
  ``compile_repeated_blocks``, as ``train.compile``); the first image pays for the compilation.

:class:`SampleParams` (``sample``) holds them with the sampler settings and the evaluation set;
:func:`check` refuses, with one line and before any model loads, what this machine cannot run.
Estimated full-size peaks per setting: ``benchmarks/bench_inference.py --profile estimate``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Mapping

import torch

from .errors import UserError
from .params import ParamsSection, require_bool, require_choice, require_int, require_multiple, require_positive

ADAPTER = "impressionist"
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


@dataclass(frozen=True)
class EvalSetParams(ParamsSection):
    """params.yaml ``sample.eval_set``: the evaluation set the sample stages draw and evaluate measures."""

    SECTION: ClassVar[str] = "sample.eval_set"
    subjects: str
    num_subjects: int
    seeds: list[int]
    steps: int
    resolution: int
    guidance_scale: float

    def __post_init__(self) -> None:
        require_int(self.num_subjects, "sample.eval_set.num_subjects", minimum=1)
        require_int(self.steps, "sample.eval_set.steps", minimum=1)
        require_multiple(self.resolution, 16, "sample.eval_set.resolution")
        require_positive(self.guidance_scale, "sample.eval_set.guidance_scale", allow_zero=True)
        seeds = self.seeds
        if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
            raise UserError("params.yaml: sample.eval_set.seeds must list distinct integer seeds, e.g. [0, 1, 2]")
        if not isinstance(self.subjects, str) or not self.subjects.strip():
            raise UserError("params.yaml: sample.eval_set.subjects must name a text file of subjects, one per line")


@dataclass(frozen=True)
class SampleParams(ParamsSection, InferenceSettings):
    """params.yaml ``sample``: the show set (prompts x seeds at each LoRA scale), how it is drawn, and
    the evaluation set. It lives beside the inference settings it extends, outside the sample stage,
    because the app, the Space and the model card read the section too."""

    SECTION: ClassVar[str] = "sample"
    MISSING_HINTS: ClassVar[Mapping[str, str]] = {
        "eval_set": "it defines the images the evaluate stage measures (subjects, num_subjects, seeds, "
                    "steps, resolution, guidance_scale)",
        "lora_scales": "list LoRA scales > 0, e.g. [0.5, 1.0]",
        "seeds": "list at least one integer seed, e.g. [0, 1]"}
    seeds: list[int]
    steps: int
    guidance_scale: float
    resolution: int
    lora_scales: list[float]
    max_sequence_length: int
    eval_set: EvalSetParams
    prompts: list[str] = field(default_factory=list)  # held-out subjects; the trigger is added to each
    val_captions: int = 0  # + the first N distinct validation captions (0 = none)
    vae_tiling: bool = False

    def __post_init__(self) -> None:
        items = [] if self.prompts is None else self.prompts
        if not isinstance(items, list) or not all(isinstance(p, str) and p.strip() for p in items):
            raise UserError("params.yaml: sample.prompts must be a list of non-empty prompts")
        self._set("prompts", [p.strip() for p in items])
        count = self.val_captions
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise UserError(f"params.yaml: sample.val_captions={count!r} must be an integer >= 0 "
                            "(0 = no validation captions in the prompt set)")
        if not self.prompts and count == 0:
            raise UserError("the prompt set is empty: params.yaml lists no sample.prompts and sample.val_captions "
                            "is 0; add held-out subjects to sample.prompts or set sample.val_captions > 0")
        require_multiple(self.resolution, 16, "sample.resolution")
        require_int(self.steps, "sample.steps", minimum=1)
        require_positive(self.guidance_scale, "sample.guidance_scale", allow_zero=True)
        require_int(self.max_sequence_length, "sample.max_sequence_length", minimum=1)
        seeds = self.seeds
        if not seeds or not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                 for s in seeds):
            raise UserError("params.yaml: sample.seeds must list at least one integer seed")
        scales = self.lora_scales
        if (not scales or not isinstance(scales, list)
                or any(not isinstance(s, (int, float)) or s <= 0 for s in scales)):
            raise UserError("params.yaml: sample.lora_scales must list LoRA scales > 0, e.g. [0.5, 1.0]")
        require_bool(self.vae_tiling, "sample.vae_tiling")
        super().__post_init__()  # lora_mode, quantization, offload, compile


def check(settings: InferenceSettings, device: torch.device, section: str, dtype: torch.dtype) -> None:
    """Refuse what this machine cannot run in ``dtype``, with one line, before any model is loaded."""
    from . import models

    if settings.compile and settings.offload == "sequential":  # on any machine
        raise UserError(f"{section}.compile cannot compile layers that sequential offload moves one by "
                        "one; use offload none or model")
    capability = models.cuda_capability(device)
    q, name = settings.quantization, f"{section}.quantization={settings.quantization}"
    if q != "none":
        package = {"nf4": "bitsandbytes", "fp8": "torchao"}[q]
        if capability is None:
            raise UserError(f"{name} needs a CUDA GPU ({package} kernels); use none on the CPU")
        if q == "fp8" and capability < models.FP8_MIN_CAPABILITY:
            raise UserError(f"{name} needs FP8 tensor cores (compute capability 8.9+: L4, RTX 4090, H100); "
                            "use nf4 on older GPUs")
        if q == "fp8" and dtype != torch.bfloat16:
            # torchao's per-row fp8 scaling (what _quantize_fp8 uses) computes in bfloat16 only
            raise UserError(f"{name} needs the model in bfloat16 (torchao's per-row fp8 scales), not "
                            f"{str(dtype).removeprefix('torch.')}; use bfloat16 or quantization nf4")
        if importlib.util.find_spec(package) is None:
            raise UserError(f"{name} needs {package}: pip install {package}")
        if settings.offload == "sequential":
            raise UserError(f"{section}.offload=sequential cannot stream quantized weights; use model "
                            f"offload with {name}")
    if settings.offload != "none" and capability is None:
        raise UserError(f"{section}.offload={settings.offload} moves weights between a GPU and the CPU; it "
                        "needs CUDA (use none on the CPU)")
    if settings.compile:
        if device.type == "cuda" and importlib.util.find_spec("triton") is None:
            raise UserError(f"{section}.compile on a GPU needs triton: pip install triton")
        if device.type != "cuda" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            raise UserError(f"{section}.compile on the CPU needs a C++ compiler (inductor); install g++ or set "
                            f"{section}.compile: false")


def baked(settings: InferenceSettings) -> bool:
    """Whether the LoRA must be merged once, before quantizing (it cannot be unfused afterwards)."""
    return settings.lora_mode == "fused" and settings.quantization != "none"


def _quantize_fp8(transformer: torch.nn.Module) -> None:
    """torchao float8 weights with dynamic float8 activations, one scale per row, on the blocks'
    base weights (as train's fp8 recipe: LoRA factors, embedders and the output head stay 16-bit)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from .models import fp8_block_linear

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=fp8_block_linear)


def build_pipeline(folder: str, dtype: torch.dtype, device: torch.device, settings: InferenceSettings,
                   lora: str | None = None, weight_name: str | None = None, baked_scale: float = 1.0):
    """The FluxPipeline for ``settings``, with ``lora`` (a folder or Hub id) loaded as adapter ``ADAPTER``.

    A baked LoRA (fused + quantized, :func:`baked`) is merged at ``baked_scale`` and its layers removed.
    Raises what ``load_lora_weights`` raises for a LoRA that does not fit (callers word it).
    """
    from .models import load_nf4_transformer, load_pipeline

    components = {}
    if settings.quantization == "nf4" and not baked(settings):
        components["transformer"] = load_nf4_transformer(folder, dtype, device, double_quant=False)
    pipe = load_pipeline(folder, dtype, **components)
    if lora is not None:
        pipe.load_lora_weights(lora, weight_name=weight_name, adapter_name=ADAPTER)
        if baked(settings):
            pipe.fuse_lora(components=["transformer"], lora_scale=float(baked_scale), adapter_names=[ADAPTER])
            pipe.unload_lora_weights()  # the merged weights stay
    if settings.quantization == "nf4" and baked(settings):
        # Merged in 16 bit, then quantized: save the merged transformer and load it back 4-bit.
        import tempfile

        with tempfile.TemporaryDirectory(prefix="impressionist-fused-") as tmp:
            pipe.transformer.save_pretrained(tmp)
            pipe.transformer = None
            pipe.transformer = load_nf4_transformer(tmp, dtype, device, double_quant=False, subfolder=None)
    if settings.quantization == "fp8":
        _quantize_fp8(pipe.transformer)
    if settings.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif settings.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if settings.compile:
        pipe.transformer.compile_repeated_blocks()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def lora_applied(pipe, settings: InferenceSettings, scale: float) -> Iterator[None]:
    """Draw with the LoRA at ``scale``: the adapter's weight, or merged into the weights meanwhile."""
    if baked(settings):
        yield  # already merged (at the scale build_pipeline was given)
        return
    pipe.enable_lora()
    if settings.lora_mode == "adapter":
        pipe.set_adapters([ADAPTER], adapter_weights=[float(scale)])
        yield
        return
    pipe.set_adapters([ADAPTER], adapter_weights=[1.0])
    # set_adapters resets the scale that fuse_lora multiplies in (and unfuse_lora leaves behind).
    pipe.fuse_lora(components=["transformer"], lora_scale=float(scale), adapter_names=[ADAPTER])
    try:
        yield  # merged layers skip their LoRA matmuls
    finally:
        pipe.unfuse_lora(components=["transformer"])


@contextlib.contextmanager
def lora_removed(pipe, settings: InferenceSettings) -> Iterator[None]:
    """Draw with the base model alone (impossible once a LoRA is baked in)."""
    if baked(settings):
        raise UserError("a fused LoRA in a quantized transformer cannot be switched off; use lora_mode "
                        "adapter to draw the base model beside it")
    pipe.disable_lora()
    try:
        yield
    finally:
        pipe.enable_lora()
