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
from impressionist.lora import LoraParams, lora_config

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
