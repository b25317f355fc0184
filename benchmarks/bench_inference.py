"""Inference settings compared (impressionist.inference, as the app and the sample stages use them):
seconds per image, peak memory, weight sizes, and quality against the reference image at the same seed.

    python benchmarks/bench_inference.py --profile cpu       # tiny model and a random LoRA: the plumbing
    python benchmarks/bench_inference.py --profile gpu       # FLUX.1-dev + models/lora on a CUDA GPU
    python benchmarks/bench_inference.py --profile estimate  # FLUX.1-dev's peak memory per setting, no GPU

The reference is the unquantized model (bf16 on a GPU, fp32 on the CPU) at 28 steps (--steps) with the LoRA
as an adapter. Each other setting draws the same prompts and seeds; the quality proxies are the cosine
of its images' CLIP image embeddings with the reference's, and the zero-shot Impressionism
probability (the evaluate stage's style score). Times are per image after one warm-up image (which
pays for torch.compile), mean ± sample standard deviation over n images. A setting this machine cannot
run is a row with the one-line refusal the app and the sample stage give.

The estimate profile builds FLUX.1-dev's four networks on fake tensors (bench_train_step.py's
estimator) and follows every tensor a 1024² image allocates, phase by phase (T5 + CLIP, one
transformer step, VAE decode): weights resident per setting (all of them, or only the running model
under model offload) plus the largest phase's activations; fp8 and NF4 replace the 16-bit bytes of
the weights build_pipeline quantizes (fp8: the blocks' Linears; NF4: those and the output
projection, as diffusers converts them under models.nf4_config). Allocator slack and the CUDA
context (0.5-2 GB) come on top. Weight sizes count what tensors really hold (fp8 data + scales,
packed NF4 + absmax), and each row's pipeline is freed (garbage-collected: a compiled one sits in
reference cycles) and the CLIP scorer is off the device before the next row starts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_train_step import (CLIP_L, CPU_FLASH_ATTENTION_FLOPS, T5_XXL, PeakTensorMemory, build_full_size,
                              cpu_name, module_tensors, nf4_quantized_names, peak_tflops, to_fake)
from results_file import command_line, publish
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from impressionist.errors import UserError
from impressionist.inference import build_pipeline, check, lora_applied
from impressionist.params.inference import InferenceSettings

PROMPTS = ["impr3ssionism, a harbor at sunset", "impr3ssionism, a woman with a parasol in a field"]
# bitsandbytes NF4 as build_pipeline loads it (models.nf4_config without double quantisation): 4 bits
# a weight and one fp32 absmax per block of 64 (tests/test_benchmark.py checks it against bitsandbytes).
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64
# torchao float8 weights with one fp32 scale per output row (a few bytes per row: negligible).
FP8_BYTES_PER_WEIGHT = 1.0
# A 24 GB card (A10G, L4, RTX 4090) less ~7% for the CUDA context and allocator slack.
USABLE_24GB = 24e9 * 0.93


@dataclass
class Case:
    key: str
    name: str
    steps: int | None = None  # None: the reference's steps (--steps)
    settings: InferenceSettings = field(default_factory=InferenceSettings)


CASES = [
    Case("reference", "reference (adapter)"),
    Case("8-steps", "8 steps", 8), Case("4-steps", "4 steps", 4),
    Case("fused", "fused LoRA", settings=InferenceSettings(lora_mode="fused")),
    Case("compile", "torch.compile", settings=InferenceSettings(compile=True)),
    Case("fp8", "fp8 transformer", settings=InferenceSettings(quantization="fp8")),
    Case("nf4", "nf4 transformer", settings=InferenceSettings(quantization="nf4")),
    Case("nf4-offload", "nf4 + model offload", settings=InferenceSettings(quantization="nf4", offload="model")),
    Case("offload", "model offload", settings=InferenceSettings(offload="model")),
    Case("sequential", "sequential offload", settings=InferenceSettings(offload="sequential")),
]


def psnr(image, reference) -> float:
    """Peak signal-to-noise ratio of two 8-bit images, dB (inf when identical)."""
    import numpy as np

    mse = float(((np.asarray(image, dtype=np.float64) - np.asarray(reference, dtype=np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_lora(folder: str, out: Path, rank: int = 16) -> Path:
    """A LoRA on the attention layers with random (non-zero) A and B, in diffusers format."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    from impressionist.lora import LoraParams, lora_config
    from impressionist.models import load_pipeline

    torch.manual_seed(0)
    transformer = load_pipeline(folder, torch.float32).transformer
    config = lora_config(LoraParams(rank=rank, alpha=rank, targets="attention"), transformer)
    transformer.add_adapter(config)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return out


def stored_bytes(tensor: torch.Tensor) -> int:
    """The bytes a tensor really holds: a torchao fp8 weight's inner fp8 data and scales (its
    wrapper reports a 16-bit storage), a bitsandbytes 4-bit weight's packed data and block absmax
    (double quantisation: 8-bit absmax, their own fp32 absmax and offset), else its storage."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    total = tensor.untyped_storage().nbytes()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        total += state.absmax.nbytes
        if state.nested:
            total += state.state2.absmax.nbytes + state.offset.nbytes
    return total


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(stored_bytes(t) for t in module_tensors(module))


@contextlib.contextmanager
def scorer_on(scorer, device: torch.device):
    """The CLIP scorer on ``device`` only while it scores: a ViT-L-14 on the GPU would sit in
    every row's peak memory."""
    scorer.model.to(device)
    scorer.device = device
    try:
        yield scorer
    finally:
        scorer.model.to("cpu")
        scorer.device = torch.device("cpu")
        free_device_memory(device)


def free_device_memory(device: torch.device) -> None:
    """Free what the last row left: a compiled pipeline sits in reference cycles, so it is only
    collected by the garbage collector, before the allocator's cache can be emptied."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, args, folder: str, lora: str, device: torch.device, dtype: torch.dtype, scorer,
             reference: dict | None) -> dict:
    steps = case.steps if case.steps is not None else args.steps
    row = {"case": case.name, "steps": steps}
    try:
        check(case.settings, device, "setting", dtype)
    except UserError as err:
        return {**row, "refused": str(err)}
    pipe = build_pipeline(folder, dtype, device, case.settings, lora=lora)

    def draw(prompt, seed):
        with lora_applied(pipe, case.settings, 1.0), torch.no_grad():
            return pipe(prompt, height=args.resolution, width=args.resolution, num_inference_steps=steps,
                        guidance_scale=3.5, max_sequence_length=args.max_sequence_length,
                        generator=torch.Generator("cpu").manual_seed(seed)).images[0]

    draw(PROMPTS[0], 1000)  # warm-up: compilation, lazy initialisation
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    jobs = [(PROMPTS[i % len(PROMPTS)], i) for i in range(args.images)]
    images, seconds = [], []
    for prompt, seed in jobs:
        sync(device)
        start = time.perf_counter()
        images.append(draw(prompt, seed))
        sync(device)
        seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    elif not case.settings.compile:  # tensor bytes of one more image, weights included
        memory = PeakTensorMemory(module_tensors(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2))
        with memory:
            draw(*jobs[0])
        peak = memory.peak / 2**30
    else:
        peak = None  # a dispatch mode would change what the compiled graph runs
    if case.settings.quantization == "none" and not case.settings.compile:
        # the bf16 maths of one image (text encoders, every step, VAE decode): the floor a quantized
        # or compiled setting at the same steps is measured against too
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False, custom_mapping=CPU_FLASH_ATTENTION_FLOPS) as counter:
            draw(*jobs[0])
        row["tflop_image"] = counter.get_total_flops() / 1e12
    transformer_gib = tensor_bytes(pipe.transformer) / 2**30
    del pipe
    if case.settings.compile:
        torch._dynamo.reset()  # its caches hold the compiled blocks' code and guards
    free_device_memory(device)
    with scorer_on(scorer, device):
        features = scorer.image_features(images)
        style = scorer.style_probabilities(features)[:, scorer.target_index].tolist()
    row.update(n=len(seconds), s_mean=statistics.mean(seconds),
               s_std=statistics.stdev(seconds) if len(seconds) > 1 else float("nan"),
               peak_gib=peak, transformer_gib=transformer_gib, features=features, style=style)
    row["images"] = images
    if reference is not None:
        cosines = (features * reference["features"]).sum(dim=-1).tolist()
        row.update(cos_mean=statistics.mean(cosines), cos_std=statistics.stdev(cosines) if len(cosines) > 1 else 0.0,
                   psnr=[psnr(a, b) for a, b in zip(images, reference["images"])])
    return row


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def timing_table(rows: list[dict], args, device, lora_mib: float) -> str:
    peak_tf = peak_tflops(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "tensor bytes alive at once"
    lines = [f"### inference {args.profile} profile — {device_name}, {dt.date.today()}",
             f"`{command_line(__file__)}` (torch {torch.__version__}, base {args.base_model}, LoRA {lora_mib:.2f} MiB "
             f"on disk, {args.resolution}², CLIP {args.clip_model}; n = {args.images} images per setting, "
             f"mean ± sample std; peak: {memory})", "",
             "| setting | steps | s/image | speed-up | peak GiB | transformer GiB | CLIP cosine to reference | "
             "PSNR to reference, dB | style score | s/step (s/image ÷ steps) | TFLOP/image (counted, unquantized) | "
             f"utilisation ({'of ' + format(peak_tf, '.0f') + ' TFLOP/s bf16 peak' if peak_tf else 'no known peak'}) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    reference = next(r for r in rows if "s_mean" in r)
    flops_at = {r["steps"]: r["tflop_image"] for r in rows if "tflop_image" in r}
    for row in rows:
        if "refused" in row:
            lines.append(f"| {row['case']} | {row['steps']} | refused: {row['refused']} | | | | | | | | | |")
            continue
        tflop = flops_at.get(row["steps"])
        floor = f"{tflop / row['s_mean'] / peak_tf:.0%}" if tflop and peak_tf else "n/a"
        peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.3g}"
        finite = [p for p in row["psnr"] if math.isfinite(p)]
        psnr_text = "identical" if not finite else (mean_std(finite) if len(finite) == len(row["psnr"])
                                                   else f"{mean_std(finite)} ({len(row['psnr']) - len(finite)} identical)")
        lines.append(f"| {row['case']} | {row['steps']} | {row['s_mean']:.3f} ± {row['s_std']:.3f} | "
                     f"{reference['s_mean'] / row['s_mean']:.2f}x | {peak} | {row['transformer_gib']:.3g} | "
                     f"{row['cos_mean']:.4f} ± {row['cos_std']:.4f} | {psnr_text} | {mean_std(row['style'])} | "
                     f"{row['s_mean'] / row['steps']:.4f} | {'n/a' if tflop is None else format(tflop, '.4g')} | {floor} |")
    return "\n".join(lines) + "\n"


def clip_scorer(model_name: str, pretrained: str, device: torch.device):
    """The evaluate stage's CLIP scorer (image embeddings, style score)."""
    from impressionist.feature_nets import load_clip
    from impressionist.image_features import ClipScorer

    model, preprocess, tokenizer = load_clip(model_name, pretrained)
    return ClipScorer(model, preprocess, tokenizer, "cpu")  # on the device only while scoring (scorer_on)


def run_images(args) -> str:
    device = torch.device("cuda" if args.profile == "gpu" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from impressionist.models import resolve_pretrained

    folder = resolve_pretrained(args.base_model)
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        lora = args.lora or str(random_lora(folder, Path(tmp) / "lora"))
        lora_file = Path(lora) / "pytorch_lora_weights.safetensors"
        lora_mib = lora_file.stat().st_size / 2**20 if lora_file.is_file() else float("nan")
        scorer = clip_scorer(args.clip_model, args.clip_pretrained, device)
        rows, reference = [], None
        for case in [c for c in CASES if c.key in args.cases]:
            row = run_case(case, args, folder, lora, device, dtype, scorer, reference)
            if reference is None and "features" in row:
                reference = row
                row.update(cos_mean=1.0, cos_std=0.0, psnr=[float("inf")] * len(row["images"]))
            done = row.get("refused") or f"{row['s_mean']:.3f} s/image"
            print(f"  {case.name}: {done}", file=sys.stderr)
            rows.append(row)
    return timing_table(rows, args, device, lora_mib)


# ------------------------------------------------------------------------------------------------
# estimate profile: FLUX.1-dev on fake tensors
# ------------------------------------------------------------------------------------------------

def quantized_weights(transformer: torch.nn.Module, quantization: str) -> list[int]:
    """Element counts of the weights ``quantization`` makes low-bit, as build_pipeline decides:
    fp8 through models.fp8_block_linear, NF4 through diffusers with the shared nf4_config."""
    from impressionist.models import fp8_block_linear

    names = nf4_quantized_names(transformer) if quantization == "nf4" else set()
    return [m.weight.numel() for name, m in transformer.named_modules()
            if type(m) is torch.nn.Linear and "lora_" not in name
            and (fp8_block_linear(m, name) if quantization == "fp8" else name.removesuffix(".base_layer") in names)]


def phase_activations(args) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes of weights per network, peak bytes of activations per phase) for one full-size image."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from impressionist.flux_math import flow_matching_loss
    from impressionist.lora import LoraParams, lora_config

    dtype = torch.bfloat16
    models = build_full_size("meta", dtype)
    models.transformer.add_adapter(lora_config(LoraParams(rank=args.rank, alpha=args.rank, targets="attention"),
                                               models.transformer))
    fake_mode = FakeTensorMode()
    for module in (models.transformer, models.vae, models.clip, models.t5):
        to_fake(module, fake_mode)
    lora = sum(p.numel() * p.element_size() for n, p in models.transformer.named_parameters() if "lora_" in n)
    weights = {"transformer": tensor_bytes(models.transformer) - lora, "lora": lora, "t5": tensor_bytes(models.t5),
               "clip": tensor_bytes(models.clip), "vae": tensor_bytes(models.vae),
               "quantized": {q: quantized_weights(models.transformer, q) for q in ("fp8", "nf4")}}
    latent = args.resolution // 8
    phases = {}
    def activations(memory: PeakTensorMemory, resident: int) -> int:
        # The weights are resident from the start (a view of one must not count it again).
        return memory.peak - resident

    with fake_mode, torch.no_grad():
        t5_ids = torch.randint(0, T5_XXL["vocab_size"], (1, args.max_sequence_length))
        clip_ids = torch.randint(0, CLIP_L["vocab_size"], (1, 77))
        memory = PeakTensorMemory(module_tensors(models.t5, models.clip))
        with memory:
            models.t5(t5_ids)[0]
            models.clip(clip_ids).pooler_output
        phases["text"] = activations(memory, weights["t5"] + weights["clip"])
        latents = torch.randn(1, 16, latent, latent)
        embeds = torch.randn(1, args.max_sequence_length, T5_XXL["d_model"], dtype=dtype)
        pooled = torch.randn(1, CLIP_L["hidden_size"], dtype=dtype)
        memory = PeakTensorMemory(module_tensors(models.transformer))
        with memory:  # one denoising step (the loss is a few latent-sized tensors more)
            flow_matching_loss(models.transformer, latents, torch.randn_like(latents), torch.rand(1), embeds, pooled, 3.5)
        phases["transformer"] = activations(memory, weights["transformer"] + weights["lora"])
        memory = PeakTensorMemory(module_tensors(models.vae))
        with memory:
            models.vae.decode(torch.randn(1, 16, latent, latent, dtype=dtype)).sample
        phases["vae"] = activations(memory, weights["vae"])
    return weights, phases


def estimate_table(args) -> str:
    weights, phases = phase_activations(args)
    per_weight = {"fp8": FP8_BYTES_PER_WEIGHT, "nf4": NF4_BYTES_PER_WEIGHT}
    transformer = {"none": weights["transformer"]}
    for q, counts in weights["quantized"].items():
        transformer[q] = weights["transformer"] - sum(counts) * (2 - per_weight[q])
    # NF4 matmuls dequantise one weight at a time to bf16
    transient = {"none": 0, "fp8": 0, "nf4": max(weights["quantized"]["nf4"]) * 2}
    text = weights["t5"] + weights["clip"]
    rows = []
    for quantization in ("none", "fp8", "nf4"):
        for lora_mode in ("adapter", "fused"):
            for offload in ("none", "model"):
                on_gpu = transformer[quantization] + (weights["lora"] if lora_mode == "adapter" else 0)
                tf_phase = on_gpu + phases["transformer"] + transient[quantization]
                if offload == "none":
                    peak = on_gpu + text + weights["vae"] + max(phases["text"], phases["transformer"]
                                                                + transient[quantization], phases["vae"])
                else:
                    peak = max(text + phases["text"], tf_phase, weights["vae"] + phases["vae"])
                rows.append((quantization, lora_mode, offload, on_gpu, peak))
    gib = 2**30
    lines = [f"### inference estimate profile — FLUX.1-dev on fake tensors ({cpu_name()}), {dt.date.today()}",
             f"`{command_line(__file__)}` (torch {torch.__version__}, {args.resolution}², T5 length "
             f"{args.max_sequence_length}, batch 1, LoRA rank {args.rank} on attention; bf16 weights; activations "
             f"per phase: text encoders {phases['text'] / gib:.2f} GiB, one transformer step "
             f"{phases['transformer'] / gib:.2f} GiB, VAE decode {phases['vae'] / gib:.2f} GiB; weights: transformer "
             f"{weights['transformer'] / gib:.2f}, T5-XXL {weights['t5'] / gib:.2f}, CLIP-L {weights['clip'] / gib:.2f}, "
             f"VAE {weights['vae'] / gib:.2f}, LoRA {weights['lora'] / 2**20:.0f} MiB; exact tensor accounting, n = 1, "
             "no allocator slack or CUDA context)", "",
             f"| transformer | LoRA | offload | transformer + LoRA GiB | estimated peak GiB | fits a 24 GB GPU "
             f"(under {USABLE_24GB / gib:.1f} GiB)? |",
             "|---|---|---|---|---|---|"]
    for quantization, lora_mode, offload, on_gpu, peak in rows:
        fits = "yes" if peak < USABLE_24GB else "no"
        lines.append(f"| {'bf16' if quantization == 'none' else quantization} | {lora_mode} | {offload} | "
                     f"{on_gpu / gib:.2f} | {peak / gib:.2f} | {fits} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["cpu", "gpu", "estimate"], default="cpu")
    parser.add_argument("--images", type=int, default=None, help="timed images per setting (n, default 4)")
    parser.add_argument("--steps", type=int, default=28, help="the reference's steps (and every setting's but "
                        "the fewer-steps ones)")
    parser.add_argument("--cases", default=",".join(c.key for c in CASES),
                        help="comma-separated settings to run, the reference first (default: all)")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--max-sequence-length", type=int, default=None)
    parser.add_argument("--base-model", default=None, help="default: builtin:tiny-flux (cpu), FLUX.1-dev (gpu)")
    parser.add_argument("--lora", default=None, help="a diffusers LoRA folder (default: models/lora on the gpu "
                        "profile, a random rank-16 LoRA on the cpu profile)")
    parser.add_argument("--clip-model", default=None, help="default: builtin:tiny-clip (cpu), ViT-L-14 (gpu)")
    parser.add_argument("--clip-pretrained", default=None)
    parser.add_argument("--rank", type=int, default=16, help="estimate profile: the LoRA's rank")
    parser.add_argument("--out", help="append the table as Markdown to this file")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    gpu = args.profile != "cpu"
    if args.profile == "gpu" and not torch.cuda.is_available():
        sys.exit("error: --profile gpu needs a CUDA GPU; use --profile cpu (the plumbing on the tiny model) or "
                 "--profile estimate (FLUX.1-dev's peak memory per setting) here")
    args.images = args.images or 4
    args.resolution = args.resolution or (1024 if gpu else 128)
    args.max_sequence_length = args.max_sequence_length or (512 if gpu else 64)
    args.base_model = args.base_model or ("black-forest-labs/FLUX.1-dev" if gpu else "builtin:tiny-flux")
    if args.profile == "gpu" and args.lora is None:
        args.lora = "models/lora"
    args.clip_model = args.clip_model or ("ViT-L-14" if gpu else "builtin:tiny-clip")
    args.clip_pretrained = args.clip_pretrained or ("openai" if gpu else "builtin")
    args.cases = args.cases.split(",")
    if args.profile != "estimate" and (args.cases[0] != "reference" or set(args.cases) - {c.key for c in CASES}):
        sys.exit(f"error: --cases must start with reference and name only {', '.join(c.key for c in CASES)}")
    try:
        text = estimate_table(args) if args.profile == "estimate" else run_images(args)
    except UserError as err:
        sys.exit(f"error: {err}")
    publish(text, args.out)


if __name__ == "__main__":
    main()
