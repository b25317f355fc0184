"""Stage ``export``: the trained LoRA as a ComfyUI/kohya file, and optionally fused into the transformer.

``train`` writes the LoRA in diffusers format (``transformer.<module>.lora_A/B.weight`` with the
peft config in the safetensors metadata). ComfyUI, Forge and kohya's sd-scripts read the other
FLUX.1 LoRA layout: the original Black Forest Labs module names flattened to ``lora_unet_*`` keys,
``lora_down``/``lora_up`` factors and a per-module ``.alpha`` scalar, with the attention
projections *fused*: q, k, v of a double block are one ``img_attn_qkv`` layer, and q, k, v and the
MLP input of a single block are one ``linear1`` layer.

diffusers ships only the reverse direction (``_convert_kohya_flux_lora_to_diffusers``, used by
``FluxPipeline.load_lora_weights``; ``diffusers.utils.convert_state_dict_to_kohya`` is for SD UNet
names and stores alpha = rank). :func:`kohya_state_dict` is the forward mapping, written as the
exact inverse of diffusers' converter, and the tests prove it by loading the file back through
that converter.

Fusing a group of LoRAs into one: the fused ``lora_down`` stacks the members' A matrices and the
fused ``lora_up`` is block-diagonal in their B matrices, so ``up @ down`` is exactly the members'
updates side by side. Every member gets the same block rank R (missing members and lower ranks are
zero-padded), so a group of n members has rank n*R and ``alpha = scale * n * R`` keeps peft's
``scale = alpha / r``. This is the "sparse" layout diffusers' converter recognises and splits
back into the original factors.

The kohya file is written in ``export.dtype`` (bf16 by default, as LoRA files of this ecosystem
are; the ``.alpha`` scalars stay fp32), and its ``ss_network_dim`` / ``ss_network_alpha`` are the
largest layer rank in the file and that layer's alpha (a fused q/k/v layer has rank 3R), with every
layer rank counted in ``impressionist_layer_ranks``. ``export.json`` records the file sizes.

The final layer (``proj_out``, ``norm_out.linear``, adapted by the ``all-linear`` preset, not by the
default ``all-linear-blocks``) is exported, since ComfyUI reads it, but diffusers' kohya reader drops
it (its keys come out without the ``transformer.`` prefix) and kohya sd-scripts builds no module for
it (strict load refuses the file, merge/resume drop it): the stage warns and ``export.json`` lists
the layers affected (``diffusers_kohya_reader_skips``, ``sd_scripts_skips``); diffusers users load
the diffusers-format file, which keeps them.

The fused export (``export.fused: true``) merges the LoRA into the transformer weights with
diffusers' ``fuse_lora`` at ``export.lora_scale`` and saves the transformer as a diffusers model
folder: no LoRA layers at inference time.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import UserError, atomic_dir, stage_main
from .layout import EXPORT_DIR, EXPORT_MANIFEST, LORA_DIR, LORA_WEIGHTS
from .models import DTYPES, load_pipeline, resolve_device, resolve_dtype, resolve_pretrained, without_third_party_noise
from .params import DEFAULT_PARAMS, load_params
from .params.model import ModelParams
from .params.shipping import ExportParams

# Not ending in "pytorch_lora_weights.safetensors": diffusers' load_lora_weights(repo) picks the
# diffusers file when both sit in one Hub repo.
KOHYA_FILE = "impressionist_lora_kohya.safetensors"
FUSED_DIR = "transformer"
# diffusers' FluxSingleTransformerBlock has a fixed MLP ratio of 4 (BFL's single blocks too).
SINGLE_BLOCK_MLP_RATIO = 4

# diffusers module (inside a block) -> (BFL/kohya module, position in the fused layer, group size)
DOUBLE_BLOCK = {
    "attn.to_q": ("img_attn_qkv", 0, 3), "attn.to_k": ("img_attn_qkv", 1, 3),
    "attn.to_v": ("img_attn_qkv", 2, 3), "attn.to_out.0": ("img_attn_proj", 0, 1),
    "ff.net.0.proj": ("img_mlp_0", 0, 1), "ff.net.2": ("img_mlp_2", 0, 1),
    "norm1.linear": ("img_mod_lin", 0, 1),
    "attn.add_q_proj": ("txt_attn_qkv", 0, 3), "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn_qkv", 2, 3), "attn.to_add_out": ("txt_attn_proj", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp_0", 0, 1), "ff_context.net.2": ("txt_mlp_2", 0, 1),
    "norm1_context.linear": ("txt_mod_lin", 0, 1),
}
SINGLE_BLOCK = {
    "attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1),
    "norm.linear": ("modulation_lin", 0, 1),
}
TOP_LEVEL = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "proj_out": "final_layer_linear",
    # BFL orders this modulation (shift, scale), diffusers (scale, shift): swap the halves.
    "norm_out.linear": "final_layer_adaLN_modulation_1",
}
SWAPPED_HALVES = {"final_layer_adaLN_modulation_1"}
# diffusers' kohya converter copies the final layer's factors without applying their alpha, so
# for these the scale goes into lora_up and alpha = rank (scale 1): right for every reader.
SCALE_IN_WEIGHTS = {"final_layer_linear", "final_layer_adaLN_modulation_1"}
LORA_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def read_lora(lora_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The diffusers-format LoRA and its peft adapter config (from the safetensors metadata)."""
    from diffusers import FluxPipeline

    path = Path(lora_dir) / LORA_WEIGHTS
    if not path.is_file():
        raise UserError(f"no LoRA at {path}; run the train stage first (`dvc repro train`)")
    state_dict, metadata = FluxPipeline.lora_state_dict(str(lora_dir), weight_name=LORA_WEIGHTS,
                                                        return_lora_metadata=True)
    if not metadata:
        raise UserError(f"{path} has no LoRA adapter metadata (rank/alpha); it was not written by "
                        "`impressionist train` — re-run the train stage")
    config = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    return state_dict, config


def module_scales(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, tuple]:
    """``module -> (A, B, scale)`` with peft's scale: alpha / r (alpha / sqrt(r) for rsLoRA)."""
    from peft.utils.other import get_pattern_key

    if config.get("use_dora"):
        raise UserError("this LoRA uses DoRA, which the kohya/ComfyUI LoRA format cannot hold")
    if config.get("lora_bias"):
        raise UserError("this LoRA trains biases (lora_bias), which the kohya LoRA format cannot hold")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = LORA_KEY.match(key)
        if not match:
            raise UserError(f"unexpected tensor {key} in the LoRA; only transformer LoRA factors "
                            "(lora_A/lora_B) can be exported")
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    alpha_pattern = config.get("alpha_pattern") or {}
    modules = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise UserError(f"LoRA module {module} lacks its lora_A or lora_B factor")
        rank = pair["A"].shape[0]
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        modules[module] = (pair["A"], pair["B"], float(scale))
    return modules


def kohya_name(module: str) -> tuple[str, int, int]:
    """``(kohya module, position in its fused group, group size)`` for a diffusers module name."""
    parts = module.split(".")
    if parts[0] in ("transformer_blocks", "single_transformer_blocks") and len(parts) > 2:
        table = DOUBLE_BLOCK if parts[0] == "transformer_blocks" else SINGLE_BLOCK
        inner = ".".join(parts[2:])
        if inner in table:
            name, position, size = table[inner]
            block = "double_blocks" if parts[0] == "transformer_blocks" else "single_blocks"
            return f"lora_unet_{block}_{parts[1]}_{name}", position, size
    elif module in TOP_LEVEL:
        return f"lora_unet_{TOP_LEVEL[module]}", 0, 1
    raise UserError(f"LoRA module {module} has no counterpart in the kohya/ComfyUI FLUX.1 layout")


def kohya_state_dict(modules: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The kohya/ComfyUI tensors (``lora_down``, ``lora_up``, ``alpha``) for ``module_scales`` output."""
    groups: dict[str, dict[int, tuple]] = {}
    sizes: dict[str, int] = {}
    for module, (down, up, scale) in sorted(modules.items(), key=lambda item: item[0]):
        name, position, size = kohya_name(module)
        groups.setdefault(name, {})[position] = (down, up, scale)
        sizes[name] = size
    out: dict[str, torch.Tensor] = {}
    for name, members in groups.items():
        size = sizes[name]
        first = members[min(members)]
        if size == 1:
            down, up, scale = first
            if name.removeprefix("lora_unet_") in SWAPPED_HALVES:
                up = torch.cat(up.chunk(2, dim=0)[::-1])
            if name.removeprefix("lora_unet_") in SCALE_IN_WEIGHTS:
                up, scale = up * scale, 1.0
            out[f"{name}.lora_down.weight"] = down.contiguous()
            out[f"{name}.lora_up.weight"] = up.contiguous()
            out[f"{name}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
            continue
        in_features, dtype = first[0].shape[1], first[0].dtype
        block_rank = max(down.shape[0] for down, _, _ in members.values())
        inner = next((up.shape[0] for pos, (_, up, _) in members.items() if pos < 3), None)
        if inner is None:  # only the MLP input of a single block is adapted
            inner = members[3][1].shape[0] // SINGLE_BLOCK_MLP_RATIO
        rows = [inner] * 3 + ([inner * SINGLE_BLOCK_MLP_RATIO] if size == 4 else [])
        reference_scale = first[2]
        fused_down = torch.zeros(size * block_rank, in_features, dtype=dtype)
        fused_up = torch.zeros(sum(rows), size * block_rank, dtype=dtype)
        for position, (down, up, scale) in members.items():
            if down.shape[1] != in_features or up.shape[0] != rows[position]:
                raise UserError(f"LoRA shapes of {name} do not form a FLUX.1 fused layer")
            rank, row = down.shape[0], sum(rows[:position])
            column = position * block_rank
            fused_down[column:column + rank] = down
            # One alpha per fused layer: a member with another scale carries the ratio in its B
            # (a factor of exactly 1.0 for the usual single rank and alpha).
            fused_up[row:row + up.shape[0], column:column + rank] = up * (scale / reference_scale)
        out[f"{name}.lora_down.weight"] = fused_down
        out[f"{name}.lora_up.weight"] = fused_up
        out[f"{name}.alpha"] = torch.tensor(reference_scale * size * block_rank, dtype=torch.float32)
    return out


def kohya_metadata(config: dict[str, Any], base_model: str, kohya: dict[str, torch.Tensor]) -> dict[str, str]:
    # sd-scripts' own keys, which ComfyUI/A1111 show. Deliberately NOT diffusers'
    # "lora_adapter_metadata": diffusers would apply that alpha on top of the kohya alpha it
    # already folds into the weights when loading this file.
    ranks = {k.removesuffix(".lora_down.weight"): t.shape[0] for k, t in kohya.items() if k.endswith(".lora_down.weight")}
    widest = max(ranks, key=lambda name: (ranks[name], name))  # one number for the file: the largest rank
    return {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
            "ss_network_dim": str(ranks[widest]), "ss_network_alpha": f"{kohya[f'{widest}.alpha'].item():g}",
            "ss_sd_model_name": base_model,
            "impressionist_layer_ranks": json.dumps({str(r): n for r, n in sorted(Counter(ranks.values()).items())}),
            "impressionist_trained_rank": str(config.get("r")),
            "impressionist_trained_alpha": str(config.get("lora_alpha")),
            "impressionist_converted_from": f"diffusers-format {LORA_WEIGHTS} (impressionist export)"}


def scale_one_lora(modules: dict[str, tuple], config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """The diffusers-format LoRA with each module's scale (alpha / r) baked into ``lora_B`` and the
    adapter config rewritten to scale 1 (alpha = r per module, no rsLoRA): the same update
    ``scale * B @ A`` in readers that apply the metadata's alpha (diffusers, peft) and in those that
    ignore ``lora_adapter_metadata`` and apply scale 1 (ComfyUI)."""
    layers: dict[str, torch.Tensor] = {}
    rank = config.get("r")
    alpha_pattern = {}
    for module, (down, up, scale) in sorted(modules.items()):
        layers[f"{module}.lora_A.weight"] = down.contiguous()
        layers[f"{module}.lora_B.weight"] = (up * scale).contiguous()
        if down.shape[0] != rank:
            alpha_pattern[module] = down.shape[0]
    return layers, {**config, "lora_alpha": rank, "alpha_pattern": alpha_pattern, "use_rslora": False}


def file_bytes(path: Path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def fuse_into_transformer(model: ModelParams, lora_dir: Path, lora_scale: float, out_dir: Path) -> None:
    """Merge the LoRA into the base transformer (``fuse_lora``) and save the transformer alone."""
    device = resolve_device(model)
    folder = resolve_pretrained(model.pretrained, model.revision)
    # Only the transformer is fused: the text encoders and VAE are not loaded at all.
    pipe = load_pipeline(folder, resolve_dtype(model), text_encoder=None, text_encoder_2=None,
                         tokenizer=None, tokenizer_2=None, vae=None)
    pipe.transformer.to(device)
    with without_third_party_noise():
        pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHTS, adapter_name="impressionist")
    pipe.fuse_lora(components=["transformer"], lora_scale=float(lora_scale), safe_fusing=True)
    pipe.unload_lora_weights()  # drops the LoRA layers; the fused weights stay
    pipe.transformer.save_pretrained(str(out_dir))


def run(params: Mapping[str, Any], lora_dir: Path = LORA_DIR, out_dir: Path = EXPORT_DIR) -> dict[str, Any]:
    from safetensors.torch import save_file

    cfg, model = ExportParams.check(params), ModelParams.check(params)
    lora_dir, out_dir = Path(lora_dir), Path(out_dir)
    state_dict, config = read_lora(lora_dir)

    from diffusers import FluxPipeline

    modules = module_scales(state_dict, config)
    kohya = kohya_state_dict(modules)
    # The factors in export.dtype (computed in fp32 first); the alphas stay exact fp32 scalars.
    kohya = {k: t if k.endswith(".alpha") else t.to(DTYPES[cfg.dtype]) for k, t in kohya.items()}
    top_level = sorted({k.split(".")[0] for k in kohya} & {f"lora_unet_{n}" for n in TOP_LEVEL.values()})
    final_layer = [name for name in top_level if name.removeprefix("lora_unet_") in SCALE_IN_WEIGHTS]
    manifest: dict[str, Any] = {
        "source": LORA_WEIGHTS, "base_model": model.pretrained, "kohya_file": KOHYA_FILE,
        # the diffusers-format file with alpha/r baked into lora_B (scale 1): what publish uploads
        "diffusers_file": LORA_WEIGHTS, "diffusers_file_scale": 1.0,
        "kohya_layers": sum(k.endswith(".alpha") for k in kohya), "rank": config.get("r"),
        "alpha": config.get("lora_alpha"), "dtype": cfg.dtype, "fused": None,
        "diffusers_kohya_reader_skips": top_level,
        # sd-scripts' create_network_from_weights builds modules only inside the double/single blocks:
        # its strict loader refuses these keys, its merge and resume drop them.
        "sd_scripts_skips": top_level}
    with atomic_dir(out_dir) as tmp:
        save_file(kohya, str(tmp / KOHYA_FILE), metadata=kohya_metadata(config, model.pretrained, kohya))
        layers, scale_one = scale_one_lora(modules, config)
        FluxPipeline.save_lora_weights(tmp, transformer_lora_layers=layers,
                                       transformer_lora_adapter_metadata=scale_one)
        sizes = {"diffusers_lora": file_bytes(tmp / LORA_WEIGHTS), "kohya_lora": file_bytes(tmp / KOHYA_FILE)}
        if cfg.fused:
            fuse_into_transformer(model, lora_dir, cfg.lora_scale, tmp / FUSED_DIR)
            manifest["fused"] = {"folder": FUSED_DIR, "lora_scale": float(cfg.lora_scale)}
            sizes["fused_transformer"] = file_bytes(tmp / FUSED_DIR)
        manifest["size_bytes"] = sizes
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1))
    fused = f", fused transformer (LoRA x{cfg.lora_scale:g}) -> {out_dir / FUSED_DIR}" if cfg.fused else ""
    print(f"export: kohya/ComfyUI LoRA ({manifest['kohya_layers']} layers, {cfg.dtype}, "
          f"{sizes['kohya_lora'] / 2**20:.2f} MiB; diffusers file {sizes['diffusers_lora'] / 2**20:.2f} MiB) "
          f"-> {out_dir / KOHYA_FILE}{fused}")
    if top_level:
        # diffusers' kohya converter names these without the "transformer." prefix, so its loader
        # skips them; ComfyUI reads them. diffusers users load the diffusers-format file instead.
        what = " (the final layer, e.g. lora.targets: all-linear's top-level proj_out)" if final_layer else ""
        print(f"export: warning: diffusers' kohya loader drops {', '.join(top_level)}{what}; ComfyUI reads "
              f"them, in diffusers load {LORA_WEIGHTS} (all layers)", file=sys.stderr)
        print(f"export: warning: kohya sd-scripts builds no module for {', '.join(top_level)}: its strict "
              "loader (flux_minimal_inference.py) refuses the file and its merge/resume drop these layers; "
              "lora.targets: all-linear-blocks trains a LoRA every client loads whole", file=sys.stderr)
    return manifest


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--lora-dir", default=str(LORA_DIR))
    parser.add_argument("--out", default=str(EXPORT_DIR))
    args = parser.parse_args(argv)
    run(load_params(args.params), Path(args.lora_dir), Path(args.out))


if __name__ == "__main__":
    main()
