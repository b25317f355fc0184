"""Shared inference settings on the tiny model: a fused LoRA draws what the adapter draws, at any
scale and repeatedly; the base model is one switch away; what this machine cannot run is refused
with one line before any model loads; the sample stage and the app take the same settings."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import train_tiny_lora

from impressionist import inference, sample
from impressionist.errors import UserError
from impressionist.params.evaluation import SampleParams
from impressionist.params.inference import InferenceSettings

PROMPT = "impr3ssionism, a harbor at sunset"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, _demo_params_master, encoded_cache):
    return train_tiny_lora(tmp_path_factory.mktemp("inference-lora"), _demo_params_master, encoded_cache,
                           lora=dict(rank=4, alpha=8))


def draw(pipe, seed=0):
    return pipe(PROMPT, height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]


def build(tiny_flux_dir, lora, **settings):
    return inference.build_pipeline(tiny_flux_dir, torch.float32, CPU, InferenceSettings(**settings), lora=str(lora))


def test_fused_lora_draws_what_the_adapter_draws(tiny_flux_dir, trained_lora):
    adapter = build(tiny_flux_dir, trained_lora)
    fused = build(tiny_flux_dir, trained_lora, lora_mode="fused")
    with inference.lora_removed(adapter, InferenceSettings()):
        base = draw(adapter)
    from peft.tuners.tuners_utils import BaseTunerLayer

    settings = InferenceSettings(lora_mode="fused")
    lora_layers = [m for m in fused.transformer.modules() if isinstance(m, BaseTunerLayer)]
    for scale in (1.0, 0.5, 1.5):  # one after the other: a fuse is fully undone before the next
        with inference.lora_applied(fused, settings, scale):
            assert all(layer.merged for layer in lora_layers)
            from_fused = draw(fused)
        assert not any(layer.merged for layer in lora_layers)
        with inference.lora_applied(adapter, InferenceSettings(), scale):
            from_adapter = draw(adapter)
        assert np.abs(from_adapter - base).max() > 0.005  # the LoRA matters (50x the tolerance below)
        np.testing.assert_allclose(from_fused, from_adapter, atol=1e-4)
    with inference.lora_removed(fused, settings):  # unfused again: the base model
        np.testing.assert_allclose(draw(fused), base, atol=1e-5)
    # merged layers skip their own LoRA matmuls: while fused, no lora_A runs
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for n, m in fused.transformer.named_modules()
             if n.endswith("lora_A.impressionist")]
    with inference.lora_applied(fused, InferenceSettings(lora_mode="fused"), 1.0):
        draw(fused)
    assert hooks and not calls
    with inference.lora_applied(adapter, InferenceSettings(), 1.0):
        hooks += [m.register_forward_hook(lambda *_: calls.append(1)) for n, m in adapter.transformer.named_modules()
                  if n.endswith("lora_A.impressionist")]
        draw(adapter)
    assert calls  # ... while the adapter's do


@pytest.mark.parametrize("settings, message", [
    (dict(quantization="nf4"), "quantization=nf4 needs a CUDA GPU"),
    (dict(quantization="fp8"), "quantization=fp8 needs a CUDA GPU"),
    (dict(offload="model"), "offload=model moves weights between a GPU and the CPU"),
    (dict(compile=True, offload="sequential"), "cannot compile layers that sequential offload moves"),
])
def test_what_the_cpu_cannot_run_is_refused(settings, message):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusals are for machines without one")
    with pytest.raises(UserError, match=message):
        inference.check(InferenceSettings(**settings), CPU, "sample", torch.bfloat16)


@pytest.mark.parametrize("key, value, message", [
    ("lora_mode", "merged", "sample.lora_mode"), ("quantization", "int4", "sample.quantization"),
    ("offload", "disk", "sample.offload"), ("compile", "yes", "sample.compile=.yes. must be true or false")])
def test_bad_values_name_the_setting(demo_params, key, value, message):
    demo_params["sample"][key] = value
    with pytest.raises(UserError, match=message):
        SampleParams.check(demo_params)


def test_sample_stage_refuses_before_loading_and_draws_fused(demo_params, trained_lora, tmp_path, monkeypatch):
    import pandas as pd
    from PIL import Image

    params = copy.deepcopy(demo_params)
    params["sample"].update(prompts=["a harbor at sunset"], val_captions=0, seeds=[0], steps=2, resolution=32,
                            max_sequence_length=16, lora_scales=[0.5, 1.0])
    if not torch.cuda.is_available():
        refused = copy.deepcopy(params)
        refused["sample"]["quantization"] = "nf4"
        with pytest.raises(UserError, match="sample.quantization=nf4 needs a CUDA GPU"):
            sample.run_base(refused, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
    sample.run_base(params, tmp_path / "base")
    images = {}
    for mode in ("adapter", "fused"):
        params["sample"]["lora_mode"] = mode
        sample.run_lora(params, trained_lora, tmp_path / "base", tmp_path / mode, tmp_path / f"{mode}.png")
        table = pd.read_csv(tmp_path / mode / "samples.csv")
        images[mode] = [np.asarray(Image.open(tmp_path / mode / f), dtype=np.int16) for f in table["file"]]
    assert len(images["fused"]) == 2
    for fused, adapter in zip(images["fused"], images["adapter"]):
        assert np.abs(fused - adapter).max() <= 1  # the same picture, up to 8-bit rounding
