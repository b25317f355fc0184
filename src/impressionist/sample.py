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

Beside that small "show" set, both stages draw the **evaluation set** (``sample.eval_set``), the one
the evaluate stage measures: ``num_subjects`` subjects from the ``subjects`` file (no style words, no
trigger) times ``seeds``, each drawn with the prompt ``"<trigger>, <subject>"`` at the set's own
resolution and step count, for the base model and at every LoRA scale with the same prompt and seed,
so base and LoRA images pair up by (subject, seed). It goes to ``<out>/eval/`` with ``eval.csv``:
``file``, ``subject`` (what the CLIP score is measured against), ``prompt``, ``prompt_id`` (a hash
of the subject), ``seed``, ``lora_scale``, ``eval_set`` (a fingerprint of everything that shapes the
set: subjects, seeds and sampler settings; equal fingerprints mean comparable sets across commits).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from .errors import UserError, atomic_dir, first_line, stage_main
from .grid import save_sample_grid
from .inference import baked, build_pipeline, check, lora_applied, settings_from
from .layout import CAPTIONS, EVAL_SET_TABLE, LORA_DIR, LORA_WEIGHTS, SAMPLE_GRID, SAMPLES_DIR
from .models import resolve_device, resolve_dtype, resolve_pretrained, without_third_party_noise
from .params import (fingerprint, load_params, require, require_int, require_keys, require_multiple,
                     require_positive, section)
from .prompts import with_trigger

BASE_DIR = SAMPLES_DIR / "base"
LORA_SAMPLES_DIR = SAMPLES_DIR / "lora"
SUBJECT, VAL_CAPTION = "subject", "val_caption"  # the `prompt_source` column of samples.csv
EVAL_SUBDIR = "eval"          # the evaluation set's images, under samples/base and samples/lora
EVAL_TABLE = EVAL_SET_TABLE   # its table, in the same folder as samples.csv
EVAL_SET_KEYS = ("subjects", "num_subjects", "seeds", "steps", "resolution", "guidance_scale")


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


@without_third_party_noise()
@torch.no_grad()
def draw(pipe, settings: dict[str, Any], prompt: str, seed: int):
    """One image: ``settings`` gives resolution, steps, guidance_scale and max_sequence_length."""
    return pipe(
        prompt, height=settings["resolution"], width=settings["resolution"],
        num_inference_steps=settings["steps"], guidance_scale=settings["guidance_scale"],
        max_sequence_length=settings["max_sequence_length"],
        # A CPU generator gives the same starting noise on every device.
        generator=torch.Generator("cpu").manual_seed(int(seed)),
    ).images[0]


def generate(pipe, cfg: dict[str, Any], prompt_list: list[tuple[str, str]], lora_scale: float,
             out_dir: Path) -> list[dict[str, Any]]:
    rows = []
    jobs = [(i, p, src, s) for i, (p, src) in enumerate(prompt_list) for s in cfg["seeds"]]
    for index, prompt, source, seed in tqdm(
            jobs, desc=f"sample (lora x{lora_scale:g})" if lora_scale else "sample (base)"):
        name = f"p{index:02d}_seed{seed}_scale{lora_scale:g}.png"
        draw(pipe, cfg, prompt, seed).save(out_dir / name)
        rows.append({"file": name, "prompt": prompt, "seed": int(seed), "lora_scale": float(lora_scale),
                     "prompt_source": source})
    return rows


# --------------------------------------------------------------------------------------------
# The evaluation set
# --------------------------------------------------------------------------------------------


def eval_set_config(params: dict[str, Any]) -> dict[str, Any]:
    """``sample.eval_set``, checked (one line per problem) before any model loads."""
    cfg = section(params, "sample")
    ev = cfg.get("eval_set")
    if not isinstance(ev, dict):
        raise UserError("params.yaml: sample.eval_set is missing; it defines the images the evaluate stage "
                        "measures (subjects, num_subjects, seeds, steps, resolution, guidance_scale)")
    require_keys(ev, EVAL_SET_KEYS, "sample.eval_set")
    require_int(ev["num_subjects"], "sample.eval_set.num_subjects", minimum=1)
    require_int(ev["steps"], "sample.eval_set.steps", minimum=1)
    require_multiple(ev["resolution"], 16, "sample.eval_set.resolution")
    require_positive(ev["guidance_scale"], "sample.eval_set.guidance_scale", allow_zero=True)
    seeds = ev["seeds"]
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise UserError("params.yaml: sample.eval_set.seeds must list distinct integer seeds, e.g. [0, 1, 2]")
    if not isinstance(ev["subjects"], str) or not ev["subjects"].strip():
        raise UserError("params.yaml: sample.eval_set.subjects must name a text file of subjects, one per line")
    return {**ev, "max_sequence_length": cfg.get("max_sequence_length", 512)}


def evaluation_subjects(ev: dict[str, Any]) -> list[str]:
    """The first ``num_subjects`` distinct subjects of the subjects file (``#`` lines are comments)."""
    path = Path(ev["subjects"])
    if not path.is_file():
        raise UserError(f"sample.eval_set.subjects: {path} not found; it lists the evaluation subjects, one "
                        f"per line (the repository ships configs/eval_subjects.txt)")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    subjects = list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))
    if len(subjects) < ev["num_subjects"]:
        raise UserError(f"sample.eval_set.num_subjects={ev['num_subjects']} but {path} lists only "
                        f"{len(subjects)} distinct subject(s); lower num_subjects or add subjects")
    return subjects[:ev["num_subjects"]]


def prompt_id(subject: str) -> str:
    """A stable key of a subject: pairs images across LoRA scales and across commits."""
    return hashlib.sha256(subject.encode("utf-8")).hexdigest()[:12]


def eval_set_fingerprint(params: dict[str, Any], ev: dict[str, Any], subjects: list[str]) -> str:
    """What makes two evaluation sets comparable image for image: the subjects and seeds, the trigger
    and the sampler settings (the model is not part of it: comparing models is the point)."""
    settings = {k: ev[k] for k in ("seeds", "steps", "resolution", "guidance_scale", "max_sequence_length")}
    return fingerprint(subjects, settings, section(params, "caption").get("trigger") or "")


def generate_eval_set(pipe, params: dict[str, Any], lora_scale: float, out_dir: Path) -> list[dict[str, Any]]:
    """The evaluation set at one LoRA scale (0 = base model) into ``out_dir/eval``; its table rows."""
    ev = eval_set_config(params)
    subjects = evaluation_subjects(ev)
    trigger = section(params, "caption").get("trigger") or ""
    eval_set = eval_set_fingerprint(params, ev, subjects)
    folder = out_dir / EVAL_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(i, subject, seed) for i, subject in enumerate(subjects) for seed in ev["seeds"]]
    rows = []
    for index, subject, seed in tqdm(jobs, desc=f"eval set (lora x{lora_scale:g})" if lora_scale
                                     else "eval set (base)"):
        prompt = with_trigger(trigger, subject)
        name = f"{EVAL_SUBDIR}/s{index:03d}_seed{seed}_scale{lora_scale:g}.png"
        draw(pipe, ev, prompt, seed).save(out_dir / name)
        rows.append({"file": name, "subject": subject, "prompt": prompt, "prompt_id": prompt_id(subject),
                     "seed": int(seed), "lora_scale": float(lora_scale), "eval_set": eval_set})
    return rows


def check_base_eval_set(base_dir: Path, params: dict[str, Any]) -> None:
    """The base model's evaluation set must be the one params.yaml asks for, or nothing pairs."""
    ev = eval_set_config(params)
    wanted = eval_set_fingerprint(params, ev, evaluation_subjects(ev))
    csv = Path(base_dir) / EVAL_TABLE
    made = set(pd.read_csv(csv)["eval_set"].astype(str)) if csv.is_file() else set()
    if made != {wanted}:
        raise UserError(f"{base_dir} holds no base-model evaluation set for the current sample.eval_set; "
                        "run `dvc repro sample_base` first")


def run_base(params: dict[str, Any], out_dir: Path = BASE_DIR, captions_path: Path = CAPTIONS) -> None:
    prompt_list = prompt_set(params, captions_path)
    evaluation_subjects(eval_set_config(params))
    device = validate(params)
    pipe, cfg = load(params, device)
    with atomic_dir(out_dir) as tmp:
        pd.DataFrame(generate(pipe, cfg, prompt_list, 0.0, tmp)).to_csv(tmp / "samples.csv", index=False)
        eval_rows = generate_eval_set(pipe, params, 0.0, tmp)
        pd.DataFrame(eval_rows).to_csv(tmp / EVAL_TABLE, index=False)
    print(f"sample_base: {len(prompt_list) * len(cfg['seeds'])} show images and {len(eval_rows)} "
          f"evaluation-set images -> {out_dir}")


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
    check_base_eval_set(Path(base_dir), params)
    settings = settings_from(cfg, "sample")
    with without_third_party_noise():
        pipe = None if baked(settings) else load(params, device, lora_dir)[0]
    with atomic_dir(out_dir) as tmp:
        rows, eval_rows = [], []
        for scale in scales:
            if baked(settings):  # merged into quantized weights: one pipeline per scale
                with without_third_party_noise():
                    pipe = load(params, device, lora_dir, baked_scale=float(scale))[0]
            with lora_applied(pipe, settings, float(scale)):
                rows += generate(pipe, cfg, prompt_list, float(scale), tmp)
                eval_rows += generate_eval_set(pipe, params, float(scale), tmp)
        pd.DataFrame(rows).to_csv(tmp / "samples.csv", index=False)
        pd.DataFrame(eval_rows).to_csv(tmp / EVAL_TABLE, index=False)
        # Drawn from the finished temporary folder: a failed grid leaves no samples/lora behind.
        save_sample_grid(Path(base_dir), tmp, Path(grid_path), section(params, "model")["pretrained"])
    print(f"sample: {len(rows)} show and {len(eval_rows)} evaluation-set LoRA images -> {out_dir}, "
          f"grid -> {grid_path}")


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
