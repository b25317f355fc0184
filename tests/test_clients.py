"""The exported LoRA read by the clients users load a FLUX LoRA with, through their own code:
kohya sd-scripts' ``create_network_from_weights`` (networks/lora_flux.py) on its own FLUX model
(real BFL block names ``double_blocks``/``single_blocks``), loaded ``strict=True`` as
``flux_minimal_inference.py`` does.

sd-scripts is not a package: its source comes from ``$IMPRESSIONIST_SD_SCRIPTS`` (a checkout) or the
bare mirror at ``/work/.mirror/kohya-ss+sd-scripts/repo``; the test skips when neither exists or
``einops`` (its dependency) is missing. ``cv2`` is stubbed: sd-scripts' library/utils imports it for
image resizing only."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from impressionist import export
from impressionist.lora import lora_config
from impressionist.params.training import LoraParams

SD_SCRIPTS_MIRROR = Path("/work/.mirror/kohya-ss+sd-scripts/repo")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd_scripts(tmp_path_factory):
    pytest.importorskip("einops")
    source = os.environ.get("IMPRESSIONIST_SD_SCRIPTS")
    if source:
        folder = Path(source)
    elif SD_SCRIPTS_MIRROR.is_dir():
        folder = tmp_path_factory.mktemp("sd-scripts")
        archive = subprocess.run(["git", "--git-dir", str(SD_SCRIPTS_MIRROR), "archive", "HEAD", "networks/lora_flux.py",
                                  "library"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    else:
        pytest.skip("no kohya sd-scripts source (set IMPRESSIONIST_SD_SCRIPTS to a checkout)")
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    sys.path.insert(0, str(folder))
    try:
        from library import flux_models
        from networks import lora_flux
    finally:
        sys.path.remove(str(folder))
    return flux_models, lora_flux


def flux_pair(flux_models, depth=2, single=2, heads=2, head_dim=16, text_dim=32):
    """A diffusers FluxTransformer2DModel and sd-scripts' own (BFL-layout) Flux of the same sizes."""
    from diffusers import FluxTransformer2DModel

    axes = (4, 6, 6)
    diffusers_model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=depth, num_single_layers=single, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=text_dim, pooled_projection_dim=text_dim,
        guidance_embeds=True, axes_dims_rope=axes)
    bfl = flux_models.Flux(flux_models.FluxParams(
        in_channels=64, vec_in_dim=text_dim, context_in_dim=text_dim, hidden_size=heads * head_dim, mlp_ratio=4.0,
        num_heads=heads, depth=depth, depth_single_blocks=single, axes_dim=list(axes), theta=10_000,
        qkv_bias=True, guidance_embed=True))
    return diffusers_model, bfl


def kohya_export(transformer, targets):
    """The kohya tensors the export stage writes for a random (non-zero) LoRA on ``targets``."""
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    transformer.add_adapter(lora_config(LoraParams(rank=4, alpha=2, targets=targets), transformer))
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    state = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(transformer).items()}
    return export.kohya_state_dict(export.module_scales(state, {"r": 4, "lora_alpha": 2}))


def sd_scripts_load(lora_flux, bfl, kohya):
    """As flux_minimal_inference.py: build from the weights, apply to the model, load strictly."""
    network, weights = lora_flux.create_network_from_weights(1.0, None, None, [None, None], bfl, dict(kohya), True)
    network.apply_to([None, None], bfl)
    return network, network.load_state_dict(weights, strict=True)


def test_default_targets_load_whole_in_sd_scripts(sd_scripts):
    """params.yaml's lora.targets: every key of its export is a module sd-scripts builds (strict load),
    and it covers every Linear sd-scripts builds in the blocks (nothing of the blocks left out)."""
    flux_models, lora_flux = sd_scripts
    targets = yaml.safe_load((ROOT / "params.yaml").read_text())["lora"]["targets"]
    transformer, bfl = flux_pair(flux_models)
    kohya = kohya_export(transformer, targets)
    network, result = sd_scripts_load(lora_flux, bfl, kohya)
    assert not result.missing_keys and not result.unexpected_keys
    built = {lora.lora_name for lora in network.unet_loras}
    assert built == {k.split(".")[0] for k in kohya}
    # every Linear inside sd-scripts' double/single blocks is adapted (the default is "all-linear" there)
    block_linears = {("lora_unet_" + f"{name}.{child}").replace(".", "_")
                     for name, module in bfl.named_modules()
                     if type(module).__name__ in ("DoubleStreamBlock", "SingleStreamBlock")
                     for child, sub in module.named_modules() if isinstance(sub, torch.nn.Linear)}
    assert built == block_linears and "lora_unet_single_blocks_1_linear2" in built


def test_final_layer_is_refused_by_sd_scripts(sd_scripts, tmp_path, capsys):
    """``all-linear`` (the final layer too): sd-scripts' strict load raises on exactly the final-layer keys,
    and the export stage warns and lists them in export.json."""
    flux_models, lora_flux = sd_scripts
    transformer, bfl = flux_pair(flux_models)
    kohya = kohya_export(transformer, "all-linear")
    with pytest.raises(RuntimeError, match="Unexpected key") as error:
        sd_scripts_load(lora_flux, bfl, kohya)
    assert "final_layer_linear" in str(error.value)
    top = sorted({k.split(".")[0] for k in kohya if not k.startswith(("lora_unet_double", "lora_unet_single"))})
    assert top == ["lora_unet_final_layer_linear"]


# --- ComfyUI: its own key map and LoRA loader, scale 1, the file's metadata ignored -----------------

COMFYUI_MIRROR = Path("/work/.mirror/Comfy-Org+ComfyUI/repo")


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    """ComfyUI's comfy package (``$IMPRESSIONIST_COMFYUI`` or the bare mirror's .py files), on the CPU."""
    source = os.environ.get("IMPRESSIONIST_COMFYUI")
    if source:
        folder = Path(source)
    elif COMFYUI_MIRROR.is_dir():
        folder = tmp_path_factory.mktemp("comfyui")
        git = ["git", "--git-dir", str(COMFYUI_MIRROR)]
        names = subprocess.run([*git, "ls-tree", "-r", "--name-only", "HEAD", "comfy", "comfy_api", "utils"],
                               check=True, capture_output=True, text=True).stdout.split()
        for name in (n for n in names if n.endswith(".py")):
            shown = subprocess.run([*git, "show", f"HEAD:{name}"], capture_output=True)
            if shown.returncode == 0:  # the mirror lacks a few large blobs (not Python sources)
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(shown.stdout)
    else:
        pytest.skip("no ComfyUI source (set IMPRESSIONIST_COMFYUI to a checkout)")
    sys.path.insert(0, str(folder))
    argv = sys.argv
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        sys.argv = ["comfyui", "--cpu"]
        import comfy.lora
        import comfy.utils
    finally:
        sys.argv = argv
        sys.path.remove(str(folder))
    return comfy


def comfyui_deltas(comfy, lora_file: Path, transformer) -> dict[str, torch.Tensor]:
    """``diffusers module -> weight change`` as ComfyUI merges the file at strength 1: the key map
    of ``model_lora_keys_unet``'s Flux branch (``flux_to_diffusers`` + the ``transformer.`` prefix),
    ``comfy.lora.load_lora``, then ``comfy.lora.calculate_weight`` on zero BFL weights."""
    from safetensors.torch import load_file

    config = transformer.config
    unet_config = {"depth": config.num_layers, "depth_single_blocks": config.num_single_layers,
                   "hidden_size": config.num_attention_heads * config.attention_head_dim}
    key_map = {f"transformer.{k.removesuffix('.weight')}": to
               for k, to in comfy.utils.flux_to_diffusers(unet_config, output_prefix="diffusion_model.").items()
               if k.endswith(".weight")}
    lora = load_file(str(lora_file))  # tensors only: ComfyUI never reads lora_adapter_metadata
    patch_dict = comfy.lora.load_lora(lora, key_map, log_missing=False)
    loaded = {k for k in lora}
    modules = dict(transformer.named_modules())
    deltas = {}
    for diffusers_key, target in key_map.items():
        if target not in patch_dict:
            continue
        key, offset = (target, None) if isinstance(target, str) else target
        linear = modules[diffusers_key.removeprefix("transformer.")]
        # the fused BFL layer is only needed up to this member's rows (offset: dim, start, size)
        rows = linear.out_features if offset is None else offset[1] + offset[2]
        weight = torch.zeros(rows, linear.in_features)
        merged = comfy.lora.calculate_weight([(1.0, patch_dict[target], 1.0, offset, None)], weight, key)
        deltas[diffusers_key.removeprefix("transformer.")] = (
            merged if offset is None else merged.narrow(offset[0], offset[1], offset[2]))
    assert len(deltas) * 2 == len(loaded), "ComfyUI left keys of the file unloaded"
    return deltas


def diffusers_deltas(tiny_flux_dir, lora_dir: Path) -> dict[str, torch.Tensor]:
    """``module -> weight change`` of diffusers' own ``load_lora_weights`` + ``fuse_lora`` (scale 1)."""
    from impressionist.models import load_pipeline

    pipe = load_pipeline(tiny_flux_dir, torch.float32)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(lora_dir), weight_name=export.LORA_WEIGHTS)
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()
    after = pipe.transformer.state_dict()
    return {k.removesuffix(".weight"): after[k] - before[k] for k in before
            if k.endswith(".weight") and not torch.equal(after[k], before[k])}


@pytest.fixture(scope="module")
def alpha_not_rank_export(tmp_path_factory, tiny_flux_dir, _demo_params_master):
    """A random rank-4, alpha-2 LoRA (scale 0.5) on params.yaml's default targets, and its export."""
    import copy

    from diffusers import FluxPipeline
    from diffusers.training_utils import _collate_lora_metadata
    from peft.utils import get_peft_model_state_dict

    from impressionist.models import load_transformer

    targets = yaml.safe_load((ROOT / "params.yaml").read_text())["lora"]["targets"]
    torch.manual_seed(0)
    transformer = load_transformer(tiny_flux_dir, torch.float32)
    transformer.add_adapter(lora_config(LoraParams(rank=4, alpha=2, targets=targets), transformer))
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    root = tmp_path_factory.mktemp("alpha-not-rank")
    FluxPipeline.save_lora_weights(root / "lora", transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   **_collate_lora_metadata({"transformer": transformer}))
    export.run(copy.deepcopy(_demo_params_master), root / "lora", root / "export")
    return root / "lora", root / "export", transformer


def test_comfyui_reads_the_exported_diffusers_file_at_the_trained_strength(comfyui, tiny_flux_dir,
                                                                            alpha_not_rank_export):
    """ComfyUI (scale 1, no metadata) merges the exported diffusers-format file into the same weights as
    diffusers' fuse_lora does with the metadata; the trained file (alpha != rank) it would merge at
    r/alpha = 2x strength, which is what the export's baking fixes."""
    lora_dir, export_dir, transformer = alpha_not_rank_export
    expected = diffusers_deltas(tiny_flux_dir, lora_dir)
    assert expected and any("single_transformer_blocks" in k for k in expected)
    assert diffusers_deltas(tiny_flux_dir, export_dir).keys() == expected.keys()
    for path, factor in ((export_dir / export.LORA_WEIGHTS, 1.0), (lora_dir / export.LORA_WEIGHTS, 2.0)):
        got = comfyui_deltas(comfyui, path, transformer)
        assert got.keys() == expected.keys()
        for module, delta in expected.items():
            torch.testing.assert_close(got[module], factor * delta, rtol=1e-4, atol=1e-5)
    # diffusers reads the baked file (with its alpha = r metadata) at the same strength as the trained one
    for module, delta in diffusers_deltas(tiny_flux_dir, export_dir).items():
        torch.testing.assert_close(delta, expected[module], rtol=1e-4, atol=1e-5)
