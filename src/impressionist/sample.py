"""Stages ``sample_base`` and ``sample``: images from fixed prompts and seeds, without and with the LoRA.

The base-model images depend only on the base model and the ``sample`` params, so they are a
stage of their own and are not regenerated when only the LoRA changes. The LoRA images use the
same prompts and seeds at each ``sample.lora_scales`` value, and a grid puts them side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from .errors import UserError, atomic_dir, stage_main
from .grid import save_sample_grid
from .models import load_pipeline, resolve_device, resolve_dtype, resolve_pretrained
from .params import load_params, require_positive, section

BASE_DIR = Path("samples/base")
LORA_SAMPLES_DIR = Path("samples/lora")
LORA_DIR = Path("models/lora")
GRID = Path("plots/samples_grid.png")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER = "impressionist"


def prompts(cfg: dict[str, Any], trigger: str) -> list[str]:
    """The prompt set, with the trigger word placed as the caption template places it (first)."""
    items = cfg.get("prompts") or []
    if not items or not all(isinstance(p, str) and p.strip() for p in items):
        raise UserError("params.yaml: sample.prompts must be a non-empty list of prompts")
    return [f"{trigger}, {p}" if trigger else p for p in items]


def validate(cfg: dict[str, Any], device: torch.device) -> None:
    resolution = require_positive(cfg["resolution"], "sample.resolution")
    if resolution % 16:
        raise UserError(f"sample.resolution={resolution} must be a multiple of 16")
    require_positive(cfg["steps"], "sample.steps")
    if not cfg.get("seeds"):
        raise UserError("params.yaml: sample.seeds must list at least one seed")
    if cfg.get("cpu_offload") and device.type != "cuda":
        raise UserError("sample.cpu_offload moves models between a GPU and the CPU; it needs CUDA")


def load(params: dict[str, Any]):
    model_cfg, cfg = section(params, "model"), section(params, "sample")
    device = resolve_device(model_cfg)
    validate(cfg, device)
    folder = resolve_pretrained(model_cfg["pretrained"], model_cfg.get("revision"))
    pipe = load_pipeline(folder, resolve_dtype(model_cfg))
    if cfg.get("cpu_offload"):
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    if cfg.get("vae_tiling"):
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return pipe, cfg


@torch.no_grad()
def generate(pipe, cfg: dict[str, Any], prompt_list: list[str], lora_scale: float,
             out_dir: Path) -> list[dict[str, Any]]:
    rows = []
    jobs = [(i, p, s) for i, p in enumerate(prompt_list) for s in cfg["seeds"]]
    for index, prompt, seed in tqdm(jobs, desc=f"sample (lora x{lora_scale:g})" if lora_scale else "sample (base)"):
        image = pipe(
            prompt, height=cfg["resolution"], width=cfg["resolution"],
            num_inference_steps=cfg["steps"], guidance_scale=cfg["guidance_scale"],
            max_sequence_length=cfg["max_sequence_length"],
            # A CPU generator gives the same starting noise on every device.
            generator=torch.Generator("cpu").manual_seed(int(seed)),
        ).images[0]
        name = f"p{index:02d}_seed{seed}_scale{lora_scale:g}.png"
        image.save(out_dir / name)
        rows.append({"file": name, "prompt": prompt, "seed": int(seed), "lora_scale": float(lora_scale)})
    return rows


def run_base(params: dict[str, Any], out_dir: Path = BASE_DIR) -> None:
    prompt_list = prompts(section(params, "sample"), section(params, "caption")["trigger"])
    pipe, cfg = load(params)
    with atomic_dir(out_dir) as tmp:
        pd.DataFrame(generate(pipe, cfg, prompt_list, 0.0, tmp)).to_csv(tmp / "samples.csv", index=False)
    print(f"sample_base: {len(prompt_list) * len(cfg['seeds'])} images -> {out_dir}")


def run_lora(params: dict[str, Any], lora_dir: Path = LORA_DIR, base_dir: Path = BASE_DIR,
             out_dir: Path = LORA_SAMPLES_DIR, grid_path: Path = GRID) -> None:
    cfg = section(params, "sample")
    prompt_list = prompts(cfg, section(params, "caption")["trigger"])
    scales = cfg.get("lora_scales") or []
    if not scales or any(not isinstance(s, (int, float)) or s <= 0 for s in scales):
        raise UserError("params.yaml: sample.lora_scales must list LoRA scales > 0, e.g. [0.5, 1.0]")
    if not (Path(lora_dir) / LORA_WEIGHTS).is_file():
        raise UserError(f"no LoRA at {lora_dir}/{LORA_WEIGHTS}; run the train stage first "
                        "(`dvc repro train`)")
    if not (Path(base_dir) / "samples.csv").is_file():
        raise UserError(f"no base-model samples in {base_dir}; run `dvc repro sample_base` first")
    pipe, cfg = load(params)
    pipe.load_lora_weights(str(lora_dir), adapter_name=ADAPTER)
    with atomic_dir(out_dir) as tmp:
        rows = []
        for scale in scales:
            pipe.set_adapters([ADAPTER], adapter_weights=[float(scale)])
            rows += generate(pipe, cfg, prompt_list, float(scale), tmp)
        pd.DataFrame(rows).to_csv(tmp / "samples.csv", index=False)
    save_sample_grid(Path(base_dir), Path(out_dir), Path(grid_path))
    print(f"sample: {len(rows)} LoRA images -> {out_dir}, grid -> {grid_path}")


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", action="store_true", help="sample the base model only (no LoRA)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    run_base(params) if args.base else run_lora(params)


if __name__ == "__main__":
    main()
