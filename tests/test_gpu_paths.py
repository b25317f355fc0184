"""The GPU-only paths, executed on the CPU with the real libraries: NF4 (bitsandbytes' CPU backend
for 4-bit), fp8 (torchao's conversions), model offload (accelerate's hooks to "cpu:0"), 8-bit AdamW
(bitsandbytes on the CPU), through the project's own functions.

Only the questions "is there a GPU?" are answered yes (:func:`pretend_gpu`): ours
(``models.cuda_capability``), diffusers' bitsandbytes quantizer's and torchao's fp8 hardware
check. Everything after them runs as it would on a GPU, on CPU tensors. Where a call needs CUDA
itself, its arguments are bound to the installed library's signature.
"""

from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import cpu_recipe_params
from safetensors.torch import load_file

from impressionist import inference, models, train
from impressionist.errors import UserError
from impressionist.params.inference import InferenceSettings
from impressionist.params.training import TrainParams

CPU = torch.device("cpu")
LORA_FILE = "pytorch_lora_weights.safetensors"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def pretend_gpu(monkeypatch):
    """The GPU checks say yes (an H100's compute capability 9.0); nothing else is changed but one
    CPU-only fast path of bitsandbytes."""
    import torchao.quantization.quant_api as quant_api
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    for module in (models, train):  # train imported it by name
        monkeypatch.setattr(module, "cuda_capability", lambda device: (9, 0))
    real_validate = BnB4BitDiffusersQuantizer.validate_environment

    def validate_as_on_a_gpu(self, *args, **kwargs):  # its other checks (versions, device map) still run
        with mock.patch.object(torch.cuda, "is_available", return_value=True):
            return real_validate(self, *args, **kwargs)

    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "validate_environment", validate_as_on_a_gpu)
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularities: None)
    # bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel when a layer runs in eval
    # mode on such a CPU (a CPU-only path, never taken on a GPU); the repacking fails on layers
    # narrower than its 64-weight blocks, as the tiny model's are. Off, as on CPUs without it.
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps the first mixed precision a process asks for; these runs ask for bf16."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_recipe(root: Path, cache: Path, **train_changes) -> dict:
    """The committed recipe (bf16, checkpointing, EMA, all-linear) with ``train_changes``, in-process."""
    params = cpu_recipe_params(max_steps=2)
    params["train"]["validation"]["every"] = 2
    if "lora_rank" in train_changes:
        params["lora"]["rank"] = train_changes.pop("lora_rank")
    params["train"].update(train_changes)
    out = dict(lora_dir=root / "lora", checkpoint_dir=root / "ckpt", metrics_path=root / "train.json",
               loss_plot=root / "loss.png", live_dir=root / "live", log_dir=root / "logs")
    summary = train.run(params, cache, **out)
    return {**summary, **out}


def block_linear_names(transformer: torch.nn.Module) -> set[str]:
    return {name for name, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks."))}


def load_bench(name: str):
    import importlib.util

    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ NF4

def test_nf4_makes_the_blocks_4bit_and_keeps_the_embedders_16bit(tiny_flux_dir, pretend_gpu):
    """diffusers' real NF4 load, with the trainer's config: the blocks' Linears (and the output
    projection, which the skip list cannot name alone) are 4-bit, double-quantised, computing in
    bf16; the embedders and norm_out stay out, and are fp32 after the QLoRA preparation. The
    benchmarks' NF4 swap quantises exactly the same modules."""
    import bitsandbytes as bnb

    transformer = models.load_transformer(tiny_flux_dir, torch.bfloat16, "nf4", CPU)
    four_bit = {name for name, m in transformer.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit == block_linear_names(transformer) | {"proj_out"}
    kept = {name for name, m in transformer.named_modules() if type(m) is torch.nn.Linear}
    assert kept and all(name.split(".")[0] in models.NF4_KEPT_16BIT for name in kept)
    assert {name.split(".")[0] for name in kept} == set(models.NF4_KEPT_16BIT)
    assert all(m.weight.quant_state.nested and m.compute_dtype == torch.bfloat16
               for m in transformer.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert all(not p.requires_grad for p in transformer.parameters())
    assert all(p.dtype == torch.float32 for name, p in transformer.named_parameters()
               if name.split(".")[0] in models.NF4_KEPT_16BIT)

    bench = load_bench("bench_train_step")
    assert bench.nf4_quantized_names(transformer) == four_bit
    swapped = models.load_transformer(tiny_flux_dir, torch.bfloat16)
    bench.quantize_nf4(swapped, torch.bfloat16)
    assert {name for name, m in swapped.named_modules() if isinstance(m, bnb.nn.Linear4bit)} == four_bit
    reference = dict(transformer.named_parameters())
    for name, param in swapped.named_parameters():  # the same storage, packed data and absmax alike
        assert param.dtype == reference[name].dtype and param.shape == reference[name].shape, name


def test_nf4_qlora_trains_checkpoints_validates_and_saves(encoded_cache, tmp_path, pretend_gpu,
                                                          fresh_accelerate_state):
    """train.base_quantization=nf4 through the trainer, the recipe's bf16 and checkpointing: the
    LoRA trains on the 4-bit base, validation images are drawn through it, checkpoints and the
    saved LoRA hold fp32 LoRA tensors only."""
    result = run_recipe(tmp_path, encoded_cache, base_quantization="nf4")
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])
    lora = load_file(result["lora_dir"] / LORA_FILE)
    assert lora and all(v.dtype == torch.float32 for v in lora.values())
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)
    assert "transformer.single_transformer_blocks.0.proj_out.lora_A.weight" in lora  # LoRA on a 4-bit layer
    (run,) = result["checkpoint_dir"].iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["step-00000001", "step-00000002"]
    assert (result["live_dir"] / "plots/images/validation_0.png").is_file()


def test_nf4_compile_and_checkpointing_together_are_refused(demo_params):
    demo_params["train"].update(base_quantization="nf4", compile=True, gradient_checkpointing=True)
    with pytest.raises(UserError, match="torch CheckpointError"):
        TrainParams.check(demo_params)
    demo_params["train"]["gradient_checkpointing"] = False  # each alone, or the pair without nf4, is fine
    TrainParams.check(demo_params)


@pytest.fixture(scope="module")
def random_lora(tmp_path_factory, tiny_flux_dir):
    """A rank-4 all-linear LoRA with non-zero random factors (as a trained one), in diffusers format."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    from impressionist.lora import LoraParams, lora_config

    torch.manual_seed(0)
    transformer = models.load_transformer(tiny_flux_dir, torch.float32)
    transformer.add_adapter(lora_config(LoraParams(rank=4, alpha=4, targets="all-linear"), transformer))
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    folder = tmp_path_factory.mktemp("random-lora")
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return str(folder)


def draw(pipe, settings: InferenceSettings, scale: float = 1.0):
    with inference.lora_applied(pipe, settings, scale):
        return pipe("impr3ssionism, a harbor", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]


@pytest.mark.parametrize("lora_mode", ["adapter", "fused"])
def test_nf4_inference_draws_with_the_lora(tiny_flux_dir, random_lora, pretend_gpu, lora_mode):
    """inference.build_pipeline with quantization nf4: the 4-bit transformer (baked: merged in 16
    bit, then quantised), near the 16-bit pipeline's image, and the LoRA changes it."""
    import bitsandbytes as bnb

    settings = InferenceSettings(quantization="nf4", lora_mode=lora_mode)
    inference.check(settings, CPU, "sample", torch.bfloat16)
    pipe = inference.build_pipeline(tiny_flux_dir, torch.bfloat16, CPU, settings, lora=random_lora)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer
                      if lora_mode == "adapter" else pipe.transformer.transformer_blocks[0].attn.to_q, bnb.nn.Linear4bit)
    image = draw(pipe, settings)
    plain = InferenceSettings(lora_mode=lora_mode)
    full = draw(inference.build_pipeline(tiny_flux_dir, torch.bfloat16, CPU, plain, lora=random_lora), plain)
    assert image.shape == (32, 32, 3) and np_finite(image)
    assert abs(image - full).mean() < 0.1  # 4-bit rounding, not another picture
    if lora_mode == "adapter":
        with inference.lora_removed(pipe, settings):
            base = draw(pipe, InferenceSettings(lora_mode="adapter"), 0.0)
        assert abs(image - base).mean() > 1e-3


def np_finite(image) -> bool:
    import numpy as np

    return bool(np.isfinite(image).all())


# ------------------------------------------------------------------------------------------------ fp8

def test_fp8_training_converts_the_blocks_and_trains_the_lora(tiny_flux_dir, encoded_cache, tmp_path, pretend_gpu,
                                                             fresh_accelerate_state, monkeypatch):
    """train.base_quantization=fp8: torchao's convert_to_float8_training (its installed signature)
    swaps exactly the blocks' Linears for Float8Linear, and the trainer trains through them."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    assert {"module_filter_fn", "config"} <= set(inspect.signature(convert_to_float8_training).parameters)
    assert "pad_inner_dim" in inspect.signature(Float8LinearConfig).parameters
    seen = {}
    real_build = train.build_transformer

    def recording_build(*args, **kwargs):
        transformer = real_build(*args, **kwargs)
        for name, m in transformer.named_modules():
            if isinstance(m, torch.nn.Linear) and "lora_" not in name:
                seen[name.removesuffix(".base_layer")] = type(m)
        return transformer

    monkeypatch.setattr(train, "build_transformer", recording_build)
    result = run_recipe(tmp_path, encoded_cache, base_quantization="fp8", gradient_checkpointing=False)
    fp8 = {name for name, kind in seen.items() if kind is Float8Linear}
    assert fp8 == block_linear_names(models.load_transformer(tiny_flux_dir, torch.bfloat16))
    assert {kind for name, kind in seen.items() if name not in fp8} == {torch.nn.Linear}
    lora = load_file(result["lora_dir"] / LORA_FILE)
    assert math.isfinite(result["final_loss"]) and any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)


def test_fp8_inference_quantizes_the_block_weights_and_draws(tiny_flux_dir, random_lora, pretend_gpu):
    """inference quantization fp8: torchao's quantize_ with per-row float8 weights and activations;
    the block weights become fp8 data + fp32 row scales, the LoRA factors stay 16-bit, and it
    draws close to bf16. The benchmark counts those weights by their fp8 bytes."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8Tensor, PerRow, quantize_

    assert {"filter_fn"} <= set(inspect.signature(quantize_).parameters)
    assert "granularity" in inspect.signature(Float8DynamicActivationFloat8WeightConfig).parameters
    assert PerRow  # the import path build_pipeline uses
    settings = InferenceSettings(quantization="fp8")
    inference.check(settings, CPU, "app", torch.bfloat16)
    pipe = inference.build_pipeline(tiny_flux_dir, torch.bfloat16, CPU, settings, lora=random_lora)
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q.base_layer.weight, Float8Tensor) and to_q.base_layer.weight.qdata.dtype == torch.float8_e4m3fn
    assert to_q.lora_A["impressionist"].weight.dtype == torch.bfloat16
    assert not isinstance(pipe.transformer.context_embedder.weight, Float8Tensor)
    image = draw(pipe, settings)
    plain = InferenceSettings()
    full = draw(inference.build_pipeline(tiny_flux_dir, torch.bfloat16, CPU, plain, lora=random_lora), plain)
    assert np_finite(image) and abs(image - full).mean() < 0.1

    bench = load_bench("bench_inference")
    weight = to_q.base_layer.weight
    assert bench.stored_bytes(weight) == weight.qdata.numel() * 1 + weight.scale.numel() * 4
    assert bench.stored_bytes(weight) < weight.untyped_storage().nbytes()  # the wrapper reports bf16 bytes


def test_fp8_inference_in_float16_is_refused_as_torchao_refuses_it(tiny_flux_dir, pretend_gpu):
    """torchao's per-row fp8 needs bf16 weights: the check says so in one line before loading
    (an L4 user with IMPRESSIONIST_DTYPE=float16), as torchao itself would fail after loading."""
    with pytest.raises(UserError, match="quantization=fp8 needs the model in bfloat16") as err:
        inference.check(InferenceSettings(quantization="fp8"), CPU, "app", torch.float16)
    assert "\n" not in str(err.value)
    transformer = models.load_transformer(tiny_flux_dir, torch.float16)
    with pytest.raises(AssertionError, match="only works for bfloat16"):
        inference._quantize_fp8(transformer)


# ------------------------------------------------------------------------------------------------ offload

def test_model_offload_draws_what_the_resident_pipeline_draws(tiny_flux_dir, random_lora):
    """build_pipeline's model offload (after the LoRA loads, instead of .to(device)), run for real
    with the CPU as the execution device: accelerate's hooks are on each model and the image is
    the resident pipeline's."""
    import numpy as np

    settings = InferenceSettings(offload="model")
    pipe = inference.build_pipeline(tiny_flux_dir, torch.float32, CPU, settings, lora=random_lora)
    assert all(hasattr(getattr(pipe, name), "_hf_hook") for name in ("transformer", "vae", "text_encoder_2"))
    assert pipe._offload_device == torch.device("cpu:0")
    resident = inference.build_pipeline(tiny_flux_dir, torch.float32, CPU, InferenceSettings(), lora=random_lora)
    np.testing.assert_allclose(draw(pipe, settings), draw(resident, InferenceSettings()), atol=1e-5)


def test_sequential_offload_streams_every_layer(tiny_flux_dir, random_lora):
    """build_pipeline's sequential offload, run for real: every weight, the LoRA's too, leaves for
    the meta device and a hook brings it to the execution device per layer. (Drawing with the
    CPU as both the offload and the execution device fails inside accelerate, which then puts a
    plain tensor where a Parameter was: a CPU-only case, not run here.)"""
    from accelerate.hooks import AlignDevicesHook

    pipe = inference.build_pipeline(tiny_flux_dir, torch.float32, CPU, InferenceSettings(offload="sequential"),
                                    lora=random_lora)
    transformer = pipe.transformer
    assert all(p.device.type == "meta" for p in transformer.parameters())
    to_q = transformer.transformer_blocks[0].attn.to_q
    hooks = [m._hf_hook for m in (to_q.base_layer, to_q.lora_A["impressionist"])]
    assert all(isinstance(h, AlignDevicesHook) and h.offload and h.execution_device == torch.device("cpu:0")
               for h in hooks)


def test_nf4_with_model_offload_draws(tiny_flux_dir, random_lora, pretend_gpu):
    settings = InferenceSettings(quantization="nf4", offload="model")
    inference.check(settings, CPU, "app", torch.bfloat16)
    pipe = inference.build_pipeline(tiny_flux_dir, torch.bfloat16, CPU, settings, lora=random_lora)
    assert hasattr(pipe.transformer, "_hf_hook") and np_finite(draw(pipe, settings))


# ------------------------------------------------------------------------------------------------ 8-bit Adam

def test_adamw8bit_trains_checkpoints_and_resumes_without_pickle(encoded_cache, tmp_path, pretend_gpu,
                                                                fresh_accelerate_state, no_pickle_loads):
    """train.optimizer=adamw8bit: bitsandbytes' AdamW8bit steps on the CPU; its 8-bit state goes
    into the checkpoint and comes back through weights_only=True on resume."""
    import bitsandbytes as bnb

    # bitsandbytes keeps tensors under 4096 elements in 32-bit state: rank 128 makes the tiny
    # model's 32-wide LoRA A factors 4096 elements, so they get 8-bit state as FLUX.1-dev's do
    first = run_recipe(tmp_path, encoded_cache, optimizer="adamw8bit", lora_rank=128)
    assert first["steps"] == 2
    params = cpu_recipe_params(max_steps=3)
    params["lora"]["rank"] = 128
    params["train"].update(optimizer="adamw8bit")
    params["train"]["validation"]["every"] = 0
    made = []
    real_make = train.make_optimizer
    with mock.patch.object(train, "make_optimizer", lambda *a: made.append(real_make(*a)) or made[-1]):
        summary = train.run(params, encoded_cache, **{k: first[k] for k in (
            "lora_dir", "checkpoint_dir", "metrics_path", "loss_plot", "live_dir", "log_dir")})
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 3
    assert isinstance(made[0], bnb.optim.AdamW8bit)
    states = list(made[0].state.values())
    assert any(state["state1"].dtype == torch.uint8 for state in states)  # 8-bit moments, resumed and stepped
    assert "optimizer.bin" in {Path(f).name for f in no_pickle_loads}


# ------------------------------------------------------------------------------------------------ CUDA calls

def test_the_cuda_only_calls_fit_the_installed_signatures():
    """The calls that need CUDA itself, bound to the installed functions exactly as the code
    makes them (a renamed or removed argument fails here, not on the first GPU)."""
    from diffusers import FluxPipeline

    gpu = torch.device("cuda")
    inspect.signature(torch.cuda.get_device_capability).bind(gpu)  # models.cuda_capability
    inspect.signature(torch.cuda.max_memory_allocated).bind(gpu)  # train.peak_memory_gb
    inspect.signature(torch.cuda.synchronize).bind(gpu)  # train.IntervalClock
    inspect.signature(torch.cuda.reset_peak_memory_stats).bind()  # the benchmarks
    inspect.signature(FluxPipeline.enable_model_cpu_offload).bind(None, device=gpu)  # build_pipeline
    inspect.signature(FluxPipeline.enable_sequential_cpu_offload).bind(None, device=gpu)
    # train.make_optimizer's CUDA AdamW is the fused one: torch runs that kernel on CPU tensors too
    cfg = TrainParams.check({"train": {**cpu_recipe_params()["train"]}})
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = train.make_optimizer(cfg, [param], gpu)
    assert optimizer.defaults["fused"] is True
    param.grad = torch.ones(4)
    optimizer.step()
    assert (param < 1).all()
