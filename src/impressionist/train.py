"""Stage ``train``: a LoRA on the FLUX.1 transformer with the rectified-flow objective.

Reads only the encode cache (never the VAE or text encoders), trains with accelerate (one GPU, or
several under ``accelerate launch``), logs to DVCLive and TensorBoard through accelerate's
trackers, checkpoints every ``train.checkpoint_every`` steps into ``models/checkpoints`` (a
``persist`` DVC out) and resumes from the newest checkpoint of the same params automatically.
Writes the final LoRA in diffusers format to ``models/lora``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from . import checkpoints
from .errors import UserError, atomic_dir, atomic_write_text, stage_main
from .flux_math import (LOSS_WEIGHTINGS, TIMESTEP_SAMPLINGS, TimestepSampling, flow_matching_loss,
                        sample_sigmas)
from .latent_cache import EMPTY_CAPTION_KEY, CacheReader
from .lora import lora_config
from .models import (check_quantization, load_transformer, resolve_device, resolve_dtype,
                     resolve_pretrained)
from .params import fingerprint, load_params, require_choice, require_positive, section
from .validation_images import ValidationSampler

CACHE_DIR = Path("data/cache")
LORA_DIR = Path("models/lora")
CHECKPOINT_DIR = Path("models/checkpoints")
METRICS = Path("metrics/train.json")
LOSS_PLOT = Path("plots/loss.png")
LIVE_DIR = Path("dvclive")
LOG_DIR = Path("logs")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_STATE = "lora_state.safetensors"  # inside a checkpoint: peft-format LoRA tensors

# Params that do not change what a training step computes: changing them keeps checkpoints valid.
NOT_SHAPING = {"max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "report_to",
               "validation", "resume_from", "dataloader_workers"}
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
TRACKERS = ("dvclive", "tensorboard")


def validate(cfg: dict[str, Any], device: torch.device) -> None:
    """Every train.* check that needs no model, so mistakes stop before anything loads."""
    for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate",
                "log_every", "keep_checkpoints"):
        require_positive(cfg[key], f"train.{key}")
    require_positive(cfg["checkpoint_every"], "train.checkpoint_every", allow_zero=True)
    require_positive(cfg["lr_warmup_steps"], "train.lr_warmup_steps", allow_zero=True)
    require_positive(cfg["max_grad_norm"], "train.max_grad_norm", allow_zero=True)
    require_choice(cfg["optimizer"], OPTIMIZERS, "train.optimizer")
    require_choice(cfg["mixed_precision"], MIXED_PRECISION, "train.mixed_precision")
    require_choice(cfg["timestep_sampling"], TIMESTEP_SAMPLINGS, "train.timestep_sampling")
    require_choice(cfg["loss_weighting"], LOSS_WEIGHTINGS, "train.loss_weighting")
    for tracker in cfg.get("report_to", []):
        require_choice(tracker, TRACKERS, "train.report_to[]")
    if not 0 <= cfg["caption_dropout"] <= 1:
        raise UserError(f"params.yaml: train.caption_dropout={cfg['caption_dropout']} must be in [0, 1]")
    check_quantization(cfg.get("base_quantization", "none"), device)
    validation = cfg.get("validation") or {}
    require_positive(validation.get("every", 0), "train.validation.every", allow_zero=True)
    if device.type != "cuda":
        if cfg["optimizer"] == "adamw8bit":
            raise UserError("train.optimizer=adamw8bit (bitsandbytes) needs a CUDA GPU; "
                            "use adamw or prodigy on CPU")
        if cfg["mixed_precision"] == "fp16":
            raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")


def run_hash(params: dict[str, Any], cache_fingerprint: str, world_size: int) -> str:
    model_cfg = {k: v for k, v in params["model"].items() if k != "device"}
    train_cfg = {k: v for k, v in params["train"].items() if k not in NOT_SHAPING}
    return fingerprint(model_cfg, params["lora"], train_cfg, cache_fingerprint, world_size)


class BucketBatches:
    """Batches drawn within one aspect bucket, in an order that is a pure function of
    (seed, epoch): a resumed run sees exactly the batches the interrupted one would have."""

    def __init__(self, samples: list[dict[str, Any]], batch_size: int, seed: int):
        self.batch_size, self.seed = batch_size, seed
        self.by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, sample in enumerate(samples):
            self.by_bucket.setdefault(tuple(sample["bucket"]), []).append(i)
        self.batches_per_epoch = sum(math.ceil(len(v) / batch_size) for v in self.by_bucket.values())

    @lru_cache(maxsize=2)
    def epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for bucket in sorted(self.by_bucket):
            members = self.by_bucket[bucket]
            order = [members[i] for i in torch.randperm(len(members), generator=generator)]
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator)]

    def __getitem__(self, micro_batch: int) -> list[int]:
        epoch, position = divmod(micro_batch, self.batches_per_epoch)
        return self.epoch(epoch)[position]


class MicroBatches(torch.utils.data.Dataset):
    """Item ``k`` is this process's ``k``-th micro-batch, ready to move to the device.

    Served through a DataLoader so workers read (and pin) the next batches from the cache while
    the GPU trains on the current one; the content of every item depends only on ``k``, so the
    number of workers never changes what is trained.
    """

    def __init__(self, cache: CacheReader, cfg: dict[str, Any], sampling: TimestepSampling,
                 world: int, rank: int):
        self.cache, self.cfg, self.sampling, self.world, self.rank = cache, cfg, sampling, world, rank
        self.order = BucketBatches(cache.samples, cfg["batch_size"], cfg["seed"])

    def __len__(self) -> int:
        return self.cfg["max_steps"] * self.cfg["gradient_accumulation_steps"]

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        micro_batch = k * self.world + self.rank
        return load_batch(self.cache, self.order[micro_batch],
                          micro_batch_generator(self.cfg["seed"], micro_batch),
                          self.cfg["caption_dropout"], self.sampling)


def micro_batch_loader(dataset: MicroBatches, start_step: int, workers: int, pin: bool):
    first = start_step * dataset.cfg["gradient_accumulation_steps"]
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(first, len(dataset)), num_workers=workers,
        pin_memory=pin, prefetch_factor=4 if workers else None, persistent_workers=False)


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


def make_optimizer(cfg: dict[str, Any], trainable: list[torch.nn.Parameter], device):
    if cfg["optimizer"] == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise UserError("train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(trainable, lr=cfg["learning_rate"], weight_decay=cfg["adam_weight_decay"])
    if cfg["optimizer"] == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(trainable, lr=cfg["learning_rate"], weight_decay=cfg["adam_weight_decay"])
    return torch.optim.AdamW(trainable, lr=cfg["learning_rate"], weight_decay=cfg["adam_weight_decay"],
                             fused=device.type == "cuda")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def save_loss_plot(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".")
    ax.set(xlabel="optimizer step", ylabel="flow-matching loss", title="LoRA training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def run(params: dict[str, Any], cache_dir: Path = CACHE_DIR, lora_dir: Path = LORA_DIR,
        checkpoint_dir: Path = CHECKPOINT_DIR, metrics_path: Path = METRICS,
        loss_plot: Path = LOSS_PLOT, live_dir: Path = LIVE_DIR, log_dir: Path = LOG_DIR,
        stop_after: int | None = None) -> dict[str, Any]:
    """Train; ``stop_after`` ends the process-free loop early (tests simulate an interruption)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import _collate_lora_metadata, cast_training_params
    from diffusers import FluxPipeline

    model_cfg, lora_cfg, cfg = (section(params, s) for s in ("model", "lora", "train"))
    device = resolve_device(model_cfg)
    validate(cfg, device)
    cache = CacheReader(cache_dir)
    if cache.index["base_model"] != model_cfg["pretrained"]:
        raise UserError(f"the encode cache was made with {cache.index['base_model']}, not "
                        f"{model_cfg['pretrained']}; re-run encode (`dvc repro encode`)")
    checkpoint_dir, lora_dir = Path(checkpoint_dir), Path(lora_dir)
    trackers = list(cfg.get("report_to", ["dvclive", "tensorboard"]))

    accelerator = Accelerator(
        mixed_precision=MIXED_PRECISION[cfg["mixed_precision"]], cpu=device.type == "cpu",
        dynamo_backend="inductor" if cfg.get("compile") else "no",
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(checkpoint_dir), logging_dir=str(log_dir)))
    rank, world = accelerator.process_index, accelerator.num_processes
    this_run = run_hash(params, cache.index["fingerprint"], world)
    set_seed(cfg["seed"])

    model_folder = resolve_pretrained(model_cfg["pretrained"], model_cfg.get("revision"))
    validation = cfg.get("validation") or {}
    sampler = None
    if validation.get("every") and accelerator.is_main_process:
        # Before the transformer loads: the text encoders come and go while memory is still free.
        sampler = ValidationSampler(validation, model_folder, resolve_dtype(model_cfg),
                                    accelerator.device, cache.index["max_sequence_length"])
    transformer = load_transformer(model_folder, resolve_dtype(model_cfg),
                                   cfg.get("base_quantization", "none"))
    transformer.requires_grad_(False)
    config = lora_config(lora_cfg, transformer)  # validates targets against this model
    transformer.add_adapter(config)
    cast_training_params(transformer, dtype=torch.float32)  # LoRA weights train in fp32
    if cfg["gradient_checkpointing"]:
        transformer.enable_gradient_checkpointing()
    transformer.to(accelerator.device)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, trainable, accelerator.device)
    scheduler = get_scheduler(cfg["lr_scheduler"], optimizer, num_warmup_steps=cfg["lr_warmup_steps"],
                              num_training_steps=cfg["max_steps"])
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    # Stepped by hand once per optimizer step (a prepared scheduler steps once per process).
    accelerator.register_for_checkpointing(scheduler)
    _register_lora_hooks(accelerator)

    start_step, history = 0, []
    if cfg.get("resume_from"):
        resume = checkpoints.explicit_resume(Path(cfg["resume_from"]), model_cfg["pretrained"],
                                             lora_fingerprint(lora_cfg))
    else:
        resume = checkpoints.select_resume(checkpoint_dir, this_run, cfg["max_steps"],
                                           log=accelerator.print) if accelerator.is_main_process else None
        resume = _broadcast(accelerator, resume)
    if resume:
        folder, meta = resume
        accelerator.load_state(str(folder))
        start_step, history = meta["step"], meta["history"]
        accelerator.print(f"train: resuming from {folder} at step {start_step} of {cfg['max_steps']}")

    accelerator.init_trackers("impressionist", config=_flat(params), init_kwargs={
        "dvclive": {"dir": str(live_dir), "save_dvc_exp": False, "dvcyaml": None}})
    for past in history:  # a resumed run's logs still show the whole curve
        accelerator.log({k: v for k, v in past.items() if k != "step"}, step=past["step"])

    sampling = TimestepSampling(cfg["timestep_sampling"], cfg["logit_mean"], cfg["logit_std"],
                                cfg["mode_scale"])
    batches = iter(micro_batch_loader(MicroBatches(cache, cfg, sampling, world, rank), start_step,
                                      cfg.get("dataloader_workers", 0), accelerator.device.type == "cuda"))
    accumulation = cfg["gradient_accumulation_steps"]
    images_per_step = cfg["batch_size"] * accumulation * world
    step, started = start_step, time.perf_counter()
    transformer.train()
    while step < cfg["max_steps"]:
        step_started = time.perf_counter()
        losses = []
        for micro in range(accumulation):
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
            sync = micro == accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(transformer):
                loss = flow_matching_loss(transformer, guidance_scale=cfg["guidance_scale"],
                                          weighting=cfg["loss_weighting"], **batch)
                accelerator.backward(loss / accumulation)
            losses.append(loss.detach())
        grad_norm = (accelerator.clip_grad_norm_(trainable, cfg["max_grad_norm"])
                     if cfg["max_grad_norm"] > 0 else None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % cfg["log_every"] == 0 or step == cfg["max_steps"]:
            # The only host-device sync of the loop, once per log interval.
            seconds = time.perf_counter() - step_started
            entry = {"step": step,
                     "loss": accelerator.reduce(torch.stack(losses).mean(), "mean").item(),
                     "lr": scheduler.get_last_lr()[0],
                     "step_time_s": seconds,
                     "images_per_s": images_per_step / seconds,
                     "peak_memory_gb": peak_memory_gb(accelerator.device)}
            if grad_norm is not None:
                entry["grad_norm"] = float(grad_norm)
            history.append(entry)
            accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=step)
            accelerator.print(f"train: step {step}/{cfg['max_steps']} loss {entry['loss']:.4f}")
        # The last step is checkpointed too, so raising train.max_steps later continues from it.
        if sampler is not None and step % validation["every"] == 0:
            _log_validation_images(accelerator, sampler, transformer, step)
        if cfg["checkpoint_every"] and (step % cfg["checkpoint_every"] == 0 or step == cfg["max_steps"]):
            _save_checkpoint(accelerator, checkpoint_dir, step, this_run, history, model_cfg, lora_cfg, cfg)
        if stop_after is not None and step >= stop_after:
            accelerator.end_training()
            return {"stopped_at": step}

    accelerator.wait_for_everyone()
    final_lora = lora_state_dict(accelerator, transformer)
    rank_checksums = _gather_checksums(accelerator, final_lora)
    if len(set(rank_checksums)) != 1:
        raise RuntimeError(f"LoRA weights differ between processes: {rank_checksums}")
    summary = {}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(transformer)
        summary = {
            "steps": step, "resumed_from_step": start_step,
            "final_loss": history[-1]["loss"],
            "train_samples": len(cache.samples),
            "seconds": round(time.perf_counter() - started, 2),
            "run_hash": this_run,
        }
        with atomic_dir(lora_dir) as tmp:
            FluxPipeline.save_lora_weights(
                tmp, transformer_lora_layers=final_lora,
                **_collate_lora_metadata({"transformer": unwrapped}))
            (tmp / "training_config.json").write_text(json.dumps(
                {"base_model": model_cfg["pretrained"], "lora": lora_cfg, "train": cfg,
                 "run_hash": this_run, "steps": step, "rank_checksums": rank_checksums,
                 "history": history}, indent=1))
        atomic_write_text(metrics_path, json.dumps(
            {k: summary[k] for k in ("steps", "final_loss", "train_samples")}, indent=1))
        save_loss_plot(history, Path(loss_plot))
        print(f"train: saved LoRA after {step} steps (loss {summary['final_loss']:.4f}) -> {lora_dir}")
    accelerator.end_training()
    return summary


def _save_checkpoint(accelerator, root: Path, step: int, this_run: str, history, model_cfg, lora_cfg, cfg):
    staged = checkpoints.staging_folder(root, step)
    accelerator.save_state(str(staged))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = checkpoints.publish(root, step, {
            "run_hash": this_run, "step": step, "base_model": model_cfg["pretrained"],
            "lora": lora_fingerprint(lora_cfg), "history": history}, keep=cfg["keep_checkpoints"])
        accelerator.print(f"train: checkpoint {final}")
    accelerator.wait_for_everyone()


def lora_fingerprint(lora_cfg: dict[str, Any]) -> str:
    """What a checkpoint's LoRA tensors must agree with to be loadable."""
    return fingerprint(lora_cfg.get("rank"), lora_cfg.get("alpha"), lora_cfg.get("targets"))


def _log_validation_images(accelerator, sampler, transformer, step: int) -> None:
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


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    run(load_params(args.params))


if __name__ == "__main__":
    main()
