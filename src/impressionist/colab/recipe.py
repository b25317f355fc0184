"""GPU -> recipe: the params overrides for training FLUX.1-dev on this runtime's GPU, and keeping
the first run's training params in a Drive project (see the package docstring)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cli import demo_overrides
from ..errors import UserError, atomic_write_text, first_line
from .drive import DriveLayout
from .gpu import Gpu, detect_gpu, has_bf16, system_ram_gib

# FLUX.1-dev's transformer has 11.9B parameters: 23.8 GB in bf16, about 6.7 GB in NF4. Text encoders
# and VAE never load while training (encode caches their outputs). Thresholds, in GiB of GPU memory:
LARGE_GIB = 70.0  # 80 GB cards (A100-80GB, H100): bf16 weights plus the activations of the recipe's
                  # 1024 px batches *without* gradient checkpointing (47.8 GiB of tensors estimated
                  # with an attention LoRA, benchmarks/RESULTS.md; somewhat more for all-linear) fit.
BF16_GIB = 35.0   # A100-40GB, L40S, A6000: bf16 weights fit; activations need gradient checkpointing
                  # (the recipe's peak, 1024 px, all-linear LoRA + EMA: 25.6 GiB estimated).
MIN_GIB = 14.0    # T4 (15 GiB): NF4 weights + checkpointing at the recipe's 1024 px: 9.4 GiB estimated
                  # (with fp32 AdamW; the recipe's 8-bit AdamW needs less).
SAMPLE_ON_GPU_GIB = 70.0  # the whole sampling pipeline (transformer + 9.5 GB T5 + CLIP + VAE) stays
                          # on the GPU; below, sample moves each model in only while it runs.
SAMPLE_MIN_GIB = 26.0     # with model offload the 16-bit transformer alone (23.8 GB) must fit;
                          # below, sequential offload streams the weights layer by layer (slow).
OFFLOAD_RAM_GIB = 40.0    # model offload holds the whole bf16 pipeline (~34 GB) in system RAM.
# How often to checkpoint: a disconnect loses at most this many steps (params.yaml's 250 could be an
# hour on a T4); NF4 steps are slower, so more often. A checkpoint (LoRA + optimizer state, a few
# hundred MB) takes seconds to write to Drive. checkpoint_every does not shape training, so
# changing it keeps existing checkpoints valid.
CHECKPOINT_EVERY_BF16 = 100
CHECKPOINT_EVERY_NF4 = 50


# The overrides that shape what training learns (the trainer hashes them into its checkpoints'
# run hash): a rerun on another GPU must keep the first run's, or training starts over. The others
# (memory_overrides) only trade memory for speed and follow the GPU at hand.
TRAINING_KEYS = ("model.device", "model.dtype", "train.mixed_precision", "train.base_quantization",
                 "train.optimizer")


def training_overrides(bf16: bool, quantized: bool) -> dict[str, Any]:
    """The GPU recipe's params that shape training (:data:`TRAINING_KEYS`)."""
    return {
        "model.device": "cuda",
        "model.dtype": "bfloat16" if bf16 else "float16",
        "train.mixed_precision": "bf16" if bf16 else "fp16",
        "train.base_quantization": "nf4" if quantized else "none",
        "train.optimizer": "adamw8bit" if quantized else "adamw",
    }


def describe_overrides(model_dtype: str) -> dict[str, Any]:
    """The captioner runs in the base model's 16-bit dtype: params.yaml's bf16 would stop describe
    on a GPU without bf16 (a T4), where the trainer already runs in fp16. Derived from the kept
    ``model.dtype``, so a later runtime's descriptions (their cache key covers the dtype) match the
    first run's."""
    return {"describe.dtype": model_dtype}


def memory_overrides(memory_gib: float, quantized: bool) -> dict[str, Any]:
    """The GPU recipe's memory and speed settings for a GPU of ``memory_gib`` GiB."""
    return {
        "train.gradient_checkpointing": memory_gib < LARGE_GIB,
        "train.checkpoint_every": CHECKPOINT_EVERY_NF4 if quantized else CHECKPOINT_EVERY_BF16,
        "sample.offload": ("none" if memory_gib >= SAMPLE_ON_GPU_GIB else
                           "model" if memory_gib >= SAMPLE_MIN_GIB else "sequential"),
    }


def gpu_overrides(name: str, memory_gib: float,
                  capability: tuple[int, int] | None = None) -> dict[str, Any]:
    """The params overrides for training FLUX.1-dev on one GPU of this name and memory (GiB).

    The VLM of the describe stage runs in the same 16-bit dtype as the base model.
    Training: >= 70 GiB: bf16 base, no gradient checkpointing; 35-70: bf16 + checkpointing; 14-35
    (L4, T4, V100 32 GB): NF4 base (QLoRA) + checkpointing + 8-bit AdamW; fp16 where the GPU has no
    bf16. Sampling (``sample.offload``): >= 70 GiB none; 26-70 model; below 26 sequential.
    """
    if memory_gib < MIN_GIB:
        raise UserError(f"the GPU {name} has {memory_gib:.1f} GiB; training FLUX.1-dev needs at least "
                        f"{MIN_GIB:.0f} GiB (a T4 or better): pick another runtime type")
    quantized = memory_gib < BF16_GIB
    training = training_overrides(has_bf16(name, capability), quantized)
    return {**training, **describe_overrides(training["model.dtype"]), **memory_overrides(memory_gib, quantized)}


@dataclass(frozen=True)
class Recipe:
    name: str
    overrides: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    gpu: Gpu | None = None  # the GPU it was chosen for (None: no GPU)
    demo: bool = False      # the offline demo (configs/demo.yaml) rather than a GPU recipe

    def describe(self) -> str:
        lines = [f"recipe: {self.name}"] + [f"  {k} = {v}" for k, v in self.overrides.items()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def choose_recipe(gpu: Gpu | None, demo: dict[str, Any], *, profile: str = "auto",
                  ram_gib: float | None = None) -> Recipe:
    """``profile`` "auto": the GPU recipe, or the offline demo without a GPU; "demo": always the demo."""
    if profile not in ("auto", "demo"):
        raise UserError(f"PROFILE={profile!r} must be 'auto' or 'demo'")
    if profile == "demo" or gpu is None:
        why = "PROFILE='demo'" if gpu is not None else "no GPU in this runtime"
        return Recipe("offline demo (configs/demo.yaml)", dict(demo), [
            f"{why}: the tiny random-weight Flux model on SYNTHETIC images, on CPU; its metrics say "
            "nothing about real paintings. For the real run pick a GPU runtime (Runtime > Change "
            "runtime type)."], gpu=gpu, demo=True)
    overrides = gpu_overrides(gpu.name, gpu.memory_gib, gpu.capability)
    return Recipe(f"{gpu.name} ({gpu.memory_gib:.0f} GiB): {_training_kind(overrides)}", overrides,
                  _sampling_notes(overrides, gpu, ram_gib), gpu=gpu)


def _training_kind(overrides: dict[str, Any]) -> str:
    return ("NF4 base (QLoRA) + 8-bit AdamW" if overrides["train.base_quantization"] == "nf4"
            else "bf16 base" if overrides["model.dtype"] == "bfloat16" else "fp16 base")


def _sampling_notes(overrides: dict[str, Any], gpu: Gpu, ram_gib: float | None) -> list[str]:
    notes = []
    if overrides["sample.offload"] == "sequential":
        notes.append(f"the 16-bit FLUX.1-dev transformer (23.8 GB) does not fit this GPU's "
                     f"{gpu.memory_gib:.0f} GiB: sampling streams its weights layer by layer "
                     "(sample.offload: sequential), which is slow")
    if overrides["sample.offload"] != "none" and ram_gib is not None and ram_gib < OFFLOAD_RAM_GIB:
        notes.append(f"sampling with model offload holds the pipeline (~34 GB) in system RAM but this "
                     f"runtime has {ram_gib:.0f} GiB: enable High-RAM (Runtime > Change runtime type)")
    return notes


def keep_first_recipe(path: Path | str, recipe: Recipe, ram_gib: float | None = None) -> Recipe:
    """The recipe for this run of a Drive project whose first run chose ``path``'s recipe.

    The first run saves its recipe to ``path``. A later run on a runtime that chose ``recipe`` (it
    may have another GPU, or none) keeps the first recipe's training params (:data:`TRAINING_KEYS`,
    which the trainer's run hash covers: another value would start training over) with memory
    settings for its own GPU, or stops with one line saying how to reset when it cannot run them.
    """
    path = Path(path)
    reset = (f"or start over with this runtime's recipe: delete {path} (training restarts from step 0) "
             "or set PROJECT to a new folder")
    if not path.is_file():
        record = {"name": recipe.name, "demo": recipe.demo, "gpu": recipe.gpu.name if recipe.gpu else None,
                  "training": {} if recipe.demo else {k: recipe.overrides[k] for k in TRAINING_KEYS}}
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
        return recipe
    try:
        first = json.loads(path.read_text())
        name, was_demo, training = str(first["name"]), bool(first["demo"]), dict(first["training"])
        if not was_demo and set(training) != set(TRAINING_KEYS):
            raise ValueError(f"training params {sorted(training)}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a recipe this notebook wrote ({first_line(err, 120)}); delete it to "
                        "choose the recipe afresh (training restarts from step 0)") from err
    if was_demo or recipe.demo:
        if was_demo and recipe.demo:
            return recipe
        now = ("the offline demo (" + ("PROFILE='demo')" if recipe.gpu else "no GPU in this runtime)")
               if recipe.demo else f"a {recipe.gpu.name}")
        raise UserError(f"this PROJECT's first run used the recipe {name!r} but this runtime gets {now}; "
                        f"run it on a runtime like the first one (Runtime > Change runtime type), {reset}")
    if {k: recipe.overrides[k] for k in TRAINING_KEYS} == training:
        return recipe
    gpu = recipe.gpu
    quantized = training["train.base_quantization"] != "none"
    lacks = []
    if training["model.dtype"] == "bfloat16" and not has_bf16(gpu.name, gpu.capability):
        lacks.append("bf16")
    if gpu.memory_gib < (MIN_GIB if quantized else BF16_GIB):
        lacks.append(f"{MIN_GIB if quantized else BF16_GIB:.0f} GiB")
    if lacks:
        raise UserError(f"this PROJECT trains with the recipe of its first run ({name}), which needs "
                        f"{' and '.join(lacks)} that this runtime's {gpu.name} ({gpu.memory_gib:.0f} GiB) "
                        f"lacks; another recipe would restart training. Pick a runtime with a GPU like the "
                        f"first one (Runtime > Change runtime type), {reset}")
    overrides = {**training, **describe_overrides(training["model.dtype"]),
                 **memory_overrides(gpu.memory_gib, quantized)}
    notes = _sampling_notes(overrides, gpu, ram_gib) + [
        f"kept the training params of this PROJECT's first run ({name}) so that training resumes; "
        f"memory settings for this {gpu.name}"]
    return Recipe(f"{gpu.name} ({gpu.memory_gib:.0f} GiB): {_training_kind(overrides)}, as the first run",
                  overrides, notes, gpu=gpu)


def select_recipe(repo: Path | str, profile: str = "auto", layout: DriveLayout | None = None) -> Recipe:
    """The recipe for this runtime: detect the GPU and RAM, read the demo overrides from the repo.

    With ``layout``, the Drive project's first recipe is kept (:func:`keep_first_recipe`).
    """
    ram_gib = system_ram_gib()
    recipe = choose_recipe(detect_gpu(), demo_overrides(Path(repo) / "configs/demo.yaml"),
                           profile=profile, ram_gib=ram_gib)
    return recipe if layout is None else keep_first_recipe(layout.recipe, recipe, ram_gib)
