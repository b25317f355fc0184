"""Export: the kohya/ComfyUI file (bf16 by default, half the size of float32) loads back through
diffusers' own kohya loader to the same LoRA, its metadata states the ranks in the file, a final-layer
LoRA is warned about, and the fused transformer draws the same images as the LoRA it was fused from."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import train_tiny_lora

from impressionist import export
from impressionist.errors import UserError
from impressionist.layout import EXPORT_MANIFEST

# diffusers' kohya loader hard-codes FLUX.1-dev's single-block sizes (3 x 3072 + 12288 rows in
# `linear1`), so a single-block LoRA of the tiny model cannot go through it; the image round trip
# uses every double-block layer, and the single-block layout is checked at FLUX.1-dev's real
# shapes in test_forward_mapping_at_flux_dev_shapes.
DOUBLE_BLOCK_TARGETS = ["attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                        "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                        "ff_context.net.2", "norm1.linear", "norm1_context.linear"]


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, _demo_params_master, encoded_cache):
    """A LoRA from the real trainer, with alpha != rank (scale 2) and a learning rate high enough
    that it visibly changes the tiny model's images."""
    return train_tiny_lora(tmp_path_factory.mktemp("export-lora"), _demo_params_master, encoded_cache,
                           lora=dict(rank=4, alpha=8, targets=DOUBLE_BLOCK_TARGETS))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, _demo_params_master, trained_lora):
    params = copy.deepcopy(_demo_params_master)
    params["export"] = {"fused": True, "lora_scale": 0.7}
    out = tmp_path_factory.mktemp("export") / "export"
    export.run(params, trained_lora, out)
    return out


@pytest.fixture(scope="module")
def exported_fp32(tmp_path_factory, _demo_params_master, trained_lora):
    params = copy.deepcopy(_demo_params_master)
    params["export"] = {"dtype": "float32"}
    out = tmp_path_factory.mktemp("export32") / "export"
    export.run(params, trained_lora, out)
    return out


def draw(pipe, seed=0):
    return pipe("impr3ssionism, a harbor at sunset", height=32, width=32, num_inference_steps=2,
                max_sequence_length=16, generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np").images[0]


def test_kohya_file_layout(exported, trained_lora):
    tensors = load_file(exported / export.KOHYA_FILE)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    layers = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert "lora_unet_double_blocks_0_txt_attn_qkv" in layers  # add_q/k/v fused into one layer
    assert "lora_unet_double_blocks_0_img_attn_proj" in layers
    assert all(f"{layer}.alpha" in tensors and f"{layer}.lora_up.weight" in tensors for layer in layers)
    # alpha keeps peft's scale alpha/r = 8/4: rank 4 for one layer, 3 x 4 for the fused q/k/v.
    assert tensors["lora_unet_double_blocks_0_img_attn_proj.alpha"].item() == 8
    assert tensors["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"].shape[0] == 12
    assert tensors["lora_unet_double_blocks_0_txt_attn_qkv.alpha"].item() == 24
    # bf16 factors (the ecosystem's LoRA dtype); the alphas stay exact fp32 scalars
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} == {torch.float32}
    with safe_open(str(exported / export.KOHYA_FILE), "pt") as f:
        metadata = f.metadata()
    # the file's largest rank is the fused txt q/k/v layer's 3 x 4, with its alpha; every rank counted
    assert metadata["ss_network_dim"] == "12" and metadata["ss_network_alpha"] == "24"
    ranks = {k.rsplit(".", 2)[0]: t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight")}
    assert json.loads(metadata["impressionist_layer_ranks"]) == {"4": len(layers) - 1, "12": 1}
    assert sorted(set(ranks.values())) == [4, 12]
    assert metadata["impressionist_trained_rank"] == "4" and metadata["impressionist_trained_alpha"] == "8"
    assert "lora_adapter_metadata" not in metadata  # diffusers would apply alpha a second time
    manifest = json.loads((exported / EXPORT_MANIFEST).read_text())
    assert manifest["kohya_file"] == export.KOHYA_FILE and manifest["kohya_layers"] == len(layers)
    assert manifest["fused"] == {"folder": export.FUSED_DIR, "lora_scale": 0.7}
    assert manifest["dtype"] == "bfloat16" and manifest["diffusers_kohya_reader_skips"] == []
    sizes = manifest["size_bytes"]
    assert sizes["kohya_lora"] == (exported / export.KOHYA_FILE).stat().st_size
    assert sizes["diffusers_lora"] == (exported / export.LORA_WEIGHTS).stat().st_size
    assert manifest["diffusers_file"] == export.LORA_WEIGHTS and manifest["diffusers_file_scale"] == 1.0
    assert sizes["fused_transformer"] == sum(p.stat().st_size for p in (exported / export.FUSED_DIR).rglob("*")
                                             if p.is_file())


def tensor_bytes(path) -> int:
    """A safetensors file's size without its JSON header (8 bytes of length, then the header):
    the tiny test LoRA's header is a large share of its file, a real LoRA's is not."""
    with open(path, "rb") as f:
        return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


def test_bf16_file_is_half_the_float32_file(exported, exported_fp32):
    bf16, fp32 = ((d / export.KOHYA_FILE).stat().st_size for d in (exported, exported_fp32))
    assert bf16 < fp32
    ratio = tensor_bytes(exported / export.KOHYA_FILE) / tensor_bytes(exported_fp32 / export.KOHYA_FILE)
    assert 0.49 < ratio < 0.52  # 2 bytes a weight instead of 4; the fp32 alphas are 4 bytes a layer
    assert json.loads((exported_fp32 / EXPORT_MANIFEST).read_text())["size_bytes"]["kohya_lora"] == fp32


def test_kohya_file_draws_the_same_images_as_the_diffusers_file(tiny_flux_dir, trained_lora, exported,
                                                                exported_fp32):
    from impressionist.models import load_pipeline

    pipe = load_pipeline(tiny_flux_dir, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base = draw(pipe)
    pipe.load_lora_weights(str(trained_lora), adapter_name="diffusers")
    pipe.load_lora_weights(str(exported / export.KOHYA_FILE), adapter_name="kohya")
    pipe.load_lora_weights(str(exported_fp32 / export.KOHYA_FILE), adapter_name="kohya32")
    pipe.set_adapters("diffusers")
    from_diffusers = draw(pipe)
    pipe.set_adapters("kohya32")
    from_kohya32 = draw(pipe)
    pipe.set_adapters("kohya")
    from_kohya = draw(pipe)
    assert np.abs(from_diffusers - base).max() > 0.02  # the LoRA matters ...
    np.testing.assert_allclose(from_kohya32, from_diffusers, atol=1e-5)  # ... and survives export exactly,
    # and in bf16 within bf16's rounding (8 mantissa bits: ~0.4% of each factor), far below the LoRA's effect
    difference = np.abs(from_kohya - from_diffusers).max()
    assert difference < 1e-2 and difference < np.abs(from_diffusers - base).max() / 5


def test_fused_transformer_draws_the_same_images_as_the_lora(tiny_flux_dir, trained_lora, exported):
    from diffusers import FluxTransformer2DModel

    from impressionist.models import load_pipeline

    fused = FluxTransformer2DModel.from_pretrained(exported / export.FUSED_DIR, dtype=torch.float32)
    fused_pipe = load_pipeline(tiny_flux_dir, torch.float32, transformer=fused)
    assert not any("lora" in name for name, _ in fused_pipe.transformer.named_parameters())
    pipe = load_pipeline(tiny_flux_dir, torch.float32)
    for p in (pipe, fused_pipe):
        p.set_progress_bar_config(disable=True)
    base = draw(pipe, seed=3)
    pipe.load_lora_weights(str(trained_lora), adapter_name="lora")
    pipe.set_adapters("lora", adapter_weights=0.7)
    unfused = draw(pipe, seed=3)
    assert np.abs(unfused - base).max() > 0.02
    np.testing.assert_allclose(draw(fused_pipe, seed=3), unfused, atol=1e-4)


def random_lora(shapes: dict[str, tuple[int, int]], ranks: dict[str, int], seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module, (fan_in, fan_out) in shapes.items():
        r = ranks.get(module, 2)
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(r, fan_in, generator=g)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(fan_out, r, generator=g)
    return state


def test_forward_mapping_at_flux_dev_shapes():
    """Every mapped layer at FLUX.1-dev's real sizes, with mixed ranks, an alpha pattern and
    rsLoRA, comes back from diffusers' kohya converter with the same update ``scale * B @ A``."""
    from diffusers import FluxPipeline

    dim, mlp = 3072, 12288
    shapes = {
        "transformer_blocks.0.attn.to_q": (dim, dim), "transformer_blocks.0.attn.to_k": (dim, dim),
        "transformer_blocks.0.attn.to_v": (dim, dim), "transformer_blocks.0.attn.to_out.0": (dim, dim),
        "transformer_blocks.0.attn.add_q_proj": (dim, dim), "transformer_blocks.0.attn.add_v_proj": (dim, dim),
        "transformer_blocks.0.attn.to_add_out": (dim, dim), "transformer_blocks.0.ff.net.0.proj": (dim, mlp),
        "transformer_blocks.0.ff_context.net.2": (mlp, dim), "transformer_blocks.0.norm1.linear": (dim, 6 * dim),
        "single_transformer_blocks.37.attn.to_q": (dim, dim), "single_transformer_blocks.37.attn.to_k": (dim, dim),
        "single_transformer_blocks.37.attn.to_v": (dim, dim),  # no proj_mlp: "attention" preset
        "single_transformer_blocks.37.proj_out": (dim + mlp, dim),
        "single_transformer_blocks.37.norm.linear": (dim, 3 * dim),
        "proj_out": (dim, 64), "norm_out.linear": (dim, 2 * dim),
    }
    state = random_lora(shapes, ranks={"transformer_blocks.0.attn.add_v_proj": 3})
    for use_rslora in (False, True):
        config = {"r": 2, "lora_alpha": 3, "use_rslora": use_rslora,
                  "alpha_pattern": {"transformer_blocks.0.attn.to_k": 5}}
        modules = export.module_scales(state, config)
        assert modules["transformer_blocks.0.attn.to_k"][2] == (5 / math.sqrt(2) if use_rslora else 2.5)
        kohya = export.kohya_state_dict(modules)
        assert kohya["lora_unet_single_blocks_37_linear1.lora_up.weight"].shape == (3 * dim + mlp, 8)
        back = FluxPipeline.lora_state_dict(dict(kohya))
        g = torch.Generator().manual_seed(1)
        for module, (down, up, scale) in modules.items():
            # diffusers leaves the final-layer keys without the "transformer." prefix
            key = next(k for k in (f"transformer.{module}", module) if f"{k}.lora_A.weight" in back)
            probe = torch.randn(down.shape[1], 3, generator=g)
            expected = scale * up @ (down @ probe)
            got = back[f"{key}.lora_B.weight"] @ (back[f"{key}.lora_A.weight"] @ probe)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
        # the zero-padded MLP part of linear1 carries no update
        assert not back["transformer.single_transformer_blocks.37.proj_mlp.lora_B.weight"].any()


def test_refusals(demo_params, trained_lora, tmp_path, capsys):
    out = tmp_path / "export"
    with pytest.raises(UserError, match="no LoRA"):
        export.run(demo_params, tmp_path / "missing", out)
    demo_params["export"] = {"fused": "yes"}
    with pytest.raises(UserError, match="export.fused"):
        export.run(demo_params, trained_lora, out)
    state = random_lora({"transformer_blocks.0.attn.to_q": (8, 8)}, {})
    with pytest.raises(UserError, match="DoRA"):
        export.module_scales(state, {"lora_alpha": 2, "use_dora": True})
    with pytest.raises(UserError, match="no counterpart"):
        export.kohya_state_dict(export.module_scales(
            random_lora({"transformer_blocks.0.attn.norm_q": (8, 8)}, {}), {"lora_alpha": 2}))
    with pytest.raises(UserError, match="unexpected tensor"):
        export.module_scales({"text_encoder.x.lora_A.weight": torch.zeros(1)}, {"lora_alpha": 2})
    assert not out.exists()

    # The command line turns the refusal into one line and exit code 2.
    (tmp_path / "params.yaml").write_text("model: {pretrained: builtin:tiny-flux}\n")
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--params", str(tmp_path / "params.yaml"), "--lora-dir", str(tmp_path / "none"),
                     "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no LoRA") and "\n" not in err


def test_final_layer_is_exported_with_a_warning(tmp_path, _demo_params_master, encoded_cache, tiny_flux_dir,
                                                capsys):
    """A LoRA on the final layer (as `all-linear`'s top-level proj_out): ComfyUI reads it, diffusers'
    kohya reader drops it. The stage says so on stderr and export.json lists it; the claim is checked
    against diffusers itself."""
    from diffusers import FluxPipeline

    lora_dir = train_tiny_lora(tmp_path, _demo_params_master, encoded_cache, steps=2,
                               lora=dict(rank=2, alpha=2, targets=["attn.to_out.0", "norm_out.linear"]))
    capsys.readouterr()
    manifest = export.run(copy.deepcopy(_demo_params_master), lora_dir, tmp_path / "export")
    err = capsys.readouterr().err
    assert "warning: diffusers' kohya loader drops lora_unet_final_layer_adaLN_modulation_1" in err
    assert manifest["diffusers_kohya_reader_skips"] == ["lora_unet_final_layer_adaLN_modulation_1"]
    assert manifest["sd_scripts_skips"] == ["lora_unet_final_layer_adaLN_modulation_1"]
    assert "warning: kohya sd-scripts builds no module for lora_unet_final_layer_adaLN_modulation_1" in err
    tensors = load_file(tmp_path / "export" / export.KOHYA_FILE)
    assert "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in tensors  # in the file, for ComfyUI
    back = FluxPipeline.lora_state_dict(str(tmp_path / "export" / export.KOHYA_FILE))
    assert not any(k.startswith("transformer.norm_out") for k in back)  # what diffusers loads lacks it
    assert any(k.startswith("norm_out") for k in back)
