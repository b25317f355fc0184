"""Command ``generate``: one image from the trained LoRA on the command line, drawn exactly as the
sample stage draws its show set (same ``sample`` inference settings: quantisation, offload, LoRA mode,
steps, guidance, resolution; same pipeline loader and draw function), with diffusers' tqdm step bar.

    impressionist generate "impr3ssionism, a harbor at sunset" --lora models/lora --scale 1 --seed 0 --out harbor.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import UserError, stage_main
from .layout import LORA_DIR, LORA_WEIGHTS
from .params import DEFAULT_PARAMS, load_params
from .params.evaluation import SampleParams
from .params.model import ModelParams

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def run(params, prompt: str, lora_dir: Path | None, scale: float, seed: int, out: Path) -> Path:
    """Draw ``prompt`` with the LoRA in ``lora_dir`` at ``scale`` (no LoRA: ``lora_dir`` None or scale 0)."""
    # The sample stage's own loader, settings and draw function, so the image is the stage's image.
    from .inference import baked, lora_applied
    from .models import without_third_party_noise
    from .sample import draw, load, noise_seed, sampling_device, show_sampler

    out = Path(out)
    if not prompt.strip():
        raise UserError("generate: the prompt is empty")
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"generate: --out {out} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    if not out.parent.is_dir():
        raise UserError(f"generate: the folder of --out ({out.parent}) does not exist")
    if not isinstance(scale, (int, float)) or scale < 0:
        raise UserError(f"generate: --scale {scale} must be >= 0")
    model, cfg = ModelParams.check(params), SampleParams.check(params)
    use_lora = lora_dir is not None and scale > 0
    if use_lora and not (Path(lora_dir) / LORA_WEIGHTS).is_file():
        raise UserError(f"no LoRA at {lora_dir}/{LORA_WEIGHTS}; run the train stage first (`dvc repro train`)")
    device = sampling_device(model, cfg)
    with without_third_party_noise():
        pipe = load(model, cfg, device, Path(lora_dir) if use_lora else None,
                    baked_scale=float(scale) if use_lora and baked(cfg) else 1.0)
    if use_lora:
        with lora_applied(pipe, cfg, float(scale)):
            image = draw(pipe, show_sampler(cfg), prompt, noise_seed(prompt, int(seed)))
    else:
        image = draw(pipe, show_sampler(cfg), prompt, noise_seed(prompt, int(seed)))
    image.save(out)
    print(f"generate: {out} ({cfg.resolution}px, {cfg.steps} steps, LoRA x{scale:g}, seed {seed})")
    return out


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="impressionist generate", description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--lora", default=str(LORA_DIR), help=f"folder holding {LORA_WEIGHTS} (default {LORA_DIR})")
    parser.add_argument("--scale", type=float, default=1.0, help="LoRA strength (0: the base model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="image file to write (.png, .jpg, .webp)")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    args = parser.parse_args(argv)
    run(load_params(args.params), args.prompt, Path(args.lora), args.scale, args.seed, Path(args.out))


if __name__ == "__main__":
    main()
