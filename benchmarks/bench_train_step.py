"""Time LoRA training steps: ours (cached latents and embeddings) against a baseline step written
the way diffusers' train_dreambooth_lora_flux.py runs without caches (VAE and both text encoders
every step, per-image captions).

    python benchmarks/bench_train_step.py --profile cpu          # tiny model, seconds, runs anywhere
    python benchmarks/bench_train_step.py --profile gpu          # full FLUX.1-dev architecture, random bf16

Weights are random (built from configs, nothing downloaded): they do not change speed or memory.
Prints a table (ratios first) and, with --out, appends it to a Markdown results file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import platform
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from impressionist.flux_math import flow_matching_loss
from impressionist.lora import lora_config

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


def build_models(profile: str, device: torch.device, dtype: torch.dtype) -> Models:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    if profile == "cpu":
        from impressionist.tiny_flux import build_tiny_flux_pipeline

        pipe = build_tiny_flux_pipeline()
        models = Models(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2,
                        pipe.text_encoder.config.vocab_size, pipe.text_encoder_2.config.vocab_size)
    else:
        # FLUX.1-dev's published configs; building directly on the GPU avoids a CPU copy.
        with torch.device(device):
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[128, 256, 512, 512], norm_num_groups=32,
                use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
            clip = CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                projection_dim=768))
            t5 = T5EncoderModel(T5Config(
                vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32))
        models = Models(transformer, vae, clip, t5, 49408, 32128)
    for module in (models.transformer, models.vae, models.clip, models.t5):
        module.to(device=device, dtype=dtype).requires_grad_(False)
    return models


def quantize_nf4(transformer: torch.nn.Module, dtype: torch.dtype) -> None:
    """Swap the block Linears for bitsandbytes NF4 layers, as a QLoRA load would (GPU only)."""
    import bitsandbytes as bnb

    for name, module in list(transformer.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and "transformer_blocks" in f"{name}.{child_name}":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                                 quant_type="nf4").to(child.weight.device)
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, layer)


@dataclass
class Case:
    name: str
    resolution: int
    checkpointing: bool
    nf4: bool = False


def run_case(models: Models, case: Case, args, device, dtype) -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer

    transformer = models.transformer
    # fresh LoRA per case
    if any(isinstance(m, BaseTunerLayer) for m in transformer.modules()):
        transformer.delete_adapters("default")
    transformer.add_adapter(lora_config({"rank": args.rank, "alpha": args.rank, "targets": "attention"},
                                        transformer))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if case.checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    transformer.train()
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")

    b, res = args.batch_size, case.resolution
    latent = res // 8
    seq_t5, seq_clip = args.max_sequence_length, 77
    # "cache": pinned CPU tensors copied asynchronously, as the trainer's loader does
    pin = device.type == "cuda"
    cached = {
        "latents": torch.randn(b, 16, latent, latent).pin_memory() if pin else torch.randn(b, 16, latent, latent),
        "prompt_embeds": torch.randn(b, seq_t5, models.t5.config.d_model),
        "pooled_prompt_embeds": torch.randn(b, models.clip.config.hidden_size),
    }
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
        return loss_from(batch["latents"].float(), batch["prompt_embeds"].to(dtype), batch["pooled_prompt_embeds"].to(dtype))

    def baseline():
        with torch.no_grad():
            latents = (models.vae.encode(images).latent_dist.sample() - shift) * scale
            embeds = models.t5(t5_ids)[0]
            pooled = models.clip(clip_ids).pooler_output
        return loss_from(latents.float(), embeds, pooled)

    def step(fn):
        loss = fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = {"case": case.name}
    for label, fn in (("ours", ours), ("baseline", baseline)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            step(fn)
        with FlopCounterMode(display=False) as counter:
            step(fn)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step(fn)
        sync(device)
        seconds = (time.perf_counter() - start) / args.steps
        result[label] = {
            "s_per_step": seconds, "images_per_s": b / seconds,
            "gflop_per_step": counter.get_total_flops() / 1e9,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
    return result


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-sequence-length", type=int, default=None)
    parser.add_argument("--out", help="append the results as Markdown to this file")
    args = parser.parse_args()

    if args.profile == "gpu" and not torch.cuda.is_available():
        sys.exit("error: --profile gpu needs a CUDA GPU; use --profile cpu here")
    device = torch.device("cuda" if args.profile == "gpu" else "cpu")
    dtype = torch.bfloat16 if args.profile == "gpu" else torch.float32
    args.steps = args.steps or (10 if args.profile == "gpu" else 20)
    args.max_sequence_length = args.max_sequence_length or (512 if args.profile == "gpu" else 64)
    if args.profile == "cpu":
        cases = [Case("64px", 64, False), Case("128px", 128, False), Case("128px+ckpt", 128, True)]
    else:
        cases = [Case("512px", 512, False), Case("512px+ckpt", 512, True), Case("1024px+ckpt", 1024, True),
                 Case("1024px", 1024, False)]
    models = build_models(args.profile, device, dtype)
    rows = [run_case(models, case, args, device, dtype) for case in cases]
    if args.profile == "gpu":
        quantize_nf4(models.transformer, dtype)
        rows += [run_case(models, Case(f"{r}px+ckpt+nf4", r, True, nf4=True), args, device, dtype)
                 for r in (512, 1024)]

    peak = peak_tflops(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    lines = [f"### {args.profile} profile — {device_name}, {dt.date.today()}",
             f"`python benchmarks/bench_train_step.py {' '.join(sys.argv[1:])}` (torch {torch.__version__}, "
             f"batch {args.batch_size}, LoRA rank {args.rank}, T5 length {args.max_sequence_length}, "
             f"{args.steps} timed steps after {args.warmup} warm-up)", "",
             "| case | speed-up (ours/baseline) | ours s/step | baseline s/step | ours img/s | "
             "ours GFLOP/step | ours peak GiB | baseline peak GiB | ours MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ours, base = row["ours"], row["baseline"]
        mfu = f"{ours['gflop_per_step'] / 1e3 / ours['s_per_step'] / peak:.0%}" if peak else "n/a"
        gib = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {row['case']} | {base['s_per_step'] / ours['s_per_step']:.2f}x | {ours['s_per_step']:.4f} | "
                     f"{base['s_per_step']:.4f} | {ours['images_per_s']:.2f} | {ours['gflop_per_step']:.2f} | "
                     f"{gib(ours['peak_gib'])} | {gib(base['peak_gib'])} | {mfu} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
