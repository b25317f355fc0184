"""Stages ``sample_base`` and ``sample``: images from fixed prompts and seeds, without and with the LoRA.

The prompt set (:func:`prompt_set`) is fixed by params and data, never by chance:

* ``sample.prompts``: held-out subjects ("a harbor at sunset", ...), with the trigger word placed
  first as the caption template places it ("impr3ssionism, a harbor at sunset");
* ``sample.val_captions``: the first N distinct captions of the validation split of
  ``data/captions/captions.parquet`` (rows sorted by image id). They are used verbatim: they are
  the captions as the caption stage wrote them, so the trigger is already where training saw it.

The base-model images depend only on the base model, the prompt set and the sampler params, so
they are a stage of their own and are not regenerated when only the LoRA changes. The LoRA images
use the same prompts and seeds at each ``sample.lora_scales`` value, and a grid puts them side by
side.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from .errors import UserError, atomic_dir, first_line, stage_main
from .grid import save_sample_grid
from .inference import baked, build_pipeline, check, lora_applied, settings_from
from .layout import CAPTIONS, LORA_DIR, LORA_WEIGHTS, SAMPLE_GRID, SAMPLES_DIR
from .models import resolve_device, resolve_dtype, resolve_pretrained
from .params import (load_params, require, require_int, require_keys, require_multiple,
                     require_positive, section)
from .prompts import with_trigger

BASE_DIR = SAMPLES_DIR / "base"
LORA_SAMPLES_DIR = SAMPLES_DIR / "lora"
SUBJECT, VAL_CAPTION = "subject", "val_caption"  # the `prompt_source` column of samples.csv


def subject_prompts(cfg: dict[str, Any], trigger: str) -> list[str]:
    """``sample.prompts`` with the trigger word placed as the caption template places it (first)."""
    items = cfg.get("prompts") or []
    if not isinstance(items, list) or not all(isinstance(p, str) and p.strip() for p in items):
        raise UserError("params.yaml: sample.prompts must be a list of non-empty prompts")
    return [with_trigger(trigger, p.strip()) for p in items]


def val_caption_count(cfg: dict[str, Any]) -> int:
    count = cfg.get("val_captions", 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise UserError(f"params.yaml: sample.val_captions={count!r} must be an integer >= 0 "
                        "(0 = no validation captions in the prompt set)")
    return count


def validation_captions(count: int, captions_path: Path | str = CAPTIONS) -> list[str]:
    """The first ``count`` distinct captions of the validation split, rows sorted by image id.

    Distinct, because template captions repeat ("... a landscape by Claude Monet") and a repeated
    prompt would only repeat a row of the grid. Used verbatim: they already hold the trigger.
    """
    if count == 0:
        return []
    captions_path = Path(captions_path)
    if not captions_path.is_file():
        raise UserError(f"{captions_path} not found, but sample.val_captions={count} takes prompts from "
                        "it; run the caption stage first (`dvc repro caption`) or set sample.val_captions: 0")
    try:
        table = pd.read_parquet(captions_path)
    except Exception as err:
        raise UserError(f"{captions_path} could not be read: {first_line(err)}") from err
    missing = [c for c in ("id", "split", "caption") if c not in table.columns]
    if missing:
        raise UserError(f"{captions_path} lacks column(s) {', '.join(missing)}; re-run the caption stage")
    val = table[table["split"] == "val"].sort_values("id", kind="stable")
    captions = [c.strip() for c in val["caption"].dropna().astype(str) if c.strip()]
    distinct = list(dict.fromkeys(captions))
    if len(distinct) < count:
        raise UserError(f"sample.val_captions={count} but {captions_path} has only {len(distinct)} distinct "
                        f"validation caption(s); lower sample.val_captions or raise filter.val_fraction")
    return distinct[:count]


def prompt_set(params: dict[str, Any], captions_path: Path | str = CAPTIONS) -> list[tuple[str, str]]:
    """``[(prompt, source), ...]``: the held-out subjects, then the validation captions."""
    cfg = section(params, "sample")
    count = val_caption_count(cfg)
    subjects = subject_prompts(cfg, section(params, "caption").get("trigger") or "")
    if not subjects and count == 0:
        raise UserError("the prompt set is empty: params.yaml lists no sample.prompts and sample.val_captions "
                        "is 0; add held-out subjects to sample.prompts or set sample.val_captions > 0")
    pairs = [(p, SUBJECT) for p in subjects] + [(c, VAL_CAPTION) for c in validation_captions(count, captions_path)]
    unique: dict[str, str] = {}
    for prompt, source in pairs:  # a caption equal to a subject prompt is sampled once
        unique.setdefault(prompt, source)
    return list(unique.items())


def validate(params: dict[str, Any]) -> torch.device:
    """Check the sampler params before any model is loaded; return the device to sample on."""
    cfg = section(params, "sample")
    model_cfg = section(params, "model")
    require(model_cfg, "pretrained", "model")
    device = resolve_device(model_cfg)
    resolve_dtype(model_cfg)
    require_keys(cfg, ("resolution", "steps", "guidance_scale", "max_sequence_length"), "sample")
    require_multiple(cfg["resolution"], 16, "sample.resolution")
    require_int(cfg["steps"], "sample.steps", minimum=1)
    require_positive(cfg["guidance_scale"], "sample.guidance_scale", allow_zero=True)
    require_int(cfg["max_sequence_length"], "sample.max_sequence_length", minimum=1)
    seeds = cfg.get("seeds")
    if not seeds or not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                             for s in seeds):
        raise UserError("params.yaml: sample.seeds must list at least one integer seed")
    # lora_mode, quantization, offload, compile: impressionist.inference, shared with the app
    check(settings_from(cfg, "sample"), device, "sample")
    return device


def load(params: dict[str, Any], device: torch.device, lora_dir: Path | None = None, baked_scale: float = 1.0):
    model_cfg, cfg = section(params, "model"), section(params, "sample")
    folder = resolve_pretrained(model_cfg["pretrained"], model_cfg.get("revision"))
    pipe = build_pipeline(folder, resolve_dtype(model_cfg), device, settings_from(cfg, "sample"),
                          lora=None if lora_dir is None else str(lora_dir), baked_scale=baked_scale)
    if cfg.get("vae_tiling"):
        pipe.vae.enable_tiling()
    return pipe, cfg


@torch.no_grad()
def generate(pipe, cfg: dict[str, Any], prompt_list: list[tuple[str, str]], lora_scale: float,
             out_dir: Path) -> list[dict[str, Any]]:
    rows = []
    jobs = [(i, p, src, s) for i, (p, src) in enumerate(prompt_list) for s in cfg["seeds"]]
    for index, prompt, source, seed in tqdm(
            jobs, desc=f"sample (lora x{lora_scale:g})" if lora_scale else "sample (base)"):
        image = pipe(
            prompt, height=cfg["resolution"], width=cfg["resolution"],
            num_inference_steps=cfg["steps"], guidance_scale=cfg["guidance_scale"],
            max_sequence_length=cfg["max_sequence_length"],
            # A CPU generator gives the same starting noise on every device.
            generator=torch.Generator("cpu").manual_seed(int(seed)),
        ).images[0]
        name = f"p{index:02d}_seed{seed}_scale{lora_scale:g}.png"
        image.save(out_dir / name)
        rows.append({"file": name, "prompt": prompt, "seed": int(seed), "lora_scale": float(lora_scale),
                     "prompt_source": source})
    return rows


def run_base(params: dict[str, Any], out_dir: Path = BASE_DIR, captions_path: Path = CAPTIONS) -> None:
    prompt_list = prompt_set(params, captions_path)
    device = validate(params)
    pipe, cfg = load(params, device)
    with atomic_dir(out_dir) as tmp:
        pd.DataFrame(generate(pipe, cfg, prompt_list, 0.0, tmp)).to_csv(tmp / "samples.csv", index=False)
    print(f"sample_base: {len(prompt_list) * len(cfg['seeds'])} images -> {out_dir}")


def check_base_samples(base_dir: Path, prompt_list: list[tuple[str, str]], seeds: list[Any]) -> None:
    """The base-model samples must show the same prompts and seeds, or the grid compares nothing."""
    csv = Path(base_dir) / "samples.csv"
    if not csv.is_file():
        raise UserError(f"no base-model samples in {base_dir}; run `dvc repro sample_base` first")
    table = pd.read_csv(csv)
    made = set(zip(table["prompt"].astype(str), table["seed"].astype(int)))
    wanted = {(p, int(s)) for p, _ in prompt_list for s in seeds}
    if made != wanted:
        raise UserError(f"{base_dir} holds samples of other prompts or seeds than params.yaml asks for; "
                        "run `dvc repro sample_base` first")


def run_lora(params: dict[str, Any], lora_dir: Path = LORA_DIR, base_dir: Path = BASE_DIR,
             out_dir: Path = LORA_SAMPLES_DIR, grid_path: Path = SAMPLE_GRID,
             captions_path: Path = CAPTIONS) -> None:
    cfg = section(params, "sample")
    prompt_list = prompt_set(params, captions_path)
    device = validate(params)
    scales = cfg.get("lora_scales") or []
    if not scales or any(not isinstance(s, (int, float)) or s <= 0 for s in scales):
        raise UserError("params.yaml: sample.lora_scales must list LoRA scales > 0, e.g. [0.5, 1.0]")
    if not (Path(lora_dir) / LORA_WEIGHTS).is_file():
        raise UserError(f"no LoRA at {lora_dir}/{LORA_WEIGHTS}; run the train stage first "
                        "(`dvc repro train`)")
    check_base_samples(Path(base_dir), prompt_list, cfg["seeds"])
    settings = settings_from(cfg, "sample")
    pipe = None if baked(settings) else load(params, device, lora_dir)[0]
    with atomic_dir(out_dir) as tmp:
        rows = []
        for scale in scales:
            if baked(settings):  # merged into quantized weights: one pipeline per scale
                pipe = load(params, device, lora_dir, baked_scale=float(scale))[0]
            with lora_applied(pipe, settings, float(scale)):
                rows += generate(pipe, cfg, prompt_list, float(scale), tmp)
        pd.DataFrame(rows).to_csv(tmp / "samples.csv", index=False)
        # Drawn from the finished temporary folder: a failed grid leaves no samples/lora behind.
        save_sample_grid(Path(base_dir), tmp, Path(grid_path), section(params, "model")["pretrained"])
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
