"""Image features for the evaluation, the same for real paintings and generated images.

The reference stage runs this on the validation paintings once per data version; the evaluate stage
runs it on the generated evaluation set. Both must see the same preprocessing and the same networks,
so both go through :class:`Extractors`:

* ``fid``: the FID/KID network (Inception, or the tiny random stand-in) on :func:`prepare_images`
  (shorter side resized to ``evaluate.image_size`` with antialiased bicubic, centre crop, uint8);
* ``clip``: L2-normalised open_clip image embeddings of ``evaluate.clip_model`` (CLIP score, style
  score);
* ``cmmd``: L2-normalised open_clip image embeddings of ``evaluate.cmmd_clip_model`` (CMMD's
  ViT-L-14-336 in the real recipe); the ``clip`` ones when both name the same model.

:func:`feature_config` is what identifies the features: the reference stage records it, and the
evaluate stage refuses reference features computed with another one.

:meth:`Extractors.features` is data-parallel (:mod:`data_parallel`): its work items are whole
batches of :data:`BATCH_SIZE` images, the same batches on any number of processes, so the features
are the same bytes whatever ``compute.num_processes`` is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import data_parallel
from .errors import UserError, first_line
from .feature_nets import check_clip_params, fid_feature_extractor, load_clip
from .hub import BUILTIN_PREFIX
from .params import evaluation
from .params.evaluation import CLIP_KEYS, CMMD_KEYS, INCEPTION
from .wikiart import STYLES

TARGET_STYLE = "Impressionism"
STYLE_PROMPT = "an {} painting"
BATCH_SIZE = 16
FEATURE_KEYS = ("fid_features", "image_size", *CLIP_KEYS, *CMMD_KEYS)


@dataclass(frozen=True)
class EvaluateParams(evaluation.EvaluateParams):
    """params.yaml ``evaluate`` as the reference and evaluate stages read it: the torch-free checks of
    :class:`impressionist.params.evaluation.EvaluateParams`, then each CLIP model name and tag looked
    up in open_clip's registry (cheap, no download)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for model_key, pretrained_key in (CLIP_KEYS, CMMD_KEYS):
            check_clip_params(getattr(self, model_key), getattr(self, pretrained_key), (model_key, pretrained_key))


# --------------------------------------------------------------------------------------------
# Preprocessing for FID/KID
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


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:
        raise UserError(f"{path} is not a readable image: {first_line(err)}") from err


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


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

    def style_probabilities(self, image_features: torch.Tensor) -> torch.Tensor:
        """Zero-shot softmax over the styles' prompts, (N, n_styles)."""
        if self._style_text is None:
            self._style_text = self.text_features(style_prompts(self.styles))
        with torch.no_grad():
            scale = self.model.logit_scale.exp().float().cpu()
        return (scale * image_features @ self._style_text.T).softmax(dim=-1)

    def style_scores(self, image_features: torch.Tensor) -> torch.Tensor:
        """Per image: the zero-shot probability of the target style (Impressionism)."""
        return self.style_probabilities(image_features)[:, self.target_index]


# --------------------------------------------------------------------------------------------
# The extractors: one pass over a set of image files
# --------------------------------------------------------------------------------------------


def feature_config(cfg: EvaluateParams) -> dict[str, Any]:
    """What identifies the features: reference features are only reused under the same one."""
    return {key: getattr(cfg, key) for key in FEATURE_KEYS}


def uses_random_nets(cfg: EvaluateParams) -> bool:
    """The demo's random feature nets: numbers that show the pipeline runs, nothing about paintings."""
    return cfg.fid_features != INCEPTION or any(model.startswith(BUILTIN_PREFIX)
                                                for model in (cfg.clip_model, cfg.cmmd_clip_model))


@dataclass
class Extractors:
    """The three feature networks of the evaluation, loaded once."""

    fid_net: torch.nn.Module
    clip: ClipScorer
    cmmd_clip: ClipScorer | None  # None: CMMD reuses the `clip` embeddings (same model)
    image_size: int
    device: torch.device

    @classmethod
    def load(cls, cfg: EvaluateParams) -> "Extractors":
        device = data_parallel.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        fid_net = fid_feature_extractor(cfg.fid_features, cfg.inception_weights).to(device).eval()

        def scorer(keys: tuple[str, str]) -> ClipScorer:
            model, preprocess, tokenizer = load_clip(getattr(cfg, keys[0]), getattr(cfg, keys[1]), keys)
            return ClipScorer(model.to(device), preprocess, tokenizer, device=device)

        clip = scorer(CLIP_KEYS)
        same = (cfg.cmmd_clip_model, cfg.cmmd_clip_pretrained) == (cfg.clip_model, cfg.clip_pretrained)
        return cls(fid_net, clip, None if same else scorer(CMMD_KEYS), cfg.image_size, device)

    @torch.no_grad()
    def batch_features(self, chunk: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """FID, CLIP and CMMD features (``None``: the CLIP ones) of one batch of image files, on CPU."""
        images = [load_rgb(p) for p in chunk]
        fid = self.fid_net(prepare_images(images, self.image_size).to(self.device)).float().cpu()
        cmmd = None if self.cmmd_clip is None else self.cmmd_clip.image_features(images)
        return fid, self.clip.image_features(images), cmmd

    def features(self, paths: Sequence[Path]) -> dict[str, torch.Tensor] | None:
        """``{"fid", "clip", "cmmd"}`` feature matrices (N, d) of the images at ``paths``, in order;
        the batches split over the processes (``None`` on ranks other than 0)."""
        parts = data_parallel.map_in_order(list(batches(list(paths), BATCH_SIZE)), self.batch_features)
        if parts is None:
            return None
        fid, clip, cmmd = zip(*parts)
        out = {"fid": torch.cat(fid), "clip": torch.cat(clip)}
        out["cmmd"] = out["clip"] if self.cmmd_clip is None else torch.cat(cmmd)
        return out


def batch_count(images: int) -> int:
    """How many work items :meth:`Extractors.features` splits ``images`` images into."""
    return -(-images // BATCH_SIZE)


# --------------------------------------------------------------------------------------------
# Reference features on disk (written by the reference stage, read by evaluate)
# --------------------------------------------------------------------------------------------

FEATURES_FILE = "features.safetensors"
INFO_FILE = "reference.json"


def save_reference(folder: Path, features: Mapping[str, torch.Tensor], ids: Sequence[str],
                   cfg: EvaluateParams) -> None:
    """Write the real set's features and what made them into ``folder`` (already a fresh folder)."""
    import json

    from safetensors.torch import save_file

    tensors = {"fid": features["fid"].contiguous(), "clip": features["clip"].contiguous()}
    if features["cmmd"] is not features["clip"]:  # safetensors refuses two names for one tensor
        tensors["cmmd"] = features["cmmd"].contiguous()
    save_file(tensors, str(folder / FEATURES_FILE))
    info = {"n": len(ids), "ids": list(ids), "features": feature_config(cfg)}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def load_reference(folder: Path | str, cfg: EvaluateParams,
                   ids: Sequence[str]) -> tuple[dict[str, torch.Tensor], int]:
    """The real set's features, checked to come from the feature config ``cfg`` and to be those of
    the paintings ``ids`` (the current validation split); and their count."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    rerun = "run the reference stage (`dvc repro reference`)"
    try:
        info = json.loads((folder / INFO_FILE).read_text())
        tensors = load_file(str(folder / FEATURES_FILE))
    except FileNotFoundError:
        raise UserError(f"no reference features in {folder}; {rerun}") from None
    except Exception as err:
        raise UserError(f"{folder} holds unreadable reference features ({first_line(err, 160)}); {rerun}") from err
    if info.get("features") != feature_config(cfg):
        raise UserError(f"{folder} was computed with other feature networks than params.yaml's evaluate "
                        f"section; {rerun}")
    recorded, current = list(info.get("ids", [])), [str(i) for i in ids]
    if recorded != current:
        differ = len(set(recorded) ^ set(current))
        raise UserError(f"{folder} holds the features of other paintings than the validation split of data/filtered "
                        f"({len(recorded)} recorded, {len(current)} now, {differ} id(s) in one only); {rerun}")
    tensors.setdefault("cmmd", tensors["clip"])
    return tensors, int(info["n"])
