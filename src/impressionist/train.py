"""Stage ``train``: a LoRA on the FLUX.1 transformer with the rectified-flow objective.

Reads only the encode cache (never the VAE or text encoders), trains with accelerate (one process
per GPU, launched by the stage itself: see :mod:`impressionist.launcher`), logs to DVCLive and
TensorBoard through accelerate's trackers, checkpoints every ``train.checkpoint_every`` steps into
``.cache/checkpoints/<run hash>`` (outside DVC's outputs, see :mod:`impressionist.checkpoints`) and
resumes from the newest checkpoint of the same params automatically. Writes the final LoRA in diffusers format to ``models/lora``.

:func:`run` goes through its phases in order: check the params, open the cache, build the
transformer, prepare the optimizer (resuming a checkpoint), the training loop, write the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
# At the top, not in the phase that uses them: a diffusers without them must fail before training,
# not after it (_collate_lora_metadata is private API).
from diffusers import FluxPipeline
from diffusers.training_utils import _collate_lora_metadata, cast_training_params

from . import checkpoints, launcher
from .batch_order import ResolutionMix
from .ema import LoraEMA
from .errors import UserError, atomic_dir, atomic_write_text, stage_main
from .flux_math import TimestepSampling, flow_matching_loss, sample_sigmas
from .latent_cache import EMPTY_CAPTION_KEY, CacheReader
from .layout import (CACHE_DIR, LORA_DIR, LOSS_PLOT, REPLICATES_DIR, REPLICATES_MANIFEST, TRAINING_CONFIG,
                     TRAIN_METRICS)
from .lora import lora_config
from .models import (base_model_of_cache, check_attention_backend, check_quantization, cuda_capability,
                     load_transformer, require_package, resolve_device, resolve_dtype, use_attention_backend)
from .params import DEFAULT_PARAMS, fingerprint, load_params
from .params.model import MachinesParams, ModelParams, check_split
from .params.training import MIXED_PRECISION, LoraParams, TrainParams, ValidationParams
from .plotting import new_figure, save_figure
from .replicate_seeds import extra_replicates, replicate_params, replicate_seed
from .validation_images import ValidationSampler

LIVE_DIR = Path("dvclive")
LOG_DIR = Path("logs")
LORA_STATE = "lora_state.safetensors"  # inside a checkpoint: peft-format LoRA tensors
EMA_FILE = "ema.safetensors"  # in each checkpoint folder when train.ema_decay > 0
RAW_LORA_SUBDIR = "raw"  # models/lora/raw: the last step's LoRA when the saved one is the EMA

# Params that do not change what a training step computes (TrainParams declares them `operational`):
# changing them keeps checkpoints valid.
# Gradient checkpointing recomputes activations (with the same RNG state); every attention backend
# and a compiled block compute the same maths, up to float rounding: a resumed run may switch them
# (e.g. on another GPU class). ``max_steps`` joins them only under a schedule that ignores it (see
# run_hash).
NOT_SHAPING = TrainParams.operational_settings()
STEP_FREE_SCHEDULERS = ("constant", "constant_with_warmup")  # the lr at step k ignores max_steps


def check_machine(train: TrainParams, device: torch.device) -> None:
    """The train settings this machine must support: CUDA-only kernels and optional packages."""
    check_quantization(train.base_quantization, device)
    check_attention_backend(train.attention_backend, device)
    if cuda_capability(device) is None:
        if train.optimizer == "adamw8bit":
            raise UserError("train.optimizer=adamw8bit (bitsandbytes) needs a CUDA GPU; "
                            "use adamw or prodigy on CPU")
        if train.mixed_precision == "fp16":
            raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if train.optimizer == "adamw8bit":
        require_package("bitsandbytes", "train.optimizer=adamw8bit")
    if train.optimizer == "prodigy":
        require_package("prodigyopt", "train.optimizer=prodigy")


def check_resume_from(model: ModelParams, lora: LoraParams, train: TrainParams) -> None:
    """``train.resume_from`` names a checkpoint this run can continue."""
    if not train.resume_from:
        return
    folder, meta = checkpoints.explicit_resume(Path(train.resume_from), model.pretrained,
                                               lora_fingerprint(lora), train.optimizer)
    if meta.get("step", 0) > train.max_steps:
        raise UserError(f"train.resume_from={folder} is at step {meta.get('step')}, beyond "
                        f"train.max_steps={train.max_steps}; raise max_steps or clear resume_from")


def checked_sections(params: Mapping[str, Any]) -> tuple[ModelParams, LoraParams, TrainParams]:
    """The model, lora and train sections after every check that needs no model, so mistakes stop
    before anything loads. Only the names of an explicit ``lora.targets`` list wait for the model."""
    model, lora, train = ModelParams.check(params), LoraParams.check(params), TrainParams.check(params)
    check_machine(train, resolve_device(model))
    check_resume_from(model, lora, train)
    return model, lora, train


def run_hash(params: Mapping[str, Any], cache_fingerprint: str, world_size: int) -> str:
    """The hash of everything that shapes training; a checkpoint resumes only under the same hash.

    ``max_steps`` is left out only under a constant schedule: a decaying one (linear, cosine, ...)
    sets every step's learning rate from it, so raising it must start over. The number of
    processes is left out (they split each step's micro-batches, see :mod:`launcher`) unless LoRA
    dropout is on: its masks come from each process's own RNG stream. The sections are hashed as
    written in params.yaml (a default left out and one written out are two runs).
    """
    train = params["train"]
    ignored = NOT_SHAPING | ({"max_steps"} if train["lr_scheduler"] in STEP_FREE_SCHEDULERS else set())
    model_cfg = {k: v for k, v in params["model"].items() if k != "device"}
    train_cfg = {k: v for k, v in train.items() if k not in ignored}
    processes = world_size if LoraParams.check(params).dropout else "any"
    return fingerprint(model_cfg, params["lora"], train_cfg, cache_fingerprint, processes)


class MicroBatches(torch.utils.data.Dataset):
    """Item ``k`` is this process's ``k``-th micro-batch, ready to move to the device.

    Served through a DataLoader so workers read (and pin) the next batches from the cache while
    the GPU trains on the current one; the content of every item depends only on ``k``, so the
    number of workers never changes what is trained.
    """

    def __init__(self, cache: CacheReader, cfg: TrainParams, sampling: TimestepSampling,
                 world: int, rank: int, order: ResolutionMix | None = None):
        self.cache, self.cfg, self.sampling, self.world, self.rank = cache, cfg, sampling, world, rank
        self.order = order or batch_order(cache, cfg)

    def __len__(self) -> int:
        return self.cfg.max_steps * self.per_process_accumulation

    @property
    def per_process_accumulation(self) -> int:
        """Micro-batches per step on this process: the step's micro-batches are split over all."""
        return self.cfg.gradient_accumulation_steps // self.world

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        micro_batch = k * self.world + self.rank
        return load_batch(self.cache, self.order[micro_batch],
                          micro_batch_generator(self.cfg.seed, micro_batch),
                          self.cfg.caption_dropout, self.sampling)


def batch_order(cache: CacheReader, cfg: TrainParams) -> ResolutionMix:
    """The micro-batch order: one (resolution, aspect) bucket per batch, resolutions mixed as
    ``train.resolution_mix`` says (``{}``: each cached image once per resolution per epoch)."""
    return ResolutionMix(cache.samples, cfg.batch_size, cfg.seed, cfg.resolution_mix,
                         default_resolution=_first_resolution(cache.index.get("resolution", 0)))


def _first_resolution(resolution: Any) -> int:
    return int(resolution[0] if isinstance(resolution, list) else resolution)


def micro_batch_loader(dataset: MicroBatches, start_step: int, workers: int, pin: bool):
    first = start_step * dataset.per_process_accumulation
    # Its own generator: starting an iterator draws a base seed, which must not come from the
    # global RNG (that would shift LoRA dropout after a resume's load_state).
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(first, len(dataset)), num_workers=workers,
        pin_memory=pin, prefetch_factor=4 if workers else None, persistent_workers=False,
        generator=torch.Generator())


def micro_batch_generator(seed: int, micro_batch: int) -> torch.Generator:
    """Noise, sigmas and caption dropout of one micro-batch come from their own CPU generator."""
    return torch.Generator().manual_seed(seed * 7_919 + micro_batch + 1)


def load_batch(cache: CacheReader, indices: list[int], generator: torch.Generator,
               caption_dropout: float, sampling: TimestepSampling) -> dict[str, torch.Tensor]:
    samples = [cache.samples[i] for i in indices]
    latents = torch.stack([cache.latent(s) for s in samples]).float()
    dropped = torch.rand(len(samples), generator=generator) < caption_dropout
    texts = [cache.text(EMPTY_CAPTION_KEY if drop else s["caption_key"])
             for s, drop in zip(samples, dropped.tolist())]
    _, _, h, w = latents.shape
    return {
        "latents": latents,
        "noise": torch.randn(latents.shape, generator=generator),
        "sigmas": sample_sigmas(sampling, len(samples), (h // 2) * (w // 2), generator),
        "prompt_embeds": torch.stack([t[0] for t in texts]),
        "pooled_prompt_embeds": torch.stack([t[1] for t in texts]),
    }


def make_optimizer(cfg: TrainParams, trainable: list[torch.nn.Parameter], device):
    """The optimizer named by ``train.optimizer`` (its package was checked by :func:`check_machine`)."""
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(trainable, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(trainable, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    return torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay,
                             fused=device.type == "cuda")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


class IntervalClock:
    """Seconds spent in training steps since the last reading, excluding validation images and
    checkpoint saves (``pause``/``resume`` around them).

    CUDA runs asynchronously, so a reading first waits for the device; readings happen only at log
    time, which keeps the training loop free of host-device syncs in between.
    """

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.started = device, 0.0, time.perf_counter()

    def _wait_for_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def pause(self) -> None:
        self._wait_for_device()
        self.seconds += time.perf_counter() - self.started

    def resume(self) -> None:
        self.started = time.perf_counter()

    def read(self) -> float:
        """The seconds since the last reading; starts the next interval."""
        self.pause()
        seconds, self.seconds = self.seconds, 0.0
        self.resume()
        return seconds


def save_loss_plot(history: list[dict[str, float]], path: Path) -> None:
    fig = new_figure(6, 3.5)
    ax = fig.add_subplot()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".")
    ax.set(xlabel="optimizer step", ylabel="flow-matching loss (mean per log interval)",
           title="LoRA training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def lora_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``model``; under FSDP every rank must call this (it gathers shards)."""
    from accelerate.utils import DistributedType
    from peft.utils import get_peft_model_state_dict

    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.FSDP:
        return get_peft_model_state_dict(unwrapped, state_dict=accelerator.get_state_dict(model))
    return get_peft_model_state_dict(unwrapped)


def _register_lora_hooks(accelerator) -> None:
    """Checkpoints hold the LoRA tensors only, not the 12B frozen base weights.

    Under FSDP accelerate saves and loads the sharded model itself, so the hooks stay out of it.
    """
    from accelerate.utils import DistributedType
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    if accelerator.distributed_type == DistributedType.FSDP:
        return

    def save_hook(models, weights, output_dir):
        for model in models:
            if accelerator.is_main_process:  # every rank holds the same LoRA (DDP): one writer
                state = lora_state_dict(accelerator, model)
                save_file({k: v.contiguous() for k, v in state.items()}, str(Path(output_dir) / LORA_STATE))
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            result = set_peft_model_state_dict(model, load_file(str(Path(input_dir) / LORA_STATE)))
            if getattr(result, "unexpected_keys", None):
                raise UserError(f"checkpoint {input_dir} does not match this LoRA "
                                f"({len(result.unexpected_keys)} unexpected keys)")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def run(params: Mapping[str, Any], cache_dir: Path = CACHE_DIR, lora_dir: Path = LORA_DIR,
        checkpoint_dir: Path | None = None, metrics_path: Path = TRAIN_METRICS,
        loss_plot: Path = LOSS_PLOT, live_dir: Path = LIVE_DIR, log_dir: Path = LOG_DIR) -> dict[str, Any]:
    from accelerate.utils import set_seed

    model, lora, train = checked_sections(params)
    cache = open_cache(cache_dir, model)
    order = batch_order(cache, train)  # a mix naming resolutions the cache lacks stops here, before any model
    # The checkpoint root; each run writes under root/<run hash>.
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else checkpoints.default_root()
    accelerator = make_accelerator(train, resolve_device(model), checkpoint_dir, log_dir)
    this_run = run_hash(params, cache.index["fingerprint"], accelerator.num_processes)
    set_seed(train.seed)

    # The model the cache was encoded with (its commit is in the cache fingerprint, so in this_run).
    model_folder = base_model_of_cache(model.pretrained, model.revision,
                                       cache.index.get("base_model_commit")).folder
    # Before the transformer loads: the text encoders come and go while memory is still free.
    sampler = validation_sampler(accelerator, train.validation, model_folder, model, cache)
    transformer = build_transformer(model_folder, model, lora, train, accelerator.device)
    learner = prepare_learner(accelerator, transformer, train)
    progress = resume(accelerator, learner, model, lora, train, checkpoint_dir, this_run)
    scheduler = lr_schedule(learner.raw_optimizer, train, progress.start_step)
    start_trackers(accelerator, params, live_dir, progress.history)
    batches = micro_batches(accelerator, cache, train, order, progress.start_step)
    save_checkpoint = checkpoint_saver(accelerator, checkpoint_dir, this_run, model, lora, train, learner.ema)
    started = time.perf_counter()
    train_loop(accelerator, learner, scheduler, batches, train, progress, sampler, save_checkpoint)

    accelerator.wait_for_everyone()
    summary = write_outputs(accelerator, learner, params, cache, this_run, progress, started,
                            Path(lora_dir), metrics_path, loss_plot)
    accelerator.end_training()
    return summary


@dataclass
class Learner:
    """The transformer being trained and what updates it (see :func:`prepare_learner`)."""

    transformer: Any  # as accelerate prepared it (wrapped under DDP)
    trainable: list[torch.nn.Parameter]  # the LoRA tensors
    optimizer: Any  # as accelerate prepared it
    raw_optimizer: torch.optim.Optimizer  # the one checkpoints fill and the schedule sets
    ema: LoraEMA | None


@dataclass
class Progress:
    """Where a run stands: the step it started (or resumed) at, the step it has reached, and the
    logged history (a resumed run's includes the steps before the resume)."""

    start_step: int = 0
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def open_cache(cache_dir: Path, model: ModelParams) -> CacheReader:
    """The encode cache, which must have been made with ``model.pretrained``."""
    cache = CacheReader(cache_dir)
    if cache.index["base_model"] != model.pretrained:
        raise UserError(f"the encode cache was made with {cache.index['base_model']}, not "
                        f"{model.pretrained}; re-run encode (`dvc repro encode_latents encode_text`)")
    return cache


def make_accelerator(train: TrainParams, device: torch.device, checkpoint_dir: Path, log_dir: Path):
    """The accelerator of this process, whose processes must split a step's micro-batches evenly
    (checked here too: a launch started by hand may start any number)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(
        mixed_precision=MIXED_PRECISION[train.mixed_precision], cpu=device.type == "cpu",
        log_with=list(train.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(checkpoint_dir), logging_dir=str(log_dir)))
    check_split(accelerator.num_processes, train.gradient_accumulation_steps)
    return accelerator


def validation_sampler(accelerator, validation: ValidationParams, model_folder: str, model: ModelParams,
                       cache: CacheReader) -> ValidationSampler | None:
    """The sampler of the validation images, on the main process when they are on; else None."""
    if not (validation.every and accelerator.is_main_process):
        return None
    return ValidationSampler(validation, model_folder, resolve_dtype(model), accelerator.device,
                             cache.index["max_sequence_length"])


def build_transformer(model_folder: str, model: ModelParams, lora: LoraParams, train: TrainParams,
                      device: torch.device):
    """The base transformer (quantized as ``train.base_quantization`` says), frozen, with a fresh
    LoRA adapter training in fp32, on ``device``."""
    from accelerate.utils import set_seed

    transformer = load_transformer(model_folder, resolve_dtype(model), train.base_quantization, device)
    transformer.requires_grad_(False)
    use_attention_backend(transformer, train.attention_backend)
    config = lora_config(lora, transformer)  # checks explicit target names against this model
    # Seeded right here: the LoRA's initial weights must not depend on what ran before (building the
    # tiny model, the validation prompts' text encoders).
    set_seed(train.seed)
    transformer.add_adapter(config)
    cast_training_params(transformer, dtype=torch.float32)  # LoRA weights train in fp32
    if train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if train.compile:
        # Regional compilation (inductor): the double and the single block are each compiled once and
        # reused by their repeats, in a fraction of a whole-model compile's time; parameter names, and
        # so checkpoints and LoRA files, stay as they are.
        transformer.compile_repeated_blocks()
    return transformer.to(device)


def prepare_learner(accelerator, transformer, train: TrainParams) -> Learner:
    """The optimizer over the LoRA tensors and their EMA; the transformer and optimizer prepared
    by accelerate, and checkpoints set to hold the LoRA tensors only."""
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    raw_optimizer = make_optimizer(train, trainable, accelerator.device)
    prepared, optimizer = accelerator.prepare(transformer, raw_optimizer)
    # Not registered with accelerate (its custom states are unpickled on load): the checkpoint keeps
    # the average as safetensors (LoraEMA.save / LoraEMA.load).
    ema = LoraEMA(trainable, train.ema_decay) if train.ema_decay else None
    _register_lora_hooks(accelerator)
    return Learner(prepared, trainable, optimizer, raw_optimizer, ema)


def resume(accelerator, learner: Learner, model: ModelParams, lora: LoraParams, train: TrainParams,
           checkpoint_dir: Path, this_run: str) -> Progress:
    """Load the checkpoint :func:`_choose_resume` picks into ``learner``; a fresh Progress if none."""
    chosen = _choose_resume(accelerator, model, lora, train, checkpoint_dir, this_run)
    if not chosen:
        return Progress()
    folder, meta = chosen
    # LoRA (safetensors), optimizer and RNG state; accelerate loads the last two with
    # weights_only=True. The scheduler is not in the checkpoint: it is a function of the step.
    accelerator.load_state(str(folder))
    if learner.ema is not None:
        if not (folder / EMA_FILE).is_file():
            raise UserError(f"{folder} holds no EMA of the LoRA ({EMA_FILE}) but train.ema_decay is set; "
                            "resume from a checkpoint of a run with EMA, or set train.ema_decay: 0")
        learner.ema.load(folder / EMA_FILE)
    # load_state brought back the checkpoint's hyper-parameters; train with the params' ones.
    checkpoints.apply_hyperparameters(learner.raw_optimizer, train.learning_rate, train.adam_weight_decay)
    accelerator.print(f"train: resuming from {folder} at step {meta['step']} of {train.max_steps}")
    return Progress(meta["step"], meta["step"], meta["history"])


def lr_schedule(raw_optimizer, train: TrainParams, start_step: int):
    """Stepped by hand once per optimizer step (a prepared scheduler steps once per process); built
    at the resumed step, so its learning rate is the schedule's at that step for the params' lr."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(train.lr_scheduler, raw_optimizer, num_warmup_steps=train.lr_warmup_steps,
                         num_training_steps=train.max_steps, last_epoch=start_step - 1)


def start_trackers(accelerator, params: Mapping[str, Any], live_dir: Path,
                   history: list[dict[str, float]]) -> None:
    accelerator.init_trackers("impressionist", config=_flat(params), init_kwargs={
        "dvclive": {"dir": str(live_dir), "save_dvc_exp": False, "dvcyaml": None}})
    for past in history:  # a resumed run's logs still show the whole curve
        accelerator.log({k: v for k, v in past.items() if k != "step"}, step=past["step"])


def micro_batches(accelerator, cache: CacheReader, train: TrainParams, order: ResolutionMix,
                  start_step: int) -> Iterator[dict[str, torch.Tensor]]:
    """This process's micro-batches from ``start_step`` on, read ahead by the data-loader workers."""
    sampling = TimestepSampling(train.timestep_sampling, train.logit_mean, train.logit_std, train.mode_scale)
    accelerator.print(f"train: resolution mix {order.share()} of the micro-batches")
    dataset = MicroBatches(cache, train, sampling, accelerator.num_processes, accelerator.process_index, order)
    return iter(micro_batch_loader(dataset, start_step, train.dataloader_workers,
                                   accelerator.device.type == "cuda"))


def checkpoint_saver(accelerator, checkpoint_dir: Path, this_run: str, model: ModelParams, lora: LoraParams,
                     train: TrainParams, ema: LoraEMA | None) -> Callable[[int, list[dict[str, float]]], None]:
    """``save(step, history)``: a checkpoint of this run under ``checkpoint_dir/<run hash>``."""
    identity = {"run_hash": this_run, "base_model": model.pretrained, "lora": lora_fingerprint(lora),
                "optimizer": train.optimizer}
    return functools.partial(_save_checkpoint, accelerator, checkpoints.run_folder(checkpoint_dir, this_run),
                             identity=identity, keep=train.keep_checkpoints, ema=ema)


def train_loop(accelerator, learner: Learner, scheduler, batches: Iterator[dict[str, torch.Tensor]],
               train: TrainParams, progress: Progress, sampler: ValidationSampler | None,
               save_checkpoint: Callable[[int, list[dict[str, float]]], None]) -> None:
    """Train from ``progress.step`` to ``train.max_steps``, logging, drawing validation images and
    checkpointing on the way; ``progress`` follows."""
    transformer, ema = learner.transformer, learner.ema
    # Micro-batch k of rank r is the step's micro-batch k * world + r: together the ranks train the
    # step's gradient_accumulation_steps micro-batches, and DDP averages their gradients.
    accumulation = train.gradient_accumulation_steps // accelerator.num_processes
    images_per_step = train.batch_size * train.gradient_accumulation_steps
    # The log interval's losses add up on the device; reading them is the loop's only host sync.
    loss_sum, interval_steps = torch.zeros((), device=accelerator.device), 0
    clock = IntervalClock(accelerator.device)
    transformer.train()
    for step in range(progress.step + 1, train.max_steps + 1):
        for micro in range(accumulation):
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
            sync = micro == accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(transformer):
                loss = flow_matching_loss(transformer, guidance_scale=train.guidance_scale,
                                          weighting=train.loss_weighting, **batch)
                accelerator.backward(loss / accumulation)
            loss_sum += loss.detach().float()
        grad_norm = (accelerator.clip_grad_norm_(learner.trainable, train.max_grad_norm)
                     if train.max_grad_norm > 0 else None)
        learner.optimizer.step()
        scheduler.step()
        learner.optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        progress.step = step
        interval_steps += 1

        if step % train.log_every == 0 or step == train.max_steps:
            seconds = clock.read()
            mean_loss = loss_sum / (interval_steps * accumulation)
            entry = {"step": step,
                     "loss": accelerator.reduce(mean_loss, "mean").item(),
                     "lr": scheduler.get_last_lr()[0],
                     "step_time_s": seconds / interval_steps,
                     "images_per_s": images_per_step * interval_steps / seconds,
                     "peak_memory_gb": peak_memory_gb(accelerator.device)}
            if grad_norm is not None:
                entry["grad_norm"] = float(grad_norm)  # of this step
            progress.history.append(entry)
            accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=step)
            accelerator.print(f"train: step {step}/{train.max_steps} loss {entry['loss']:.4f}")
            loss_sum, interval_steps = torch.zeros_like(loss_sum), 0
        validate_now = train.validation.every and step % train.validation.every == 0
        # The last step is checkpointed too, so a rerun with more steps can continue from it.
        checkpoint_now = train.checkpoint_every and (step % train.checkpoint_every == 0
                                                     or step == train.max_steps)
        if validate_now or checkpoint_now:
            clock.pause()  # not training time
            # The checkpoint first: a failure while drawing must not lose the step (a resume
            # would otherwise repeat every step since the last checkpoint, and fail there again).
            if checkpoint_now:
                save_checkpoint(step, progress.history)
            if validate_now and sampler is not None:
                with ema.applied() if ema is not None else contextlib.nullcontext():
                    _log_validation_images(accelerator, sampler, transformer, step)
            clock.resume()


def write_outputs(accelerator, learner: Learner, params: Mapping[str, Any], cache: CacheReader, this_run: str,
                  progress: Progress, started: float, lora_dir: Path, metrics_path: Path,
                  loss_plot: Path) -> dict[str, Any]:
    """The LoRA (the EMA, the raw weights beside it), its training record, the metrics and the loss
    plot, written by the main process; returns the run's summary there ({} on the other ranks)."""

    final_lora, raw_lora = _final_loras(accelerator, learner.transformer, learner.ema)
    rank_checksums = _gather_checksums(accelerator, final_lora)
    if len(set(rank_checksums)) != 1:
        raise RuntimeError(f"LoRA weights differ between processes: {rank_checksums}")
    if not accelerator.is_main_process:
        return {}
    step, history, ema = progress.step, progress.history, learner.ema
    unwrapped = accelerator.unwrap_model(learner.transformer)
    summary = {
        "steps": step, "resumed_from_step": progress.start_step,
        "final_loss": history[-1]["loss"] if history else None,  # None: no step logged yet
        "train_samples": len(cache.samples),
        "seconds": round(time.perf_counter() - started, 2),
        "run_hash": this_run,
    }
    with atomic_dir(lora_dir) as tmp:
        FluxPipeline.save_lora_weights(
            tmp, transformer_lora_layers=final_lora,
            **_collate_lora_metadata({"transformer": unwrapped}))
        if raw_lora is not None:  # the EMA is the LoRA; the last step's weights stay beside it
            FluxPipeline.save_lora_weights(
                tmp / RAW_LORA_SUBDIR, transformer_lora_layers=raw_lora,
                **_collate_lora_metadata({"transformer": unwrapped}))
        # the sections as written in params.yaml, as the run hash covers them
        (tmp / TRAINING_CONFIG).write_text(json.dumps(
            {"base_model": params["model"]["pretrained"],
             "base_model_commit": cache.index.get("base_model_commit"),
             "lora": params["lora"], "train": params["train"],
             "run_hash": this_run, "steps": step, "rank_checksums": rank_checksums,
             "weights": "ema" if ema is not None else "raw",
             "raw_weights": f"{RAW_LORA_SUBDIR}/" if ema is not None else None,
             "history": history}, indent=1))
    atomic_write_text(metrics_path, json.dumps(
        {k: summary[k] for k in ("steps", "final_loss", "train_samples")}, indent=1))
    save_loss_plot(history, Path(loss_plot))
    loss_text = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    print(f"train: saved LoRA after {step} steps (loss {loss_text}) -> {lora_dir}")
    return summary


def _final_loras(accelerator, transformer, ema: LoraEMA | None):
    """(the LoRA to save, the raw last-step LoRA or None): with an EMA the saved LoRA is the
    average and the raw weights are returned beside it."""
    raw = lora_state_dict(accelerator, transformer)
    if ema is None:
        return raw, None
    raw = {k: v.detach().clone() for k, v in raw.items()}  # the state dict may share the live tensors
    with ema.applied():
        averaged = {k: v.detach().clone() for k, v in lora_state_dict(accelerator, transformer).items()}
    return averaged, raw


def _choose_resume(accelerator, model: ModelParams, lora: LoraParams, train: TrainParams, checkpoint_dir: Path,
                   this_run: str) -> tuple[Path, dict[str, Any]] | None:
    """This run's newest checkpoint; else ``train.resume_from``; else None (start at step 0).

    The run's own checkpoints come first: a rerun after a disconnect continues where it stopped,
    not from the folder it was first started from (which ``select_resume`` leaves in place).
    """
    explicit = Path(train.resume_from) if train.resume_from else None
    chosen = None
    if accelerator.is_main_process:
        chosen = checkpoints.select_resume(checkpoint_dir, this_run, train.max_steps,
                                           log=accelerator.print, protect=explicit)
    chosen = _broadcast(accelerator, chosen)
    if chosen is None and explicit is not None:
        chosen = checkpoints.explicit_resume(explicit, model.pretrained, lora_fingerprint(lora), train.optimizer)
    return chosen


def _save_checkpoint(accelerator, folder: Path, step: int, history: list[dict[str, float]], *,
                     identity: dict[str, str], keep: int, ema: LoraEMA | None) -> None:
    """Checkpoint ``step`` into the run's ``folder``; ``identity`` (run hash, base model, LoRA
    fingerprint, optimizer) goes into its metadata, for resuming."""
    staged = checkpoints.staging_folder(folder, step)
    accelerator.save_state(str(staged))
    if ema is not None and accelerator.is_main_process:
        ema.save(staged / EMA_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = checkpoints.publish(folder, step, {**identity, "step": step, "history": history}, keep=keep)
        accelerator.print(f"train: checkpoint {final}")
    accelerator.wait_for_everyone()


def lora_fingerprint(lora: LoraParams) -> str:
    """What a checkpoint's LoRA tensors must agree with to be loadable."""
    return fingerprint(lora.rank, lora.alpha, lora.targets)


def _log_validation_images(accelerator, sampler, transformer, step: int) -> None:
    # The unwrapped model keeps accelerate's mixed-precision forward (autocast inside, fp32
    # outputs), so under bf16/fp16 the pipeline's latents come out fp32 while the VAE is 16-bit:
    # the whole drawing runs under the training's autocast. (unwrap_model(keep_fp32_wrapper=False)
    # would instead strip autocast from the model being trained, in place.)
    with accelerator.autocast():
        images = sampler.images(accelerator.unwrap_model(transformer))
    for tracker in accelerator.trackers:
        for i, image in enumerate(images):
            if tracker.name == "dvclive":  # latest images only: they live in git with the metrics
                tracker.tracker.log_image(f"validation_{i}.png", image)
            elif tracker.name == "tensorboard":
                tracker.tracker.add_image(f"validation/{i}", image, step, dataformats="HWC")
    accelerator.print(f"train: validation images at step {step}")


def _gather_checksums(accelerator, state: dict[str, torch.Tensor]) -> list[str]:
    """One checksum of the LoRA tensors per process: DDP must leave every rank identical."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().cpu().numpy().tobytes())
    from accelerate.utils import gather_object

    return list(gather_object([digest.hexdigest()[:16]]))


def _broadcast(accelerator, value):
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def run_replicates(params: Mapping[str, Any], out_dir: Path = REPLICATES_DIR, cache_dir: Path = CACHE_DIR,
                   checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Replicates 1 .. R-1 of the recipe (``replicates.count``; replicate 0 is ``models/lora``): the
    same :func:`run` with ``train.seed`` replaced by :func:`replicates.replicate_seed`, each LoRA in
    ``out_dir/<k>/``, its metrics, loss plot and logs in ``out_dir/logs/<k>/``; ``out_dir`` holds
    ``replicates.json`` (count and seeds). R = 1 writes the manifest alone and loads nothing."""
    ks = extra_replicates(params)
    if ks:  # R = 1 checks and loads nothing: no GPU, no time
        checked_sections(params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k in ks:
        logs = out_dir / "logs" / str(k)
        run(replicate_params(params, k), cache_dir, out_dir / str(k), checkpoint_dir,
            logs / TRAIN_METRICS.name, logs / LOSS_PLOT.name, logs / "dvclive", logs / "tensorboard")
    manifest = {"count": len(ks) + 1, "seeds": [replicate_seed(params["train"]["seed"], k) for k in [0, *ks]]}
    if int(os.environ.get("RANK", "0")) == 0:  # one writer under a multi-process launch
        atomic_write_text(out_dir / REPLICATES_MANIFEST, json.dumps(manifest, indent=1) + "\n")
    print(f"train_replicates: {len(ks)} replicate(s) beyond models/lora -> {out_dir}")
    return manifest


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--replicates", action="store_true",
                        help="train replicates 1..R-1 of the recipe (replicates.count) into models/replicates")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.replicates and not extra_replicates(params):
        run_replicates(params)  # R = 1: the manifest alone, no processes launched
        return
    if not launcher.under_launcher():  # a rank of a launch trains; the stage's own command may launch
        model, _, train = checked_sections(params)  # bad params stop here, before any process is launched
        device = resolve_device(model)
        processes = launcher.processes_to_launch(train.num_processes, train.gradient_accumulation_steps, device)
        machines = MachinesParams.check(params)
        if machines.several:
            check_split(processes * machines.num_machines, train.gradient_accumulation_steps)
        if processes > 1 or machines.several:
            launcher.relaunch("impressionist.train", sys.argv[1:] if argv is None else argv, processes,
                              MIXED_PRECISION[train.mixed_precision], cpu=device.type != "cuda",
                              machines=machines)
            return
    run_replicates(params) if args.replicates else run(params)


if __name__ == "__main__":
    main()
