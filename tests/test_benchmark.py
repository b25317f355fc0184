"""The benchmark script runs and reports both steps (figures themselves are not asserted)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_cpu_profile_prints_a_row_per_case(tmp_path):
    out = tmp_path / "results.md"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_train_step.py"), "--profile", "cpu",
                             "--steps", "2", "--warmup", "0", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if re.match(r"\| \d+px", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["64px", "64px+ckpt", "128px", "128px+ckpt"]
    for row in rows:
        speedup, ours, baseline = (cell.strip() for cell in row.split("|")[2:5])
        (ours, ours_std), (baseline, _) = ours.split(" ± "), baseline.split(" ± ")  # n = 2 steps: a spread
        assert float(ours) > 0 and float(baseline) > 0 and float(ours_std) >= 0
        # the printed times are rounded to 4 decimals: allow that much disagreement
        ratio = float(baseline) / float(ours)
        assert abs(float(speedup.rstrip("x")) - ratio) / ratio < 0.05


@pytest.mark.parametrize("script", ["bench_train_step.py", "bench_inference.py"])
def test_gpu_profile_without_gpu_is_one_line(script):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--profile", "gpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: --profile gpu needs a CUDA GPU")


def load_bench():
    import importlib.util

    if str(REPO / "benchmarks") not in sys.path:  # where a script run from there finds results_file
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "benchmarks/bench_train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_peak_tensor_memory_follows_allocations_and_frees():
    import torch

    bench = load_bench()
    resident = torch.zeros(1000, dtype=torch.float32)  # 4000 bytes
    memory = bench.PeakTensorMemory([resident, resident[:10]])  # a view is not counted twice
    assert memory.current == 4000
    with memory:
        doubled = resident * 2        # +4000
        view = doubled.view(10, 100)  # same storage: +0
        del doubled, view             # freed
        halves = torch.zeros(500)     # +2000
    assert memory.peak == 8000
    assert memory.current == 6000
    del halves
    assert memory.current == 4000


def test_fake_tensor_estimate_matches_a_real_step():
    """The estimate profile's FLOPs and peak memory, on fake tensors, equal a real step's on the tiny model."""
    import argparse

    import torch

    bench = load_bench()
    args = argparse.Namespace(rank=4, batch_size=2, max_sequence_length=16)
    case = bench.Case("64px+ckpt", 64, True)
    dtype = torch.float32

    models = bench.build_models("cpu", torch.device("cpu"), dtype)
    bench.add_fresh_lora(models.transformer, case, args)
    real = bench.measure_steps(models, case, args, dtype)  # the same measurement on real tensors

    estimate = bench.estimate_case(bench.build_models("cpu", torch.device("cpu"), dtype), case, args, dtype)
    for label in ("ours", "baseline"):
        assert estimate[label]["gflop_per_step"] == real[label]["gflop_per_step"] > 0
    assert estimate["ours"]["peak_gib"] == real["ours"]["peak_gib"] > 0
    # The reference step's VAE sampling and text encoders free a few temporaries later under fake
    # tensors (about 1% of this tiny step's peak): the estimate errs on the high side.
    assert real["baseline"]["peak_gib"] <= estimate["baseline"]["peak_gib"] <= 1.02 * real["baseline"]["peak_gib"]
    assert estimate["baseline"]["gflop_per_step"] > estimate["ours"]["gflop_per_step"]


def test_nf4_memory_change_shrinks_the_4bit_linears_and_widens_the_rest():
    """The estimate's NF4 saving covers the Linears the trainer's load quantises (diffusers
    decides: the blocks' and the output projection) and widens every other frozen weight to fp32."""
    import torch

    bench = load_bench()
    transformer = bench.build_models("cpu", torch.device("cpu"), torch.bfloat16).transformer
    names = bench.nf4_quantized_names(transformer)
    assert "proj_out" in names and "context_embedder" not in names and "norm_out.linear" not in names
    weights = {name: m.weight for name, m in transformer.named_modules() if type(m) is torch.nn.Linear}
    quantised = sum(weights[n].numel() for n in names)
    other = sum(p.numel() for p in transformer.parameters()) - quantised
    change, transient = bench.nf4_memory_change(transformer)
    assert change == int(other * (4 - 2) - quantised * (2 - bench.NF4_BYTES_PER_WEIGHT))
    assert transient == max(weights[n].numel() for n in names) * 2


def test_nf4_base_is_as_small_as_the_estimate_assumes_and_trains_a_lora():
    """The GPU profile's NF4 swap, run on the CPU (bitsandbytes quantises there too): the stored
    bytes per weight are the estimate's, and a LoRA on the 4-bit base still gets gradients."""
    import argparse

    import bitsandbytes as bnb
    import torch

    bench = load_bench()
    args = argparse.Namespace(rank=4, batch_size=2, max_sequence_length=16)
    case = bench.Case("64px+ckpt+nf4", 64, True, nf4=True)
    models = bench.build_models("cpu", torch.device("cpu"), torch.bfloat16)
    names = bench.nf4_quantized_names(models.transformer)
    weights = sum(m.weight.numel() for name, m in models.transformer.named_modules() if name in names)
    bench.add_fresh_lora(models.transformer, case, args)  # the swap must see through an earlier LoRA
    bench.quantize_nf4(models.transformer, torch.bfloat16)

    quantised = [m for m in models.transformer.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and not any(type(m) is torch.nn.Linear for name, m in models.transformer.named_modules()
                                 if "transformer_blocks" in name)
    stored = 0
    for layer in quantised:
        state = layer.weight.quant_state
        stored += layer.weight.untyped_storage().nbytes() + state.absmax.nbytes
        stored += state.state2.absmax.nbytes + state.offset.nbytes  # double quantisation
    # every 256 blocks share one fp32 absmax; a tiny model's last group is partial, hence the slack
    assert weights * bench.NF4_BYTES_PER_WEIGHT <= stored <= weights * 0.55

    trainable = bench.add_fresh_lora(models.transformer, case, args)
    ours, _ = bench.step_functions(models, case, args, torch.device("cpu"), torch.bfloat16)
    loss = ours()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in trainable if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_data_loader_benchmark_times_the_trainers_loader(tmp_path):
    out = tmp_path / "results.md"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_data_loader.py"), "--resolution", "64",
                             "--images", "6", "--captions", "2", "--batch-size", "2", "--batches", "4",
                             "--workers", "0", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:4] for line in out.read_text().splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(workers) for workers, _, _ in rows] == [0, 1]
    assert all(float(ms) > 0 and float(per_second) > 0 for _, ms, per_second in rows)


def test_encode_benchmark_runs_the_stage_per_case(tmp_path):
    out = tmp_path / "results.md"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_encode.py"), "--resolution", "64",
                             "--images", "3", "6", "--workers", "0", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:5] for line in out.read_text().splitlines() if re.match(r"\| \d+ \| \d+ \|", line)]
    assert [(int(images), int(workers)) for images, workers, _, _ in rows] == [(3, 0), (6, 0)]
    assert all(float(per_second) > 0 and float(rss) > 0 for _, _, per_second, rss in rows)


def test_full_size_configs_have_flux_dev_parameter_counts():
    """The GPU and estimate profiles build FLUX.1-dev's published architectures (on "meta": no memory)."""
    import torch

    bench = load_bench()
    models = bench.build_full_size("meta", torch.bfloat16)
    counts = {name: sum(p.numel() for p in getattr(models, name).parameters())
              for name in ("transformer", "vae", "clip", "t5")}
    # the parameter counts of black-forest-labs/FLUX.1-dev's transformer, vae, text_encoder
    # (CLIP ViT-L/14) and text_encoder_2 (T5 v1.1 XXL encoder)
    assert counts == {"transformer": 11_901_408_320, "vae": 83_819_683, "clip": 123_060_480,
                      "t5": 4_762_310_656}
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad
               for name in counts for p in getattr(models, name).parameters())


def test_download_benchmark_measures_less_read_with_pushdown_on_the_grouped_mirror(tmp_path):
    out = tmp_path / "results.md"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_download.py"), "--rows", "100",
                             "--shards", "2", "--rows-per-group", "10", "--repeats", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.read_text().splitlines()
            if re.match(r"\| (by_style|shuffled) ", line)]
    assert [(row[0], row[1]) for row in rows] == [("by_style", "no"), ("by_style", "yes"),
                                                  ("shuffled", "no"), ("shuffled", "yes")]
    share = {(row[0], row[1]): int(row[4].rstrip("%")) for row in rows}
    assert share[("by_style", "yes")] < 40 and share[("by_style", "no")] == 100
    for row in rows:
        assert float(row[3].split()[0]) > 0 and row[6].endswith("/ 16")  # 16% of 100 kept every time


def test_inference_cpu_profile_prints_the_table_with_n_and_spread(tmp_path):
    """bench_inference.py on the tiny model: one row per setting, times with n and their spread, the
    reference identical to itself, and a setting the CPU cannot run refused with the app's line."""
    import torch

    out = tmp_path / "results.md"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_inference.py"), "--profile", "cpu",
                             "--images", "2", "--steps", "2", "--resolution", "32", "--max-sequence-length", "16",
                             "--cases", "reference,4-steps,fused,nf4", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert "n = 2 images per setting, mean ± sample std" in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| setting")}
    assert list(rows) == ["reference (adapter)", "4 steps", "fused LoRA", "nf4 transformer"]
    reference, fewer, fused = rows["reference (adapter)"], rows["4 steps"], rows["fused LoRA"]
    assert (reference[0], fewer[0]) == ("2", "4")
    for row in (reference, fewer, fused):
        mean, spread = row[1].split(" ± ")
        assert float(mean) > 0 and float(spread) >= 0
    assert reference[6] == "identical" and reference[5].startswith("1.0000")
    assert fewer[6] != "identical"  # 4 steps draw another picture than 2
    # counted FLOPs of one image: more steps, more FLOPs; the fused LoRA does the reference's maths
    assert float(fewer[9]) > float(reference[9]) > 0 and fused[9] == reference[9]
    assert float(reference[8]) == pytest.approx(float(reference[1].split(" ± ")[0]) / 2, abs=1e-3)  # s/step
    assert reference[10] == "n/a"  # no bf16 peak to compare a CPU with
    if not torch.cuda.is_available():
        assert rows["nf4 transformer"][1] == "refused: setting.quantization=nf4 needs a CUDA GPU (bitsandbytes " \
                                             "kernels); use none on the CPU"



def load_inference_bench():
    import importlib.util

    load_bench()  # puts benchmarks/ on sys.path and registers bench_train_step
    spec = importlib.util.spec_from_file_location("bench_inference", REPO / "benchmarks/bench_inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_inference_rows_free_their_pipeline_and_score_off_the_device(tiny_flux_dir, tmp_path, monkeypatch):
    """Each row's pipeline is gone when the next row starts, even when it sits in a reference cycle
    (as a compiled one does) and the garbage collector has not run by itself; the CLIP scorer is
    on the device only while it scores."""
    import argparse
    import gc
    import weakref

    import torch

    bench = load_inference_bench()
    built, scored_on = [], []
    real_build = bench.build_pipeline

    def cyclic_build(*args, **kwargs):
        pipe = real_build(*args, **kwargs)
        pipe.transformer.cycle = pipe  # pipeline -> transformer -> pipeline
        built.append(weakref.ref(pipe.transformer))
        return pipe

    monkeypatch.setattr(bench, "build_pipeline", cyclic_build)
    scorer = bench.clip_scorer("builtin:tiny-clip", "builtin", torch.device("cpu"))
    real_features = type(scorer).image_features
    monkeypatch.setattr(type(scorer), "image_features",
                        lambda self, images: scored_on.append(self.device) or real_features(self, images))
    args = argparse.Namespace(steps=1, images=1, resolution=32, max_sequence_length=16)
    lora = str(bench.random_lora(tiny_flux_dir, tmp_path / "lora", rank=2))
    gc.disable()
    try:
        row = bench.run_case(bench.CASES[0], args, tiny_flux_dir, lora, torch.device("cpu"), torch.float32,
                             scorer, None)
        assert built and built[0]() is None
    finally:
        gc.enable()
    assert row["n"] == 1 and scored_on == [torch.device("cpu")] and scorer.device == torch.device("cpu")


def test_stored_bytes_counts_nf4_weights_with_their_block_scales():
    import bitsandbytes as bnb
    import torch

    bench = load_inference_bench()
    weight = bnb.nn.Params4bit(torch.randn(128, 64, dtype=torch.bfloat16), requires_grad=False, quant_type="nf4",
                               compress_statistics=False).to("cpu")
    # 4 bits a weight + one fp32 absmax per block of 64 (diffusers' inference config: no double quantisation)
    assert bench.stored_bytes(weight) == 128 * 64 // 2 + (128 * 64 // 64) * 4
    assert 128 * 64 * bench.NF4_BYTES_PER_WEIGHT == bench.stored_bytes(weight)


def test_param_refusal_benchmark_times_both_commands_and_finds_the_same_line(tmp_path):
    """bench_param_refusal.py on two stages, one repeat: a row each, both commands refused with one
    identical line (the script stops on anything else), figures with their min–max."""
    out = tmp_path / "results.md"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_param_refusal.py"), "--repeats", "1",
                             "--stages", "filter", "train", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.read_text().splitlines()
            if re.match(r"\| (filter|train) ", line)]
    assert [(row[0], row[1], row[4]) for row in rows] == [("filter", "`filter.bogus_setting`", "yes"),
                                                          ("train", "`lora.rank: -1`", "yes")]
    for row in rows:
        assert re.fullmatch(r"\d+\.\d\d \(\d+\.\d\d–\d+\.\d\d\)", row[2]) and re.fullmatch(r"\d+\.\d\d \(.*\)", row[3])
