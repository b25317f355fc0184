"""Random-weight stand-ins at full size, for GPU runs without the Hub (gpu_acceptance.py).

    python benchmarks/random_flux.py OUT [--device cuda]

writes into OUT:

* ``model/``: a diffusers FluxPipeline folder with FLUX.1-dev's architectures (bench_train_step.py's
  published configs: 11.9B transformer, T5-XXL, CLIP-L, the 16-channel VAE) and random bf16
  weights; tokenizers are the tiny model's character-level ones (their ids fit both vocabularies);
* ``lora/``: a rank-16 LoRA on every Linear of the blocks (``lora.targets: all-linear-blocks``, the recipe's) with
  random non-zero factors, in diffusers format;
* ``features/``: random-weight checkpoints of the evaluation's feature networks at their real
  sizes (torchmetrics' Inception, open_clip ViT-L-14 and ViT-L-14-336).

Random weights change neither the speed nor the memory of a step; the images and metrics they
give mean nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from unittest import mock

import torch

from bench_train_step import CLIP_L, FLUX_DEV_TRANSFORMER, FLUX_DEV_VAE, T5_XXL

LORA_RANK = 16
FEATURE_FILES = {"inception": "inception.pth", "ViT-L-14": "ViT-L-14.pt", "ViT-L-14-336": "ViT-L-14-336.pt"}


def save_random_flux(folder: Path, device: str, dtype: torch.dtype = torch.bfloat16,
                     configs: dict | None = None) -> None:
    """The pipeline folder; ``configs`` overrides the architectures (tests pass tiny ones)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from impressionist.tiny_flux import SCHEDULER_CONFIG, _clip_tokenizer, _t5_tokenizer

    configs = {"transformer": FLUX_DEV_TRANSFORMER, "vae": FLUX_DEV_VAE, "clip": CLIP_L, "t5": T5_XXL,
               **(configs or {})}
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    default_dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # built in bf16 on the device: no 48 GB fp32 copy on the host
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**configs["transformer"])
            vae = AutoencoderKL(**configs["vae"])
            clip = CLIPTextModel(CLIPTextConfig(**configs["clip"], bos_token_id=clip_tok.bos_token_id,
                                                eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
            t5 = T5EncoderModel(T5Config(**configs["t5"], pad_token_id=t5_tok.pad_token_id,
                                         eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=t5_tok.pad_token_id))
    finally:
        torch.set_default_dtype(default_dtype)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae, text_encoder=clip,
                        tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(folder)


def save_random_lora(folder: Path, transformer_config: dict, rank: int = LORA_RANK) -> None:
    """A LoRA as the recipe trains it (rank 16, all-linear-blocks), random factors, built on "meta"."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft.utils import get_peft_model_state_dict

    from impressionist.lora import LoraParams, lora_config

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**transformer_config)
    transformer.add_adapter(lora_config(LoraParams(rank=rank, alpha=rank, targets="all-linear"), transformer))
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.01
             for k, v in get_peft_model_state_dict(transformer).items()}
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=state)


def save_random_feature_nets(folder: Path, clip_models: tuple[str, ...] = ("ViT-L-14", "ViT-L-14-336"),
                             device: str = "cpu") -> dict:
    """Random checkpoints the evaluate settings accept (evaluate.inception_weights, a local
    evaluate.clip_pretrained file); returns {name: path}."""
    import open_clip
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    from torchmetrics.image.fid import NoTrainInceptionV3

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    # torch-fidelity's constructor loads the published weights; here it keeps its random ones
    with mock.patch.object(fidelity, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    paths["inception"] = folder / FEATURE_FILES["inception"]
    torch.save(inception.state_dict(), paths["inception"])
    for name in clip_models:
        paths[name] = folder / FEATURE_FILES.get(name, f"{name}.pt")
        model = open_clip.create_model(name, pretrained=None, device=device)  # initialised there: fast on a GPU
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, paths[name])
    return {k: str(v) for k, v in paths.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda", help="where the weights are initialised (cuda: fast)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda needs a CUDA GPU; use --device cpu (slow: ~70 GB of host memory)")
    start = time.perf_counter()
    save_random_flux(args.out / "model", args.device)
    save_random_lora(args.out / "lora", FLUX_DEV_TRANSFORMER)
    features = save_random_feature_nets(args.out / "features", device=args.device)
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "model": str(args.out / "model"),
                      "lora": str(args.out / "lora"), "features": features}))


if __name__ == "__main__":
    main()
