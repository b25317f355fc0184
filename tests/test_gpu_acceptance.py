"""benchmarks/gpu_acceptance.sh: its plan parses and fits the 10 minutes, a failing step stops the
run naming itself, and the stage steps' code runs on the CPU at toy sizes (the GPU run is the same
code at full size)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = ["gpu", "random-weights", "train-step", "inference", "encode", "sample", "sample-data-parallel",
         "evaluate-features"]


def test_the_dry_run_lists_every_step_with_its_command_and_time(tmp_path):
    result = subprocess.run(["bash", str(REPO / "benchmarks/gpu_acceptance.sh"), "--dry-run", "--work", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    listed = re.findall(r"^\d+\. (\S+) — expected (\d+) s", out, flags=re.M)
    assert [name for name, _ in listed] == STEPS
    assert sum(int(seconds) for _, seconds in listed) <= 600
    commands = [line for line in out.splitlines() if line.startswith("   $ ")]
    assert len(commands) == len(STEPS)
    assert "bench_train_step.py --profile gpu" in out and "1024px+ckpt+nf4" in out
    assert "bench_inference.py --profile gpu" in out and "--cases reference,fp8,nf4" in out
    assert f"the arguments of all {len(STEPS)} steps parse" in out
    assert not any(tmp_path.iterdir())  # a dry run runs nothing


def test_a_failing_step_stops_the_run_and_is_named(tmp_path):
    """On a machine without a GPU the first step fails: the run stops there, exits non-zero naming
    it, and still records the attempt, marked failed, with the steps it did not run."""
    import pytest

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the gpu step passes here")
    results = tmp_path / "RESULTS.md"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_acceptance.py"), "--only", "gpu,train-step",
                             "--work", str(tmp_path / "work"), "--results", str(results)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: gpu acceptance step 'gpu' failed (exit 1)")
    assert "no CUDA GPU is visible" in result.stderr
    text = results.read_text()
    assert "(measured on a GPU; FAILED, partial)" in text
    assert re.search(r"\| gpu \| FAILED \(exit 1\) \|", text) and re.search(r"\| train-step \| not run \|", text)


def test_the_stage_steps_run_on_the_cpu_at_toy_sizes(tmp_path, tiny_flux_dir, monkeypatch):
    """random_flux.py's writers (toy architectures) and bench_gpu_stages.py's encode, sample and
    features steps, in-process on the CPU: each fills its table row with n and a time."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    if str(REPO / "benchmarks") not in sys.path:
        monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_gpu_stages
    import random_flux

    transformer = {k: v for k, v in FluxTransformer2DModel.load_config(tiny_flux_dir, subfolder="transformer").items()
                   if not k.startswith("_")}
    toy = dict(transformer=transformer,
               vae={k: v for k, v in AutoencoderKL.load_config(tiny_flux_dir, subfolder="vae").items()
                    if not k.startswith("_")},
               clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, projection_dim=32, vocab_size=1000),
               t5=dict(vocab_size=1000, d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2,
                       relative_attention_num_buckets=8))
    random_flux.save_random_flux(tmp_path / "model", "cpu", configs=toy)
    random_flux.save_random_lora(tmp_path / "lora", transformer, rank=2)
    paths = random_flux.save_random_feature_nets(tmp_path / "features", clip_models=())
    assert Path(paths["inception"]).is_file()

    args = argparse.Namespace(work=tmp_path / "work", model=str(tmp_path / "model"), lora=str(tmp_path / "lora"),
                              features=str(tmp_path / "features"), images=2, side=64, resolutions=[64], small=True,
                              subjects=2, device="cpu", dtype="bfloat16", clip_model="builtin:tiny-clip",
                              cmmd_clip_model="builtin:tiny-clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = bench_gpu_stages.run_encode(args) + bench_gpu_stages.run_sample(args) + bench_gpu_stages.run_features(args)
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows]
    assert [c[0] for c in cells] == ["encode", "sample_base", "sample", "evaluate features"]
    assert cells[0][2] == "n = 1 run, 2 latents"
    assert cells[1][2] == cells[2][2] == "n = 2 eval images" and " ± " in cells[1][3]
    assert cells[3][2] == "n = 1 batches" and "4 images" in cells[3][1]  # base + LoRA evaluation sets


def test_the_data_parallel_step_runs_two_gloo_processes_on_the_cpu(tmp_path, tiny_flux_dir, monkeypatch):
    """bench_gpu_stages.py sample-dp at toy sizes: the stage's own command on 1 and on 2 (gloo)
    processes, a row with both times per image and the byte-identity verdict."""
    if str(REPO / "benchmarks") not in sys.path:
        monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_gpu_stages

    args = bench_gpu_stages.build_parser().parse_args(
        ["sample-dp", "--work", str(tmp_path), "--model", str(tiny_flux_dir), "--small", "--subjects", "3",
         "--processes", "2", "--device", "cpu", "--dtype", "float32"])
    [row] = bench_gpu_stages.run_sample_dp(args)
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[0] == "sample_base data-parallel" and "3 images" in cells[1]
    assert "1 process" in cells[3] and "2 processes" in cells[3] and "byte-identical: yes" in cells[3]
    assert (tmp_path / "sample-dp-2/samples/base/eval.csv").is_file()
