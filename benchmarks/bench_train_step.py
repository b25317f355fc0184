"""Time LoRA training steps: ours (cached latents and embeddings) against a baseline step written
the way diffusers' train_dreambooth_lora_flux.py runs without caches (VAE and both text encoders
every step, per-image captions).

    python benchmarks/bench_train_step.py --profile cpu       # tiny model, seconds, runs anywhere
    python benchmarks/bench_train_step.py --profile gpu       # full FLUX.1-dev architecture, random bf16
    python benchmarks/bench_train_step.py --profile estimate  # full FLUX.1-dev architecture, no GPU needed

Weights are random (built from configs, nothing downloaded): they do not change speed or memory.
The estimate profile runs the full-size steps on fake tensors (shapes and dtypes, no data): it
counts their FLOPs and follows every tensor they allocate, which gives the compute floor of a step
and its peak tensor memory without a GPU. It times nothing.
Prints a table (ratios first) and, with --out, appends it to a Markdown results file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import platform
import statistics
import sys
import time
import weakref
from dataclasses import dataclass

import torch
from results_file import command_line, publish
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from impressionist.flux_math import flow_matching_loss
from impressionist.lora import lora_config
from impressionist.params.training import LoraParams

# bf16 dense peak of the GPUs we expect; used for a utilisation estimate only.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "RTX 4090": 165.0}


@dataclass
class Models:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    clip: torch.nn.Module
    t5: torch.nn.Module
    clip_vocab: int
    t5_vocab: int

    def frozen(self, device: torch.device | str, dtype: torch.dtype) -> "Models":
        for module in (self.transformer, self.vae, self.clip, self.t5):
            module.to(device=device, dtype=dtype).requires_grad_(False)
        return self


# FLUX.1-dev's published configs (transformer, VAE, CLIP-L and T5-XXL text encoders).
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56))
FLUX_DEV_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], norm_num_groups=32, use_quant_conv=False,
    use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)


def build_full_size(device: torch.device | str, dtype: torch.dtype) -> Models:
    """FLUX.1-dev's four networks with random weights, built directly on ``device`` ("meta": no
    memory) in ``dtype``: built in fp32 first, the transformer and T5-XXL alone would need 67 GB."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            models = Models(FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER), AutoencoderKL(**FLUX_DEV_VAE),
                            CLIPTextModel(CLIPTextConfig(**CLIP_L)), T5EncoderModel(T5Config(**T5_XXL)),
                            CLIP_L["vocab_size"], T5_XXL["vocab_size"])
    finally:
        torch.set_default_dtype(default_dtype)
    return models.frozen(device, dtype)


def build_models(profile: str, device: torch.device, dtype: torch.dtype) -> Models:
    torch.manual_seed(0)
    if profile != "cpu":
        return build_full_size(device, dtype)  # on the GPU directly: no 24 GB CPU copy
    from impressionist.tiny_flux import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline()
    return Models(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2,
                  pipe.text_encoder.config.vocab_size, pipe.text_encoder_2.config.vocab_size).frozen(device, dtype)


def remove_lora(transformer: torch.nn.Module) -> None:
    """Put the plain base layers back (a new adapter then wraps whatever they have become, e.g. NF4)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in transformer.modules()):
        transformer.unload_lora()


def nf4_quantized_names(transformer: torch.nn.Module) -> set[str]:
    """The Linears the trainer's NF4 load makes 4-bit (module names without peft's ``.base_layer``),
    decided by diffusers itself: its module swap (``replace_with_bnb_linear``, what from_pretrained
    runs) with the trainer's config, on an empty copy of the architecture."""
    import bitsandbytes as bnb
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    from impressionist.models import nf4_config

    with torch.device("meta"):
        empty = type(transformer).from_config(transformer.config)
    config = nf4_config(torch.bfloat16, double_quant=True)
    replace_with_bnb_linear(empty, modules_to_not_convert=config.llm_int8_skip_modules, quantization_config=config)
    return {name for name, module in empty.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def quantize_nf4(transformer: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make the transformer NF4 as the trainer's load does: diffusers' module swap with the
    trainer's config (double quantisation, the same 16-bit modules), each weight quantised on its
    device, then the trainer's QLoRA preparation (the 16-bit rest widened to fp32)."""
    import bitsandbytes as bnb
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    from impressionist.models import nf4_config, prepare_nf4_for_training

    remove_lora(transformer)
    config = nf4_config(dtype, double_quant=True)
    sources = {name: m for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    replace_with_bnb_linear(transformer, modules_to_not_convert=config.llm_int8_skip_modules, quantization_config=config)
    for name, layer in transformer.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            source = sources.pop(name)  # its 16-bit weight is freed once quantised
            layer.weight = bnb.nn.Params4bit(source.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, module=layer).to(source.weight.device)
            layer.bias = None if source.bias is None else torch.nn.Parameter(source.bias.data, requires_grad=False)
    prepare_nf4_for_training(transformer)


@dataclass
class Case:
    name: str
    resolution: int
    checkpointing: bool
    nf4: bool = False


def add_fresh_lora(transformer: torch.nn.Module, case: Case, args) -> list[torch.nn.Parameter]:
    """A new rank-``args.rank`` LoRA (fp32, as the trainer keeps it) on ``args.targets`` (a
    ``lora.targets`` preset; attention when not given); its params."""
    remove_lora(transformer)
    targets = getattr(args, "targets", "attention")
    transformer.add_adapter(lora_config(LoraParams(rank=args.rank, alpha=args.rank, targets=targets),
                                        transformer))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if case.checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    transformer.train()
    return [p for p in transformer.parameters() if p.requires_grad]


def step_functions(models: Models, case: Case, args, device, dtype):
    """Two ways to get one step's loss: ``ours`` from cached latents and embeddings (copied from
    pinned CPU memory, as the trainer's loader does), ``baseline`` running the VAE and both text
    encoders first, as the reference script does without caches."""
    transformer = models.transformer
    b, res = args.batch_size, case.resolution
    latent = res // 8
    seq_t5, seq_clip = args.max_sequence_length, 77
    pin = device.type == "cuda"
    cached = {
        "latents": torch.randn(b, 16, latent, latent),
        "prompt_embeds": torch.randn(b, seq_t5, models.t5.config.d_model),
        "pooled_prompt_embeds": torch.randn(b, models.clip.config.hidden_size),
    }
    if pin:
        cached = {k: v.pin_memory() for k, v in cached.items()}
    images = torch.rand(b, 3, res, res, device=device, dtype=dtype) * 2 - 1
    t5_ids = torch.randint(0, models.t5_vocab, (b, seq_t5), device=device)
    clip_ids = torch.randint(0, models.clip_vocab, (b, seq_clip), device=device)
    shift, scale = models.vae.config.shift_factor, models.vae.config.scaling_factor

    def loss_from(latents, embeds, pooled):
        noise = torch.randn_like(latents)
        sigmas = torch.rand(b, device=device)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with autocast:
            return flow_matching_loss(transformer, latents, noise, sigmas, embeds, pooled, 1.0)

    def ours():
        batch = {k: v.to(device, non_blocking=True) for k, v in cached.items()}
        return loss_from(batch["latents"].float(), batch["prompt_embeds"].to(dtype),
                         batch["pooled_prompt_embeds"].to(dtype))

    def baseline():
        with torch.no_grad():
            latents = (models.vae.encode(images).latent_dist.sample() - shift) * scale
            embeds = models.t5(t5_ids)[0]
            pooled = models.clip(clip_ids).pooler_output
        return loss_from(latents.float(), embeds, pooled)

    return ours, baseline


def train_step(loss_fn, optimizer) -> None:
    loss = loss_fn()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_flops(loss_fn, optimizer) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_FLASH_ATTENTION_FLOPS) as counter:
        train_step(loss_fn, optimizer)
    return counter.get_total_flops()


def run_case(models: Models, case: Case, args, device, dtype) -> dict:
    trainable = add_fresh_lora(models.transformer, case, args)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    # train.ema_decay > 0 keeps one fp32 copy of the LoRA on the device (updated after each step)
    ema_copy = [p.detach().clone() for p in trainable] if getattr(args, "ema", False) else []  # noqa: F841
    result = {"case": case.name}
    # All four networks stay on the GPU; "ours" never uses the VAE and text encoders, so their
    # bytes are left out of its peak (which then compares with the estimate profile's).
    unused_by_ours = sum(t.numel() * t.element_size() for t in module_tensors(models.vae, models.clip, models.t5))
    for label, fn in zip(("ours", "baseline"), step_functions(models, case, args, device, dtype)):
        # FLOPs first and apart: the counter keeps tensors alive, which would inflate the peak.
        flops = count_flops(fn, optimizer)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            train_step(fn, optimizer)
        times = []
        for _ in range(args.steps):  # each step timed on its own (a sync apiece): n steps and their spread
            sync(device)
            start = time.perf_counter()
            train_step(fn, optimizer)
            sync(device)
            times.append(time.perf_counter() - start)
        seconds = statistics.mean(times)
        result[label] = {
            "s_per_step": seconds, "s_std": statistics.stdev(times) if len(times) > 1 else float("nan"),
            "images_per_s": args.batch_size / seconds, "gflop_per_step": flops / 1e9,
            "peak_gib": (torch.cuda.max_memory_allocated() - (unused_by_ours if label == "ours" else 0)) / 2**30
            if device.type == "cuda" else None,
        }
    return result


# FlopCounterMode knows the CUDA attention kernels; the CPU flash kernel (what fake tensors on the
# CPU dispatch to) does the same work.
CPU_FLASH_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(grad_out, q, k, v),
}


class PeakTensorMemory(TorchDispatchMode):
    """Bytes of tensor storage alive at once, following every op's outputs (real or fake tensors).

    ``resident`` tensors (weights, inputs) count from the start; a storage leaves the count when it
    is freed. Allocator rounding, fragmentation and the CUDA context are not included.
    """

    def __init__(self, resident=()):
        super().__init__()
        self.current = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}
        for tensor in resident:
            self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)  # views share their base's storage object: counted once
        if key in self._alive:
            return
        nbytes = storage.nbytes()

        def release(_ref, key=key, nbytes=nbytes):
            if self._alive.pop(key, None) is not None:
                self.current -= nbytes

        self._alive[key] = weakref.ref(storage, release)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out


def to_fake(module: torch.nn.Module, fake_mode) -> None:
    """Replace every parameter and buffer (e.g. built on "meta") by a fake CPU tensor of the same
    shape, dtype and trainability. (``module.to`` cannot: fake parameters refuse to be swapped.)"""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                with fake_mode:
                    fake = torch.empty(param.shape, dtype=param.dtype)
                sub._parameters[name] = torch.nn.Parameter(fake, requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                with fake_mode:
                    sub._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)


def module_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


# bitsandbytes NF4 as the trainer loads it (QLoRA double quantisation): 4 bits a weight, one 8-bit
# absmax per block of 64 weights and one fp32 absmax per 256 such blocks.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)


def nf4_memory_change(transformer: torch.nn.Module) -> tuple[int, int]:
    """(bytes an NF4 base adds, negative: what it saves; the largest transient dequantised weight).

    The Linears the trainer's NF4 load quantises (:func:`nf4_quantized_names`: the blocks' and
    the output projection) shrink from 16-bit to NF4; every other frozen 16-bit weight (the
    embedders, norm_out, norms, biases) grows to fp32, as the trainer's QLoRA preparation casts
    them. bitsandbytes dequantises one weight at a time.
    """
    names = nf4_quantized_names(transformer)
    quantised = {id(m.weight) for name, m in transformer.named_modules()
                 if type(m) is torch.nn.Linear and name.removesuffix(".base_layer") in names}
    frozen = [p for p in transformer.parameters() if not p.requires_grad]
    saved = sum(p.numel() * (p.element_size() - NF4_BYTES_PER_WEIGHT) for p in frozen if id(p) in quantised)
    grown = sum(p.numel() * (4 - p.element_size()) for p in frozen if id(p) not in quantised)
    largest = max(p.numel() * p.element_size() for p in frozen if id(p) in quantised)
    return int(grown - saved), largest


def measure_steps(models: Models, case: Case, args, dtype) -> dict:
    """FLOPs and peak tensor memory of one CPU training step of each kind (its LoRA already added);
    the tensors may be real or, under a FakeTensorMode, fake."""
    trainable = [p for p in models.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)
    ours, baseline = step_functions(models, case, args, torch.device("cpu"), dtype)
    result = {"case": case.name}
    for label, fn, resident in (("ours", ours, [models.transformer]),
                                # the reference script keeps the VAE and text encoders resident
                                ("baseline", baseline, [models.transformer, models.vae, models.clip, models.t5])):
        flops = count_flops(fn, optimizer)
        optimizer.state.clear()  # the measured step allocates its own Adam state
        memory = PeakTensorMemory(module_tensors(*resident))
        with memory:
            train_step(fn, optimizer)
        peak = memory.peak + ema_bytes(trainable, args)
        if case.nf4:
            change, transient = nf4_memory_change(models.transformer)
            peak += change + transient
        result[label] = {"gflop_per_step": flops / 1e9, "peak_gib": peak / 2**30}
    return result


def ema_bytes(trainable: list[torch.nn.Parameter], args) -> int:
    """The EMA of the LoRA (``train.ema_decay`` > 0): one more fp32 copy of every trainable tensor,
    resident for the whole run."""
    return sum(p.numel() * 4 for p in trainable) if getattr(args, "ema", False) else 0


def estimate_case(models: Models, case: Case, args, dtype) -> dict:
    """FLOPs and peak tensor memory of one full-size training step, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    add_fresh_lora(models.transformer, case, args)  # on "meta"
    fake_mode = FakeTensorMode()
    for module in (models.transformer, models.vae, models.clip, models.t5):
        to_fake(module, fake_mode)
    with fake_mode:
        return measure_steps(models, case, args, dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_name() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["cpu", "gpu", "estimate"], default="cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-sequence-length", type=int, default=None)
    parser.add_argument("--resolutions", type=int, nargs="+", default=None,
                        help="image sides to run (default: 64 128 for cpu, 512 1024 otherwise)")
    parser.add_argument("--targets", default="all-linear-blocks", choices=["attention", "default", "all-linear-blocks", "all-linear"],
                        help="lora.targets preset (params.yaml's default: all-linear-blocks)")
    parser.add_argument("--ema", action="store_true", help="count the EMA copy of the LoRA (train.ema_decay > 0)")
    parser.add_argument("--cases", nargs="+", default=None,
                        help="run only these cases by name, e.g. 1024px+ckpt 1024px+ckpt+nf4 (default: all)")
    parser.add_argument("--out", help="append the results as Markdown to this file")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting whole random models to bf16 is intended here

    if args.profile == "gpu" and not torch.cuda.is_available():
        sys.exit("error: --profile gpu needs a CUDA GPU; use --profile cpu (timings) or "
                 "--profile estimate (full-size FLOPs and memory) here")
    full_size = args.profile != "cpu"
    device = torch.device("cuda" if args.profile == "gpu" else "cpu")
    dtype = torch.bfloat16 if full_size else torch.float32
    args.steps = args.steps or (10 if args.profile == "gpu" else 20)
    args.max_sequence_length = args.max_sequence_length or (512 if full_size else 64)
    resolutions = args.resolutions or ([512, 1024] if full_size else [64, 128])
    cases = [Case(f"{r}px{'+ckpt' if ckpt else ''}", r, ckpt) for r in resolutions for ckpt in (False, True)]
    nf4_cases = [Case(f"{r}px+ckpt+nf4", r, True, nf4=True) for r in resolutions] if full_size else []
    if args.cases:
        unknown = sorted(set(args.cases) - {c.name for c in cases + nf4_cases})
        if unknown:
            sys.exit(f"error: unknown --cases {', '.join(unknown)}; "
                     f"choose from {', '.join(c.name for c in cases + nf4_cases)}")
        cases = [c for c in cases if c.name in args.cases]
        nf4_cases = [c for c in nf4_cases if c.name in args.cases]

    if args.profile == "estimate":
        # a fresh meta-built set per case: fake parameters cannot take a new adapter
        rows = [estimate_case(build_full_size("meta", dtype), case, args, dtype)
                for case in cases + nf4_cases]
    else:
        models = build_models(args.profile, device, dtype)
        rows = [run_case(models, case, args, device, dtype) for case in cases]
        if nf4_cases:
            quantize_nf4(models.transformer, dtype)
            rows += [run_case(models, case, args, device, dtype) for case in nf4_cases]
    text = estimate_table(rows, args) if args.profile == "estimate" else timing_table(rows, args, device)
    publish(text, args.out)


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def header(args, device_name: str, details: str) -> list[str]:
    return [f"### {args.profile} profile — {device_name}, {dt.date.today()}",
            f"`{command_line(__file__)}` (torch {torch.__version__}, "
            f"batch {args.batch_size}, LoRA rank {args.rank} on {args.targets}"
            f"{' + its EMA' if args.ema else ''}, T5 length "
            f"{args.max_sequence_length}{details})", ""]


def timing_table(rows: list[dict], args, device) -> str:
    peak = peak_tflops(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    lines = header(args, device_name, f", n = {args.steps} timed steps after {args.warmup} warm-up, "
                   "s/step as mean ± sample std; MFU: counted FLOPs / s / the GPU's dense bf16 peak") + [
        "| case | speed-up (ours/baseline) | ours s/step | baseline s/step | ours img/s | "
        "ours GFLOP/step | ours peak GiB | baseline peak GiB | ours MFU |",
        "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ours, base = row["ours"], row["baseline"]
        mfu = f"{ours['gflop_per_step'] / 1e3 / ours['s_per_step'] / peak:.0%}" if peak else "n/a"
        lines.append(f"| {row['case']} | {base['s_per_step'] / ours['s_per_step']:.2f}x | "
                     f"{ours['s_per_step']:.4f} ± {ours['s_std']:.4f} | {base['s_per_step']:.4f} ± {base['s_std']:.4f} | "
                     f"{ours['images_per_s']:.2f} | {ours['gflop_per_step']:.2f} | "
                     f"{gib(ours['peak_gib'])} | {gib(base['peak_gib'])} | {mfu} |")
    return "\n".join(lines) + "\n"


def estimate_table(rows: list[dict], args) -> str:
    h100 = PEAK_BF16_TFLOPS["H100"]
    lines = header(args, f"fake tensors on {cpu_name()}", "; bf16 weights, fp32 LoRA") + [
        "| case | FLOP ratio (baseline/ours) | ours TFLOP/step | baseline TFLOP/step | "
        f"ours s/step at H100 bf16 peak ({h100:.0f} TFLOP/s) | ours peak GiB | baseline peak GiB |",
        "|---|---|---|---|---|---|---|"]
    for row in rows:
        ours, base = row["ours"], row["baseline"]
        lines.append(f"| {row['case']} | {base['gflop_per_step'] / ours['gflop_per_step']:.2f}x | "
                     f"{ours['gflop_per_step'] / 1e3:.1f} | {base['gflop_per_step'] / 1e3:.1f} | "
                     f"{ours['gflop_per_step'] / 1e3 / h100:.3f} | {gib(ours['peak_gib'])} | "
                     f"{gib(base['peak_gib'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
