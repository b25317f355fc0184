"""Feature networks for the evaluation metrics: the real ones, and tiny random stand-ins.

* FID/KID features (:func:`fid_feature_extractor`):
  - ``"inception"``: torchmetrics' ``NoTrainInceptionV3`` — the torch-fidelity port of the TF
    Inception used by the original FID code, 2048-d pool features. Its weights
    (``weights-inception-2015-12-05-6726825d.pth``) are downloaded on first use into the torch hub
    cache, or read from ``evaluate.inception_weights`` when that is a local file; either way they
    are loaded with ``weights_only=True`` (no unpickling of code), see :func:`inception_state_dict`.
  - ``"builtin:tiny"``: :class:`TinyFeatureNet`, a small conv net with *random* weights drawn from a
    fixed seed. It only exists so the pipeline and the tests run offline; its FID/KID numbers say
    nothing about image quality and are not comparable with published FIDs.
* CLIP (:func:`load_clip`): an open_clip model, its eval preprocessing and its tokenizer. Either a
  real open_clip model (``"ViT-L-14"`` + ``"openai"``, or a local checkpoint path), or
  ``"builtin:tiny-clip"``: a tiny random open_clip CLIP, built once from a fixed seed, saved to the
  cache folder (:func:`cache_dir`) and loaded back through open_clip's ordinary local-checkpoint
  path, with open_clip's own BPE tokenizer. Again: random weights, for offline runs and tests only.
  A pretrained tag whose weights were trained with QuickGELU (OpenAI's, among others: open_clip's
  pretrained config says ``quick_gelu``) gets a model built with QuickGELU; open_clip builds plain
  GELU for a name such as ``ViT-L-14`` whatever the tag, and only warns. A local checkpoint file of
  such weights needs the ``-quickgelu`` model name (``ViT-L-14-quickgelu``).

Inputs to the FID/KID extractors are ``(N, 3, H, W)`` tensors, uint8 in [0, 255] (what torchmetrics'
Inception expects); the tiny net also accepts floats in [0, 1].
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import DEMO_HINT, UserError, atomic_write_bytes, atomic_write_text, first_line
from .params import fingerprint
from .params.evaluation import INCEPTION_WEIGHTS_FILE, TINY_FID

TINY_CLIP = "builtin:tiny-clip"
TINY_CLIP_NAME = "impressionist-tiny-clip"  # the name it is registered under in open_clip
TINY_CLIP_PRETRAINED = ("builtin", "")       # accepted `clip_pretrained` values for the tiny model
TINY_SEED = 0                                # fixed: the tiny nets are the same on every run
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def cache_dir() -> Path:
    """Folder for locally built artefacts: ``$IMPRESSIONIST_CACHE`` if set, else ``./.cache/impressionist``.

    The same folder the tiny FLUX pipeline uses (:func:`impressionist.models.cache_root`).
    """
    from .models import cache_root

    return cache_root()


# --------------------------------------------------------------------------------------------
# FID / KID features
# --------------------------------------------------------------------------------------------


class TinyFeatureNet(nn.Module):
    """A small conv net with RANDOM weights from a fixed seed, standing in for Inception offline.

    Three strided 3x3 convolutions with ReLU, then global average pooling: ``(N, 3, H, W)`` →
    ``(N, num_features)`` for any H, W. uint8 input is read as [0, 255], float input as [0, 1], so
    the same image in either dtype gives the same features. Never trained, always in eval mode,
    no gradients. It makes offline runs and tests possible; its distances are not real FIDs.
    """

    def __init__(self, num_features: int = 64, seed: int = TINY_SEED) -> None:
        super().__init__()
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, num_features, 3, stride=2, padding=1), nn.ReLU(),
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.body:
                if isinstance(layer, nn.Conv2d):
                    fan_in = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                    layer.bias.copy_((torch.rand(layer.bias.shape, generator=gen) - 0.5) * 0.2)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TinyFeatureNet":  # never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.float() / 255.0
        elif images.is_floating_point():
            x = images.float()
        else:
            raise TypeError(f"expected uint8 or float images, got {images.dtype}")
        weight = self.body[0].weight
        x = x.to(weight.device) * 2.0 - 1.0
        return self.body(x).mean(dim=(2, 3))


def inception_state_dict(weights_path: str | None) -> dict[str, torch.Tensor]:
    """The Inception weights, unpickled with ``weights_only=True`` (tensors only, no code runs).

    ``weights_path`` is a local copy of the weights file; None reads torch-fidelity's download into
    the torch hub cache (downloading it the first time).
    """
    if weights_path is None:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        return torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu", progress=False,
                                                  weights_only=True)
    return torch.load(weights_path, map_location="cpu", weights_only=True)


def _inception(weights_path: str | None) -> nn.Module:
    """torchmetrics' Inception with weights loaded without pickle.

    torch-fidelity's constructor reads the weights itself with ``torch.load(weights_only=False)``
    (from a path) or ``load_state_dict_from_url`` (weights_only=False by default): either would
    run any code a tampered file holds. Its module-level ``load_state_dict_from_url`` is swapped,
    only while the network is built, for one that returns the state loaded safely above.
    """
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
    from torchmetrics.image.fid import NoTrainInceptionV3

    state = inception_state_dict(weights_path)
    with mock.patch.object(fidelity_inception, "load_state_dict_from_url", lambda *a, **k: state):
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    net.num_features = 2048  # so torchmetrics does not probe it with a dummy image
    return net


def fid_feature_extractor(kind: str, weights: str = "") -> nn.Module:
    """The feature network for FID and KID: ``kind`` is ``evaluate.fid_features``, ``weights``
    ``evaluate.inception_weights`` ("" = download), both as the evaluate params checked them.

    Returns an ``nn.Module`` in eval mode with an int ``num_features``, mapping uint8
    ``(N, 3, H, W)`` images to ``(N, num_features)``. Raises UserError (one line) when the
    Inception weights are neither a readable local file nor downloadable.
    """
    if kind == TINY_FID:
        return TinyFeatureNet()
    if weights:
        try:
            return _inception(str(Path(weights).expanduser()))
        except Exception as err:  # corrupt file, wrong state dict, ...
            raise UserError(
                f"evaluate.inception_weights={weights!r} is not a usable {INCEPTION_WEIGHTS_FILE} "
                f"state dict: {first_line(err)}"
            ) from err
    try:
        return _inception(None)
    except Exception as err:  # no network, HTTP error, truncated download, ...
        raise UserError(
            f"the Inception weights for FID/KID could not be downloaded ({first_line(err)}); set "
            f"evaluate.inception_weights to a local copy of {INCEPTION_WEIGHTS_FILE} (same file as "
            f"pytorch-fid's pt_inception-2015-12-05-6726825d.pth), or {DEMO_HINT}"
        ) from err


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """open_clip logs a root-logger warning when it builds a model without weights; hide it."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _register_tiny_clip(folder: Path) -> None:
    import open_clip

    config_path = folder / f"{TINY_CLIP_NAME}.json"
    text = json.dumps(TINY_CLIP_CONFIG, indent=2, sort_keys=True) + "\n"
    if not config_path.is_file() or config_path.read_text() != text:
        atomic_write_text(config_path, text)
    if open_clip.get_model_config(TINY_CLIP_NAME) != TINY_CLIP_CONFIG:
        open_clip.add_model_config(config_path)  # a later path wins over an earlier same-named one


def tiny_clip_checkpoint() -> Path:
    """Build the tiny random CLIP once (fixed seed) and return its checkpoint in the cache folder."""
    import open_clip

    folder = cache_dir() / "tiny-clip"
    _register_tiny_clip(folder)
    key = fingerprint(TINY_CLIP_CONFIG, TINY_SEED, open_clip.__version__)
    checkpoint = folder / f"{TINY_CLIP_NAME}-{key}.pt"
    if not checkpoint.is_file():
        with torch.random.fork_rng(devices=[]), _quiet_logging():
            torch.manual_seed(TINY_SEED)
            model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        atomic_write_bytes(checkpoint, buffer.getvalue())
    return checkpoint


def load_clip(model_name: str, pretrained: str | None,
              keys: tuple[str, str] = ("clip_model", "clip_pretrained")) -> tuple[nn.Module, Callable, Callable]:
    """Return ``(model, preprocess, tokenizer)`` for CLIP scoring, model in eval mode without grads.

    ``model_name`` is an open_clip model name (``"ViT-L-14"``) with ``pretrained`` an open_clip tag
    (``"openai"``, downloaded on first use) or a local checkpoint file; or ``"builtin:tiny-clip"``
    (``pretrained`` ``"builtin"``) for the tiny random model. ``preprocess`` is open_clip's eval
    transform (PIL image → normalised tensor), ``tokenizer`` open_clip's tokenizer for the model.
    Raises UserError (one line) for an unknown model/tag, a missing file or a failed download.
    """
    import open_clip

    pretrained = "" if pretrained is None else str(pretrained).strip()
    check_clip_params(model_name, pretrained, keys)
    if model_name == TINY_CLIP:
        name, source = TINY_CLIP_NAME, str(tiny_clip_checkpoint())
    else:
        local = Path(pretrained).expanduser()
        name, source = model_name, (str(local) if pretrained and local.is_file() else pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=source or None, force_quick_gelu=needs_quick_gelu(name, source))
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:
        raise UserError(
            f"could not load CLIP model {model_name!r} with pretrained={pretrained!r}: {first_line(err)}; "
            f"with no network, set evaluate.{keys[1]} to a local checkpoint file, or {DEMO_HINT}"
        ) from err
    model.requires_grad_(False)
    model.eval()
    return model, preprocess, tokenizer


def needs_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether the weights of open_clip tag ``pretrained`` for ``model_name`` were trained with
    QuickGELU (open_clip's pretrained config says so; it does not apply it by itself)."""
    import open_clip

    if not pretrained or model_name.startswith(("hf-hub:", "local-dir:")):
        return False
    return bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))


def check_clip_params(model_name: str, pretrained: str | None,
                      keys: tuple[str, str] = ("clip_model", "clip_pretrained")) -> None:
    """Refuse an unknown open_clip model, tag or missing checkpoint file — cheaply, before any download.

    ``keys`` names the `evaluate` params the two values come from, for the error lines.
    """
    import open_clip

    model_key, pretrained_key = keys
    pretrained = "" if pretrained is None else str(pretrained).strip()
    if model_name == TINY_CLIP:
        if pretrained not in TINY_CLIP_PRETRAINED:
            raise UserError(
                f"params.yaml: evaluate.{pretrained_key}={pretrained!r} does not go with "
                f"{model_key}={TINY_CLIP!r}; set it to 'builtin'"
            )
        return
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return
    if model_name not in open_clip.list_models():
        raise UserError(
            f"params.yaml: evaluate.{model_key}={model_name!r} is not an open_clip model name "
            f"(e.g. ViT-L-14), nor {TINY_CLIP!r}"
        )
    if not pretrained:
        raise UserError(
            f"params.yaml: evaluate.{pretrained_key} is empty; a random {model_name} says nothing — set an "
            f"open_clip tag (e.g. openai) or a local checkpoint file"
        )
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags and not Path(pretrained).expanduser().is_file():
        raise UserError(
            f"params.yaml: evaluate.{pretrained_key}={pretrained!r} is neither a pretrained tag of "
            f"{model_name} ({', '.join(tags) or 'none'}) nor an existing checkpoint file"
        )
