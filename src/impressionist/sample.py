"""Stages ``sample_base`` and ``sample``: images from fixed prompts and seeds, without and with the LoRA.

The prompt set (:func:`prompt_set`) is fixed by params and data, never by chance:

* ``sample.prompts``: held-out subjects ("a harbor at sunset", ...), with the trigger word placed
  first as the caption template places it ("impr3ssionism, a harbor at sunset");
* ``sample.val_captions``: the first N distinct captions of the validation split of
  ``data/captions/captions.parquet`` (rows sorted by image id). They are used verbatim: they are
  the captions as the caption stage wrote them, so the trigger is already where training saw it.

The base-model images depend only on the base model, the prompt set and the sampler params, so
they are a stage of their own and are not regenerated when only the LoRA changes. The LoRA images
use the same prompts and seeds at each ``sample.lora_scales`` value, and a grid puts them side by side.

Both stages are data-parallel (:mod:`data_parallel`, ``compute.num_processes``): each image is one
work item, drawn from its own seed, so the images are the same bytes on any number of GPUs.

**Starting noise.** Each image's generator seed is :func:`noise_seed` of (its prompt key, its seed):
a stable hash, so subjects at the same ``seed`` start from *independent* noise, while the base model
and every LoRA scale draw a given (prompt, seed) from the *same* noise (the pairing the evaluation
stands on). Seeding with the seed alone would give every subject at seed *s* one shared starting
latent: what the images share through it is a seed effect that an interval resampling subjects does
not see (docs/evaluation.md). Both tables record the generator seed in ``noise_seed``.

Beside that small "show" set, both stages draw the **evaluation set** (``sample.eval_set``), the one
the evaluate stage measures: ``num_subjects`` subjects from the ``subjects`` file (no style words, no
trigger) times ``seeds``, each drawn with the prompt ``"<trigger>, <subject>"`` at the set's own
resolution and step count, for the base model and at every LoRA scale with the same prompt and seed,
so base and LoRA images pair up by (subject, seed). It goes to ``<out>/eval/`` with ``eval.csv``:
``file``, ``subject`` (what the CLIP score is measured against), ``prompt``, ``prompt_id`` (a hash
of the subject), ``seed``, ``noise_seed`` (the generator seed, from ``prompt_id`` and ``seed``),
``lora_scale``, ``eval_set`` (a fingerprint of everything that shapes the set: subjects, seeds,
sampler settings and :data:`NOISE_VERSION`, how starting noise is derived; equal fingerprints mean
comparable sets across commits).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
from tqdm import tqdm

from . import data_parallel
from .errors import UserError, atomic_dir, stage_main
from .grid import save_sample_grid
from .inference import baked, build_pipeline, check, lora_applied
from .layout import (CAPTIONS, EVAL_SET_TABLE, LORA_DIR, LORA_WEIGHTS, REPLICATES_DIR, REPLICATES_MANIFEST,
                     SAMPLES_DIR, SAMPLES_REPLICATES_DIR, SAMPLES_TABLE, SAMPLE_GRID)
from .models import resolve_device, resolve_dtype, resolve_pretrained, without_third_party_noise
from .params import DEFAULT_PARAMS, fingerprint, load_params
from .params.data import CaptionParams
from .params.evaluation import EvalSetParams, SampleParams
from .params.model import ModelParams
from .prompts import with_trigger
from .replicate_seeds import extra_replicates
from .tables import read_captions

BASE_DIR = SAMPLES_DIR / "base"
LORA_SAMPLES_DIR = SAMPLES_DIR / "lora"
SUBJECT, VAL_CAPTION = "subject", "val_caption"  # the `prompt_source` column of samples.csv
EVAL_SUBDIR = "eval"          # the evaluation set's images, under samples/base and samples/lora
# How an image's starting noise follows from its (prompt, seed); part of the eval-set fingerprint.
# 1 (unnamed): the seed alone, shared by every subject. 2: noise_seed(prompt key, seed).
NOISE_VERSION = 2


@dataclass(frozen=True)
class Sampler:
    """How one image is drawn: the show set and the evaluation set each have their own."""

    resolution: int
    steps: int
    guidance_scale: float
    max_sequence_length: int


def show_sampler(cfg: SampleParams) -> Sampler:
    return Sampler(cfg.resolution, cfg.steps, cfg.guidance_scale, cfg.max_sequence_length)


def eval_sampler(cfg: SampleParams) -> Sampler:
    """The evaluation set's side, steps and guidance; the prompt length is the show set's."""
    ev = cfg.eval_set
    return Sampler(ev.resolution, ev.steps, ev.guidance_scale, cfg.max_sequence_length)


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
    table = read_captions(captions_path, ("id", "split", "caption"))
    val = table[table["split"] == "val"].sort_values("id", kind="stable")
    captions = [c.strip() for c in val["caption"].dropna().astype(str) if c.strip()]
    distinct = list(dict.fromkeys(captions))
    if len(distinct) < count:
        raise UserError(f"sample.val_captions={count} but {captions_path} has only {len(distinct)} distinct "
                        f"validation caption(s); lower sample.val_captions or raise filter.val_fraction")
    return distinct[:count]


def prompt_set(cfg: SampleParams, trigger: str, captions_path: Path | str = CAPTIONS) -> list[tuple[str, str]]:
    """``[(prompt, source), ...]``: the held-out subjects with the trigger placed first, as the caption
    template places it, then the validation captions."""
    subjects = [with_trigger(trigger, p) for p in cfg.prompts]
    pairs = ([(p, SUBJECT) for p in subjects]
             + [(c, VAL_CAPTION) for c in validation_captions(cfg.val_captions, captions_path)])
    unique: dict[str, str] = {}
    for prompt, source in pairs:  # a caption equal to a subject prompt is sampled once
        unique.setdefault(prompt, source)
    return list(unique.items())


def sampling_device(model: ModelParams, cfg: SampleParams) -> torch.device:
    """The device to sample on, once this machine is known to run the inference settings."""
    device = resolve_device(model)
    check(cfg, device, "sample", resolve_dtype(model))
    return device


def load(model: ModelParams, cfg: SampleParams, device: torch.device, lora_dir: Path | None = None,
         baked_scale: float = 1.0):
    folder = resolve_pretrained(model.pretrained, model.revision)
    pipe = build_pipeline(folder, resolve_dtype(model), device, cfg,
                          lora=None if lora_dir is None else str(lora_dir), baked_scale=baked_scale)
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()
    return pipe


def noise_seed(key: str, seed: int) -> int:
    """The generator seed of the image of prompt ``key`` (a prompt id, or the show prompt) at ``seed``.

    A stable hash (SHA-256, 63 bits): the same on every machine and run, different for two keys at
    one seed, and independent of the model, so base and LoRA images of one (key, seed) share it.
    """
    digest = hashlib.sha256(f"{key}\0{int(seed)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2 ** 63 - 1)


@without_third_party_noise()
@torch.no_grad()
def draw(pipe, sampler: Sampler, prompt: str, noise: int):
    """One image of ``prompt``, its starting noise drawn from generator seed ``noise``
    (:func:`noise_seed`)."""
    return pipe(
        prompt, height=sampler.resolution, width=sampler.resolution,
        num_inference_steps=sampler.steps, guidance_scale=sampler.guidance_scale,
        max_sequence_length=sampler.max_sequence_length,
        # A CPU generator gives the same starting noise on every device.
        generator=torch.Generator("cpu").manual_seed(int(noise)),
    ).images[0]


def generate(pipe, cfg: SampleParams, prompt_list: list[tuple[str, str]], lora_scale: float,
             out_dir: Path) -> list[dict[str, Any]] | None:
    """The show set at one LoRA scale into ``out_dir``, split over the processes; its table rows
    (``None`` on ranks other than 0)."""
    show = show_sampler(cfg)
    jobs = [(i, p, src, s) for i, (p, src) in enumerate(prompt_list) for s in cfg.seeds]
    progress = tqdm(total=len(jobs), desc=f"sample (lora x{lora_scale:g})" if lora_scale else "sample (base)")

    def work(job) -> dict[str, Any]:
        index, prompt, source, seed = job
        name = f"p{index:02d}_seed{seed}_scale{lora_scale:g}.png"
        noise = noise_seed(prompt, seed)
        draw(pipe, show, prompt, noise).save(out_dir / name)
        progress.update()
        return {"file": name, "prompt": prompt, "seed": int(seed), "noise_seed": noise,
                "lora_scale": float(lora_scale), "prompt_source": source}

    with progress:
        return data_parallel.map_in_order(jobs, work)


# --------------------------------------------------------------------------------------------
# The evaluation set
# --------------------------------------------------------------------------------------------


def evaluation_subjects(ev: EvalSetParams) -> list[str]:
    """The first ``num_subjects`` distinct subjects of the subjects file (``#`` lines are comments)."""
    path = Path(ev.subjects)
    if not path.is_file():
        raise UserError(f"sample.eval_set.subjects: {path} not found; it lists the evaluation subjects, one "
                        f"per line (the repository ships configs/eval_subjects.txt)")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    subjects = list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))
    if len(subjects) < ev.num_subjects:
        raise UserError(f"sample.eval_set.num_subjects={ev.num_subjects} but {path} lists only "
                        f"{len(subjects)} distinct subject(s); lower num_subjects or add subjects")
    return subjects[:ev.num_subjects]


def prompt_id(subject: str) -> str:
    """A stable key of a subject: pairs images across LoRA scales and across commits."""
    return hashlib.sha256(subject.encode("utf-8")).hexdigest()[:12]


def eval_set_fingerprint(cfg: SampleParams, trigger: str, subjects: list[str]) -> str:
    """What makes two evaluation sets comparable image for image: the subjects and seeds, the trigger
    and the sampler settings, and how starting noise is derived (:data:`NOISE_VERSION`); the model
    is not part of it: comparing models is the point."""
    settings = {"seeds": cfg.eval_set.seeds, **asdict(eval_sampler(cfg)), "noise_version": NOISE_VERSION}
    return fingerprint(subjects, settings, trigger)


def generate_eval_set(pipe, cfg: SampleParams, trigger: str, lora_scale: float,
                      out_dir: Path) -> list[dict[str, Any]] | None:
    """The evaluation set at one LoRA scale (0 = base model) into ``out_dir/eval``, split over the
    processes; its table rows (``None`` on ranks other than 0)."""
    subjects = evaluation_subjects(cfg.eval_set)
    eval_set = eval_set_fingerprint(cfg, trigger, subjects)
    ev = eval_sampler(cfg)
    folder = out_dir / EVAL_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(i, subject, seed) for i, subject in enumerate(subjects) for seed in cfg.eval_set.seeds]
    progress = tqdm(total=len(jobs), desc=f"eval set (lora x{lora_scale:g})" if lora_scale else "eval set (base)")

    def work(job) -> dict[str, Any]:
        index, subject, seed = job
        prompt = with_trigger(trigger, subject)
        name = f"{EVAL_SUBDIR}/s{index:03d}_seed{seed}_scale{lora_scale:g}.png"
        key = prompt_id(subject)
        noise = noise_seed(key, seed)  # independent across subjects, shared across scales
        draw(pipe, ev, prompt, noise).save(out_dir / name)
        progress.update()
        return {"file": name, "subject": subject, "prompt": prompt, "prompt_id": key,
                "seed": int(seed), "noise_seed": noise, "lora_scale": float(lora_scale), "eval_set": eval_set}

    with progress:
        return data_parallel.map_in_order(jobs, work)


def check_base_eval_set(base_dir: Path, cfg: SampleParams, trigger: str) -> None:
    """The base model's evaluation set must be the one params.yaml asks for, or nothing pairs."""
    wanted = eval_set_fingerprint(cfg, trigger, evaluation_subjects(cfg.eval_set))
    csv = Path(base_dir) / EVAL_SET_TABLE
    made = set(pd.read_csv(csv)["eval_set"].astype(str)) if csv.is_file() else set()
    if made != {wanted}:
        raise UserError(f"{base_dir} holds no base-model evaluation set for the current sample.eval_set; "
                        "run `dvc repro sample_base` first")


def work_lists(cfg: SampleParams, prompt_list: list[tuple[str, str]]) -> list[int]:
    """The sizes of the image lists a stage splits over its processes: the show set, the eval set."""
    return [len(prompt_list) * len(cfg.seeds), cfg.eval_set.num_subjects * len(cfg.eval_set.seeds)]


def run_base(params: Mapping[str, Any], out_dir: Path = BASE_DIR, captions_path: Path = CAPTIONS) -> None:
    model, cfg = ModelParams.check(params), SampleParams.check(params)
    trigger = CaptionParams.check(params).trigger
    prompt_list = prompt_set(cfg, trigger, captions_path)
    evaluation_subjects(cfg.eval_set)
    pipe = load(model, cfg, data_parallel.local_device(sampling_device(model, cfg)))
    with data_parallel.shared_atomic_dir(out_dir) as tmp:
        rows = generate(pipe, cfg, prompt_list, 0.0, tmp)
        eval_rows = generate_eval_set(pipe, cfg, trigger, 0.0, tmp)
        if not data_parallel.is_main():
            return
        pd.DataFrame(rows).to_csv(tmp / SAMPLES_TABLE, index=False)
        pd.DataFrame(eval_rows).to_csv(tmp / EVAL_SET_TABLE, index=False)
    print(f"sample_base: {len(rows)} show images and {len(eval_rows)} evaluation-set images -> {out_dir}")


def check_base_samples(base_dir: Path, prompt_list: list[tuple[str, str]], seeds: list[Any]) -> None:
    """The base-model samples must show the same prompts and seeds, or the grid compares nothing."""
    csv = Path(base_dir) / SAMPLES_TABLE
    if not csv.is_file():
        raise UserError(f"no base-model samples in {base_dir}; run `dvc repro sample_base` first")
    table = pd.read_csv(csv)
    made = set(zip(table["prompt"].astype(str), table["seed"].astype(int)))
    wanted = {(p, int(s)) for p, _ in prompt_list for s in seeds}
    if made != wanted:
        raise UserError(f"{base_dir} holds samples of other prompts or seeds than params.yaml asks for; "
                        "run `dvc repro sample_base` first")


def check_lora_inputs(params: Mapping[str, Any], lora_dir: Path = LORA_DIR, base_dir: Path = BASE_DIR,
                      captions_path: Path = CAPTIONS) -> tuple[torch.device, list[tuple[str, str]]]:
    """The ``sample`` stage's checks, before any model loads: its device and prompt set."""
    model, cfg = ModelParams.check(params), SampleParams.check(params)
    trigger = CaptionParams.check(params).trigger
    prompt_list = prompt_set(cfg, trigger, captions_path)
    device = sampling_device(model, cfg)
    if not (Path(lora_dir) / LORA_WEIGHTS).is_file():
        raise UserError(f"no LoRA at {lora_dir}/{LORA_WEIGHTS}; run the train stage first "
                        "(`dvc repro train`)")
    check_base_samples(Path(base_dir), prompt_list, cfg.seeds)
    check_base_eval_set(Path(base_dir), cfg, trigger)
    return device, prompt_list


def run_lora(params: Mapping[str, Any], lora_dir: Path = LORA_DIR, base_dir: Path = BASE_DIR,
             out_dir: Path = LORA_SAMPLES_DIR, grid_path: Path = SAMPLE_GRID,
             captions_path: Path = CAPTIONS) -> None:
    model, cfg = ModelParams.check(params), SampleParams.check(params)
    trigger = CaptionParams.check(params).trigger
    device, prompt_list = check_lora_inputs(params, lora_dir, base_dir, captions_path)
    device = data_parallel.local_device(device)
    with without_third_party_noise():
        pipe = None if baked(cfg) else load(model, cfg, device, lora_dir)
    with data_parallel.shared_atomic_dir(out_dir) as tmp:
        rows, eval_rows = [], []
        for scale in cfg.lora_scales:
            if baked(cfg):  # merged into quantized weights: one pipeline per scale
                with without_third_party_noise():
                    pipe = load(model, cfg, device, lora_dir, baked_scale=float(scale))
            with lora_applied(pipe, cfg, float(scale)):
                rows += generate(pipe, cfg, prompt_list, float(scale), tmp) or []
                eval_rows += generate_eval_set(pipe, cfg, trigger, float(scale), tmp) or []
        if not data_parallel.is_main():
            return
        pd.DataFrame(rows).to_csv(tmp / SAMPLES_TABLE, index=False)
        pd.DataFrame(eval_rows).to_csv(tmp / EVAL_SET_TABLE, index=False)
        # Drawn from the finished temporary folder: a failed grid leaves no samples/lora behind.
        save_sample_grid(Path(base_dir), tmp, Path(grid_path), model.pretrained)
    print(f"sample: {len(rows)} show and {len(eval_rows)} evaluation-set LoRA images -> {out_dir}, "
          f"grid -> {grid_path}")


def run_replicates(params: Mapping[str, Any], replicates_dir: Path = REPLICATES_DIR, base_dir: Path = BASE_DIR,
                   out_dir: Path = SAMPLES_REPLICATES_DIR) -> None:
    """The evaluation set of each training replicate k >= 1 (``models/replicates/<k>``) at every LoRA
    scale, as :func:`run_lora` draws it for models/lora: ``out_dir/<k>/eval/`` and ``<k>/eval.csv``.
    No show grid. R = 1 writes only the manifest."""
    model, cfg = ModelParams.check(params), SampleParams.check(params)
    trigger = CaptionParams.check(params).trigger
    ks = extra_replicates(params)
    manifest = Path(replicates_dir) / REPLICATES_MANIFEST
    made = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if made.get("count") != len(ks) + 1:
        raise UserError(f"{replicates_dir} holds no replicates for replicates.count={len(ks) + 1}; run "
                        "`dvc repro train_replicates` first")
    device = None
    if ks:  # R = 1 loads nothing and needs no GPU
        check_base_eval_set(Path(base_dir), cfg, trigger)
        device = sampling_device(model, cfg)
    with atomic_dir(out_dir) as tmp:
        for k in ks:
            lora_dir = Path(replicates_dir) / str(k)
            with without_third_party_noise():
                pipe = None if baked(cfg) else load(model, cfg, device, lora_dir)
            rows = []
            for scale in cfg.lora_scales:
                if baked(cfg):
                    with without_third_party_noise():
                        pipe = load(model, cfg, device, lora_dir, baked_scale=float(scale))
                with lora_applied(pipe, cfg, float(scale)):
                    rows += generate_eval_set(pipe, cfg, trigger, float(scale), tmp / str(k))
            pd.DataFrame(rows).to_csv(tmp / str(k) / EVAL_SET_TABLE, index=False)
        (tmp / REPLICATES_MANIFEST).write_text(json.dumps(made, indent=1) + "\n")
    print(f"sample_replicates: the evaluation sets of {len(ks)} replicate(s) -> {out_dir}")


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--base", action="store_true", help="sample the base model only (no LoRA)")
    parser.add_argument("--replicates", action="store_true",
                        help="the evaluation sets of the training replicates (models/replicates)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.replicates:
        # The replicates' evaluation sets are drawn in this one process (compute.num_processes does not
        # split them yet).
        run_replicates(params)
        return
    # Every check runs here, before any process is launched or any model loads.
    model, cfg = ModelParams.check(params), SampleParams.check(params)
    if args.base:
        prompt_list = prompt_set(cfg, CaptionParams.check(params).trigger)
        evaluation_subjects(cfg.eval_set)
        device = sampling_device(model, cfg)
    else:
        device, prompt_list = check_lora_inputs(params)
    if data_parallel.launch("sample_base" if args.base else "sample", "impressionist.sample",
                            sys.argv[1:] if argv is None else argv, params, device.type == "cuda",
                            work_lists(cfg, prompt_list)):
        return
    run_base(params) if args.base else run_lora(params)


if __name__ == "__main__":
    main()
