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
from typing import Iterator

import torch

from .errors import UserError
from .params.inference import InferenceSettings

ADAPTER = "impressionist"


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
