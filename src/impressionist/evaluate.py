"""The evaluate stage: FID, KID, CLIP score and an Impressionism style score, base model vs LoRA.

Reads ``samples/base`` and ``samples/lora`` (``samples.csv`` + PNGs; the LoRA folder may hold
several ``lora_scale`` values, each scored separately) and the validation split of
``data/filtered`` as the set of real paintings. Writes ``metrics/eval.json`` and
``plots/eval_base_vs_lora.png``, ``plots/eval_vs_scale.png``.

Metrics, per generated set (base, and each LoRA scale):

* ``fid``, ``kid_mean``, ``kid_std``: torchmetrics FrechetInceptionDistance and
  KernelInceptionDistance against the validation paintings, both fed the same features: each image
  goes through the feature network (Inception) once. Real and generated images go through
  the same :func:`prepare_images` (shorter side resized to ``evaluate.image_size`` with antialiased
  bicubic, centre crop, uint8). KID's subset size is ``min(kid_subset_size, n_real, n_fake)``
  (:func:`kid_subset_size`), its 100 subsets drawn from ``evaluate.seed``; the size used is
  recorded as ``kid_subset_size``. Both need at least 2 images on each side; with fewer the stage
  stops with one line naming the params that raise the count, before any heavy work (a KID-only
  fallback is not possible: KID's unbiased MMD divides by m(m-1) and needs 2 images per subset too).
  With 2 or more but few images (< ``FEW_IMAGES``) FID is strongly biased upwards, so the stage
  prints a note to read KID, which is unbiased at any sample size (:func:`small_sample_note`).
* ``clip_score``: as torchmetrics' CLIPScore, ``100 * max(cos(image, prompt), 0)`` averaged over
  images, each against the prompt it was generated from; computed with open_clip.
* ``style_score``: mean open_clip zero-shot probability of "Impressionism" among the 27 WikiArt
  styles, prompts ``"an <style> painting"`` (:func:`style_prompts`), logits scaled by the model's
  ``logit_scale``. ``real.style_score`` gives the same for the validation paintings, as reference.

``eval.json`` = ``{"n_real", "real": {"style_score"}, "base": {...}, "lora": {... at the largest
scale, + "lora_scale"}, "delta": {lora - base}, "lora_scale_<s>": {...} for each scale}``, where
``{...}`` = ``fid, kid_mean, kid_std, clip_score, style_score, n_fake, kid_subset_size``; ``delta``
holds the first five. All values are numbers; DVC flattens them to stable names (``base.fid``,
``lora.clip_score``, ``delta.style_score``...) for ``dvc metrics diff`` and ``dvc exp show``.

With ``builtin:tiny`` / ``builtin:tiny-clip`` (the demo) all feature nets are random: the numbers
then only show the pipeline works, not anything about the paintings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import UserError, atomic_write_text, first_line, stage_main
from .feature_nets import INCEPTION, check_clip_params, check_fid_params, fid_feature_extractor, load_clip
from .layout import FILTERED_DIR, SAMPLES_DIR
from .params import load_params, require, require_int, section
from .tables import METADATA_FILE, read_table
from .wikiart import STYLES

METRICS = ("fid", "kid_mean", "kid_std", "clip_score", "style_score")
TARGET_STYLE = "Impressionism"
STYLE_PROMPT = "an {} painting"
SAMPLES_COLUMNS = ("file", "prompt", "seed", "lora_scale")
BATCH_SIZE = 16
KID_SUBSETS = 100
# FID needs a covariance and KID's unbiased MMD divides by m(m-1): neither exists for one image.
MIN_IMAGES = 2
# Below this many images per set FID is strongly biased upwards (its covariance has far fewer
# samples than feature dimensions); KID is unbiased at any size, so it is the one to read then.
FEW_IMAGES = 500
SAMPLE_HINT = "run the sample stages first (`dvc repro sample_base sample`)"


# --------------------------------------------------------------------------------------------
# Shared image preprocessing for FID/KID
# --------------------------------------------------------------------------------------------


def _as_float_chw(image: Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
    """One image as float32 (3, H, W) in [0, 1]; uint8 is read as [0, 255], floats as [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) array, got {image.shape}")
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a writable copy
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError("expected a PIL image, an (H, W, 3) array or a (3, H, W) tensor")
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if image.is_floating_point():
        return image.float().clamp(0.0, 1.0)
    raise TypeError(f"expected uint8 or float image data, got {image.dtype}")


def prepare_image(image: Image.Image | torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (antialiased bicubic), centre-crop, return uint8 (3, size, size)."""
    x = _as_float_chw(image)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)[0]
        x = x.clamp(0.0, 1.0)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, top:top + size, left:left + size]
    return (x * 255.0).round().to(torch.uint8)


def prepare_images(images: Iterable[Image.Image | torch.Tensor | np.ndarray] | torch.Tensor, size: int) -> torch.Tensor:
    """The one preprocessing used for real and generated images: uint8 (N, 3, size, size).

    Accepts PIL images, (H, W, 3) arrays, (3, H, W) tensors (uint8 or float in [0, 1]) or an
    (N, 3, H, W) batch; the same picture in any of these forms gives the same result.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 3:
        images = images[None]
    out = [prepare_image(img, size) for img in images]
    if not out:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    return torch.stack(out)


# --------------------------------------------------------------------------------------------
# FID / KID
# --------------------------------------------------------------------------------------------


def kid_subset_size(requested: int, n_real: int, n_fake: int) -> int:
    """KID subset size actually used: the requested one, lowered to the number of images available."""
    return max(1, min(int(requested), int(n_real), int(n_fake)))


class _Extracted(torch.nn.Module):
    """The "feature network" torchmetrics is given: the features were already extracted.

    FID and KID read the same features of the same images, so the feature network runs once per
    image and hands its output to both metrics through this identity.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # torchmetrics sizes its state from it (no dummy probe)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class FidKid:
    """FID and KID (torchmetrics) of several generated sets against one real set.

    Real features are extracted once (``reset_real_features=False``); :meth:`compute` scores the
    generated images added since the last call and then forgets them. ``feature_net`` must have an
    int ``num_features`` (as :func:`~impressionist.feature_nets.fid_feature_extractor`'s nets do).
    """

    def __init__(self, feature_net: torch.nn.Module, kid_subset_size: int = 1000, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        num_features = getattr(feature_net, "num_features", None)
        if not isinstance(num_features, int):
            raise TypeError("FidKid needs a feature network with an int `num_features`")
        self.requested_subset_size = int(kid_subset_size)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.feature_net = feature_net.to(self.device).eval()
        extracted = _Extracted(num_features)
        self.fid = FrechetInceptionDistance(feature=extracted, reset_real_features=False).to(self.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.kid = KernelInceptionDistance(
                feature=extracted, subsets=KID_SUBSETS, subset_size=self.requested_subset_size,
                reset_real_features=False,
            ).to(self.device)
        self.n_real = 0
        self.n_fake = 0

    @torch.no_grad()
    def _update(self, images: torch.Tensor, real: bool) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError("FidKid takes uint8 (N, 3, S, S) batches from prepare_images()")
        features = self.feature_net(images.to(self.device))
        self.fid.update(features, real=real)
        self.kid.update(features, real=real)

    def add_real(self, images: torch.Tensor) -> None:
        self._update(images, real=True)
        self.n_real += int(images.shape[0])

    def add_fake(self, images: torch.Tensor) -> None:
        self._update(images, real=False)
        self.n_fake += int(images.shape[0])

    def compute(self) -> dict[str, float]:
        """``{"fid", "kid_mean", "kid_std", "kid_subset_size"}`` for the generated images added so far."""
        if self.n_real < MIN_IMAGES or self.n_fake < MIN_IMAGES:
            raise UserError(
                f"FID/KID need at least {MIN_IMAGES} real and {MIN_IMAGES} generated images, got "
                f"{self.n_real} and {self.n_fake}"
            )
        subset = kid_subset_size(self.requested_subset_size, self.n_real, self.n_fake)
        self.kid.subset_size = subset
        fid = float(self.fid.compute())
        with torch.random.fork_rng(devices=[]):  # KID draws its subsets with torch.randperm (CPU RNG)
            torch.manual_seed(self.seed)
            kid_mean, kid_std = (float(v) for v in self.kid.compute())
        self.fid.reset()
        self.kid.reset()
        self.n_fake = 0
        return {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std, "kid_subset_size": subset}


# --------------------------------------------------------------------------------------------
# CLIP score and style score
# --------------------------------------------------------------------------------------------


def style_prompts(styles: Sequence[str] = STYLES) -> list[str]:
    """Zero-shot prompts for the WikiArt styles: ``"an <style, underscores as spaces> painting"``."""
    return [STYLE_PROMPT.format(style.replace("_", " ")) for style in styles]


class ClipScorer:
    """CLIP score and zero-shot style probability with an open_clip model (see :func:`load_clip`)."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                 device: str | torch.device = "cpu", styles: Sequence[str] = STYLES,
                 target_style: str = TARGET_STYLE) -> None:
        if target_style not in styles:
            raise ValueError(f"{target_style!r} is not among the styles")
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device = torch.device(device)
        self.styles = list(styles)
        self.target_index = self.styles.index(target_style)
        self._style_text: torch.Tensor | None = None

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings (N, D), float32 on CPU."""
        if len(images) == 0:
            return torch.empty(0, 0)
        pixels = torch.stack([self.preprocess(img) for img in images]).to(self.device)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (N, D), float32 on CPU."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()

    def clip_scores(self, image_features: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per image ``100 * max(cos(image, prompt), 0)`` (torchmetrics' CLIPScore definition)."""
        if image_features.shape[0] != len(prompts):
            raise ValueError("one prompt per image is needed")
        unique = sorted(set(prompts))
        text = self.text_features(unique)
        index = torch.tensor([unique.index(p) for p in prompts])
        return (100.0 * (image_features * text[index]).sum(dim=-1)).clamp(min=0.0)

    def clip_score(self, image_features: torch.Tensor, prompts: Sequence[str]) -> float:
        return float(self.clip_scores(image_features, prompts).mean())

    def style_probabilities(self, image_features: torch.Tensor) -> torch.Tensor:
        """Zero-shot softmax over the styles' prompts, (N, n_styles)."""
        if self._style_text is None:
            self._style_text = self.text_features(style_prompts(self.styles))
        with torch.no_grad():
            scale = self.model.logit_scale.exp().float().cpu()
        return (scale * image_features @ self._style_text.T).softmax(dim=-1)

    def style_score(self, image_features: torch.Tensor) -> float:
        """Mean probability of the target style (Impressionism)."""
        return float(self.style_probabilities(image_features)[:, self.target_index].mean())


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """A named set of image files, with the prompt each was generated from (None for real ones)."""

    name: str
    paths: list[Path]
    prompts: list[str] | None = None
    lora_scale: float = 0.0

    def __len__(self) -> int:
        return len(self.paths)


def check_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the `evaluate` section; return it with defaults filled and types normalised."""
    out = dict(cfg)
    require(cfg, "fid_features", "evaluate")
    out["fid_features"], out["inception_weights"] = check_fid_params(cfg)
    for key, minimum in (("image_size", 1), ("kid_subset_size", 2)):
        require_int(require(cfg, key, "evaluate"), f"evaluate.{key}", minimum=minimum)
    out["seed"] = require_int(cfg.get("seed", 0), "evaluate.seed")
    for key in ("clip_model", "clip_pretrained"):
        value = require(cfg, key, "evaluate")
        if value is not None and not isinstance(value, str):
            raise UserError(f"params.yaml: evaluate.{key}={value!r} must be a string")
    if not (cfg.get("clip_model") or "").strip():
        raise UserError("params.yaml: evaluate.clip_model is empty")
    check_clip_params(cfg["clip_model"], cfg.get("clip_pretrained"))
    return out


def read_samples(folder: Path | str) -> pd.DataFrame:
    """``samples.csv`` of a samples folder, checked, with an absolute ``path`` column added."""
    folder = Path(folder)
    csv = folder / "samples.csv"
    if not folder.is_dir():
        raise UserError(f"{folder} not found; {SAMPLE_HINT}")
    table = read_table(csv, SAMPLES_COLUMNS, "sample_base" if folder.name == "base" else "sample")
    scales = pd.to_numeric(table["lora_scale"], errors="coerce")
    if scales.isna().any():
        raise UserError(f"{csv}: column lora_scale holds non-numbers; re-run the sample stage")
    table = table.assign(lora_scale=scales.astype(float).round(6), prompt=table["prompt"].fillna("").astype(str))
    table["path"] = [folder / str(f) for f in table["file"]]
    absent = [str(f) for f, p in zip(table["file"], table["path"]) if not p.is_file()]
    if absent:
        raise UserError(f"{csv} lists {len(absent)} file(s) missing from {folder} (first: {absent[0]}); "
                        f"re-run the sample stage")
    return table


def read_validation_set(filtered_dir: Path | str) -> ImageSet:
    """The validation split of ``data/filtered`` (``split == "val"``), the real reference images."""
    filtered_dir = Path(filtered_dir)
    meta = filtered_dir / METADATA_FILE
    table = read_table(meta, ("file", "split"), "filter")
    val = table[table["split"] == "val"]
    if len(val) < MIN_IMAGES:
        raise UserError(
            f"{meta} has {len(val)} validation image(s); FID and KID need at least {MIN_IMAGES} real "
            f"images — raise filter.val_fraction (or download.max_images)"
        )
    paths = [filtered_dir / str(f) for f in val["file"]]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise UserError(f"{len(absent)} validation image(s) missing under {filtered_dir} (first: {absent[0]}); "
                        f"re-run the filter stage")
    return ImageSet("real", paths)


def generated_sets(samples_dir: Path | str) -> tuple[ImageSet, list[ImageSet]]:
    """The base set and one LoRA set per ``lora_scale`` (ascending), each checked to hold >= 2 images."""
    samples_dir = Path(samples_dir)
    base = read_samples(samples_dir / "base")
    lora = read_samples(samples_dir / "lora")
    base_set = ImageSet("base", list(base["path"]), list(base["prompt"]), 0.0)
    lora_sets = [
        ImageSet(scale_key(scale), list(group["path"]), list(group["prompt"]), float(scale))
        for scale, group in sorted(lora.groupby("lora_scale"), key=lambda kv: kv[0])
    ]
    for image_set in [base_set, *lora_sets]:
        if len(image_set) < MIN_IMAGES:
            where = samples_dir / ("base" if image_set is base_set else "lora")
            at = "" if image_set is base_set else f" at lora_scale {image_set.lora_scale:g}"
            raise UserError(
                f"{where} has {len(image_set)} image(s){at}; FID/KID need at least {MIN_IMAGES} per set "
                f"(prompts x seeds) — add seeds to sample.seeds or prompts to sample.prompts / "
                f"sample.val_captions"
            )
    return base_set, lora_sets


def scale_key(scale: float) -> str:
    """Stable metrics key of a LoRA scale: ``lora_scale_0.5``, ``lora_scale_1.0``."""
    return f"lora_scale_{round(float(scale), 4)!r}"


def _load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:
        raise UserError(f"{path} is not a readable image: {first_line(err)}") from err


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _score_set(image_set: ImageSet, fidkid: FidKid, clip: ClipScorer, image_size: int,
               real: bool) -> tuple[torch.Tensor, dict[str, float]]:
    features = []
    for paths in _batches(image_set.paths, BATCH_SIZE):
        images = [_load_rgb(p) for p in paths]
        prepared = prepare_images(images, image_size)
        if real:
            fidkid.add_real(prepared)
        else:
            fidkid.add_fake(prepared)
        features.append(clip.image_features(images))
    feats = torch.cat(features)
    result = {"style_score": clip.style_score(feats)}
    if not real:
        result.update(fidkid.compute())
        result["clip_score"] = clip.clip_score(feats, image_set.prompts)
        result["n_fake"] = len(image_set)
    return feats, result


def _section(result: Mapping[str, float]) -> dict[str, float | int]:
    out: dict[str, float | int] = {name: float(result[name]) for name in METRICS}
    out["n_fake"] = int(result["n_fake"])
    out["kid_subset_size"] = int(result["kid_subset_size"])
    return out


def run(eval_cfg: Mapping[str, Any], samples_dir: Path | str, filtered_dir: Path | str,
        metrics_path: Path | str, plots_dir: Path | str) -> dict[str, Any]:
    """Score base and LoRA samples; write ``metrics_path`` and the two plots; return the metrics."""
    from .plotting import plot_base_vs_lora, plot_metrics_vs_scale

    # Everything that can be checked cheaply is checked before any model is loaded.
    cfg = check_config(eval_cfg)
    base_set, lora_sets = generated_sets(samples_dir)
    real_set = read_validation_set(filtered_dir)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    feature_net = fid_feature_extractor(cfg)
    model, preprocess, tokenizer = load_clip(cfg["clip_model"], cfg.get("clip_pretrained"))
    clip = ClipScorer(model.to(device), preprocess, tokenizer, device=device)
    fidkid = FidKid(feature_net, cfg["kid_subset_size"], cfg["seed"], device=device)

    _, real = _score_set(real_set, fidkid, clip, cfg["image_size"], real=True)
    metrics: dict[str, Any] = {"n_real": len(real_set), "real": {"style_score": real["style_score"]}}
    _, base = _score_set(base_set, fidkid, clip, cfg["image_size"], real=False)
    metrics["base"] = _section(base)
    for image_set in lora_sets:
        _, result = _score_set(image_set, fidkid, clip, cfg["image_size"], real=False)
        metrics[image_set.name] = _section(result)
    top = lora_sets[-1]
    metrics["lora"] = {**metrics[top.name], "lora_scale": top.lora_scale}
    metrics["delta"] = {name: metrics["lora"][name] - metrics["base"][name] for name in METRICS}

    bad = [f"{k}.{m}" for k, v in metrics.items() if isinstance(v, dict) for m, x in v.items()
           if isinstance(x, float) and not math.isfinite(x)]
    if bad:
        raise UserError(f"evaluation produced non-finite values ({', '.join(bad[:4])}); too few or identical images?")

    plots_dir = Path(plots_dir)
    random_nets = cfg["fid_features"] != INCEPTION or cfg["clip_model"].startswith("builtin:")
    note = " (random demo feature nets: numbers not meaningful)" if random_nets else ""
    shown = [name for name in METRICS if name != "kid_std"]  # kid_std is drawn as kid_mean's error bar
    plot_base_vs_lora(
        metrics["base"], metrics["lora"], shown, plots_dir / "eval_base_vs_lora.png",
        labels=("base", f"LoRA ×{top.lora_scale:g}"),
        errors={"kid_mean": (metrics["base"]["kid_std"], metrics["lora"]["kid_std"])},
        title="base model vs LoRA" + note,
    )
    scales = [0.0] + [s.lora_scale for s in lora_sets]
    keys = ["base"] + [s.name for s in lora_sets]
    plot_metrics_vs_scale(
        scales, {name: [metrics[k][name] for k in keys] for name in shown},
        plots_dir / "eval_vs_scale.png", title="metrics vs LoRA scale" + note,
    )
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    return metrics


def small_sample_note(metrics: Mapping[str, Any], few: int = FEW_IMAGES) -> str | None:
    """A one-line note when a set is small enough for FID's bias to dominate, else None."""
    smallest = min([int(metrics["n_real"])] + [int(v["n_fake"]) for v in metrics.values()
                                               if isinstance(v, dict) and "n_fake" in v])
    if smallest >= few:
        return None
    return (f"note: FID from {smallest} images per set is strongly biased (it wants thousands); compare "
            f"base and LoRA by KID (kid_mean, unbiased at any size), or generate more images (sample.seeds, "
            f"sample.prompts, sample.val_captions)")


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m impressionist.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (reads its `evaluate` section)")
    parser.add_argument("--samples", default=str(SAMPLES_DIR), help="folder with base/ and lora/ sample folders")
    parser.add_argument("--filtered", default=str(FILTERED_DIR), help="filter stage output (val split = real set)")
    parser.add_argument("--metrics", default="metrics/eval.json", help="metrics JSON to write")
    parser.add_argument("--plots", default="plots", help="folder for eval_*.png")
    args = parser.parse_args(argv)
    cfg = section(load_params(args.params), "evaluate")
    metrics = run(cfg, args.samples, args.filtered, args.metrics, args.plots)
    lora = metrics["lora"]
    print(f"evaluate: {metrics['n_real']} real images; base FID {metrics['base']['fid']:.3f}, "
          f"LoRA@{lora['lora_scale']:g} FID {lora['fid']:.3f}; style score "
          f"{metrics['base']['style_score']:.3f} -> {lora['style_score']:.3f}; wrote {args.metrics}")
    note = small_sample_note(metrics)
    if note:
        print(note, file=sys.stderr)


if __name__ == "__main__":
    main()
