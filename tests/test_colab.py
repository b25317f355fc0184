"""The Colab notebook and its logic (the package src/impressionist/colab/).

Unit tests of the choices (recipe per GPU, Drive layout, state mirror, checkpoint link), then the
notebook itself, executed headless on CPU with nbclient in local test mode (a folder stands in for
Google Drive, no Hub login): a run killed during training together with its kernel (what a Colab
disconnect does), then a rerun in a fresh clone that must resume training and skip the data stages.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import threading
import time
from pathlib import Path

import httpx
import nbformat
import psutil
import pytest
import yaml
from helpers import committed_params_text
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError

from impressionist import colab
from impressionist.cli import apply_overrides, demo_overrides
from impressionist.colab.pipeline_run import _stop
from impressionist.errors import UserError
from impressionist.params.training import MIXED_PRECISION, OPTIMIZERS

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "train_colab.ipynb"
DATA_STAGES = ["download", "filter", "describe", "caption", "encode_latents", "encode_text"]


# --------------------------------------------------------------------------- recipe per GPU

# name, GiB, compute capability -> what each Colab GPU must get (written out, not computed)
GPUS = {
    "H100": ("NVIDIA H100 80GB HBM3", 79.6, (9, 0)),
    "A100-80": ("NVIDIA A100-SXM4-80GB", 79.2, (8, 0)),
    "A100-40": ("NVIDIA A100-SXM4-40GB", 39.4, (8, 0)),
    "L4": ("NVIDIA L4", 22.5, (8, 9)),
    "T4": ("Tesla T4", 15.0, (7, 5)),
}
EXPECTED = {  # dtype, mixed precision, base quantization, gradient checkpointing, optimizer, sample offload
    "H100": ("bfloat16", "bf16", "none", False, "adamw", "none"),
    "A100-80": ("bfloat16", "bf16", "none", False, "adamw", "none"),
    "A100-40": ("bfloat16", "bf16", "none", True, "adamw", "model"),
    "L4": ("bfloat16", "bf16", "nf4", True, "adamw8bit", "sequential"),
    "T4": ("float16", "fp16", "nf4", True, "adamw8bit", "sequential"),
}


@pytest.mark.parametrize("gpu", list(GPUS))
def test_each_colab_gpu_gets_its_recipe(gpu):
    overrides = colab.gpu_overrides(*GPUS[gpu])
    keys = ("model.dtype", "train.mixed_precision", "train.base_quantization",
            "train.gradient_checkpointing", "train.optimizer", "sample.offload")
    got = tuple(overrides[k] for k in keys)
    assert got == EXPECTED[gpu]
    assert overrides["model.device"] == "cuda"
    assert overrides["describe.dtype"] == EXPECTED[gpu][0]  # a T4 captions in fp16: it has no bf16
    assert overrides["train.checkpoint_every"] == (50 if EXPECTED[gpu][2] == "nf4" else 100)


def test_bf16_support_falls_back_to_the_gpu_name_without_a_compute_capability():
    assert colab.gpu_overrides("Tesla T4", 15.0)["train.mixed_precision"] == "fp16"
    assert colab.gpu_overrides("Tesla V100-SXM2-16GB", 16.0)["model.dtype"] == "float16"
    assert colab.gpu_overrides("NVIDIA L4", 22.5)["train.mixed_precision"] == "bf16"


def test_a_gpu_too_small_for_flux_is_refused_with_one_line():
    with pytest.raises(UserError, match="at least 14 GiB"):
        colab.gpu_overrides("Tesla K80", 11.2, (3, 7))


def test_gpu_recipes_use_values_the_trainer_and_models_accept():
    from impressionist.models import BASE_QUANTIZATIONS, DTYPES

    params = yaml.safe_load(committed_params_text())
    for gpu in GPUS.values():
        overrides = colab.gpu_overrides(*gpu)
        assert overrides["train.optimizer"] in OPTIMIZERS
        assert overrides["train.mixed_precision"] in MIXED_PRECISION
        assert overrides["model.dtype"] in DTYPES
        assert overrides["train.base_quantization"] in BASE_QUANTIZATIONS
        apply_overrides(yaml.safe_load(committed_params_text()), overrides)  # every key is a param
    assert params["train"]["checkpoint_every"] > colab.CHECKPOINT_EVERY_BF16 > colab.CHECKPOINT_EVERY_NF4


def test_without_a_gpu_or_with_profile_demo_the_recipe_is_the_demo():
    demo = demo_overrides(REPO / "configs/demo.yaml")
    cpu = colab.choose_recipe(None, demo)
    assert cpu.overrides == demo and "SYNTHETIC" in cpu.notes[0]
    l4 = colab.Gpu(*GPUS["L4"])
    assert colab.choose_recipe(l4, demo, profile="demo").overrides == demo
    with pytest.raises(UserError, match="PROFILE"):
        colab.choose_recipe(l4, demo, profile="fast")


def test_recipe_notes_warn_when_sampling_cannot_fit():
    demo = demo_overrides(REPO / "configs/demo.yaml")
    l4 = colab.choose_recipe(colab.Gpu(*GPUS["L4"]), demo, ram_gib=22.0)
    assert any("does not fit" in n for n in l4.notes) and any("High-RAM" in n for n in l4.notes)
    h100 = colab.choose_recipe(colab.Gpu(*GPUS["H100"]), demo, ram_gib=200.0)
    assert h100.notes == [] and "bf16 base" in h100.name


def recipe_for(gpu: str, ram_gib: float = 200.0) -> colab.Recipe:
    return colab.choose_recipe(colab.Gpu(*GPUS[gpu]), demo_overrides(REPO / "configs/demo.yaml"), ram_gib=ram_gib)


def test_a_rerun_on_another_gpu_keeps_the_first_runs_training_params(tmp_path):
    path = tmp_path / "drive" / "recipe.json"
    l4 = recipe_for("L4")
    assert colab.keep_first_recipe(path, l4) == l4 and path.is_file()  # the first run: chosen and saved
    assert colab.keep_first_recipe(path, recipe_for("L4")) == l4  # the same GPU again

    # After a disconnect Colab hands out an A100 80 GB: its own recipe would be bf16 without NF4 and
    # with AdamW (another run hash: training would start over). The L4's training params stay; the
    # memory settings are the A100's.
    kept = colab.keep_first_recipe(path, recipe_for("A100-80"))
    assert kept.overrides == {
        "model.device": "cuda", "model.dtype": "bfloat16", "train.mixed_precision": "bf16",
        "train.base_quantization": "nf4", "train.optimizer": "adamw8bit", "describe.dtype": "bfloat16",  # the L4's
        "train.gradient_checkpointing": False, "train.checkpoint_every": 50, "sample.offload": "none"}
    assert any("first run" in note for note in kept.notes)
    # A project begun on a T4 keeps captioning in fp16 on an A100 too (the descriptions' cache key
    # covers the dtype: another value would describe every painting again).
    t4_first = tmp_path / "t4" / "recipe.json"
    colab.keep_first_recipe(t4_first, recipe_for("T4"))
    assert colab.keep_first_recipe(t4_first, recipe_for("A100-80")).overrides["describe.dtype"] == "float16"

    # A T4 has no bf16, and no GPU at all cannot train: one line each, saying how to reset.
    for other, needle in ((recipe_for("T4"), "needs bf16"),
                          (colab.choose_recipe(None, demo_overrides(REPO / "configs/demo.yaml")), "no GPU")):
        with pytest.raises(UserError) as err:
            colab.keep_first_recipe(path, other)
        message = str(err.value)
        assert needle in message and str(path) in message and "PROJECT" in message and "\n" not in message
    assert colab.keep_first_recipe(path, recipe_for("L4")) == l4  # nothing was overwritten


def test_a_bf16_first_recipe_needs_a_gpu_that_holds_the_bf16_base(tmp_path):
    path = tmp_path / "recipe.json"
    colab.keep_first_recipe(path, recipe_for("A100-40"))
    with pytest.raises(UserError, match="needs 35 GiB that this runtime's NVIDIA L4"):
        colab.keep_first_recipe(path, recipe_for("L4"))
    h100 = colab.keep_first_recipe(path, recipe_for("H100"))
    assert h100.overrides["train.base_quantization"] == "none"
    assert h100.overrides["train.gradient_checkpointing"] is False  # the H100's own memory setting


def test_a_demo_project_stays_a_demo_and_a_broken_recipe_file_is_one_line(tmp_path):
    demo = demo_overrides(REPO / "configs/demo.yaml")
    path = tmp_path / "recipe.json"
    cpu = colab.choose_recipe(None, demo)
    assert colab.keep_first_recipe(path, cpu) == cpu
    assert colab.keep_first_recipe(path, colab.choose_recipe(None, demo)) == cpu
    with pytest.raises(UserError, match="first run used the recipe 'offline demo"):
        colab.keep_first_recipe(path, recipe_for("H100"))
    path.write_text("{not json")
    with pytest.raises(UserError, match="not a recipe this notebook wrote.*delete it"):
        colab.keep_first_recipe(path, cpu)


def test_select_recipe_keeps_the_recipe_in_the_drive_project(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: the demo
    layout = colab.DriveLayout.under(tmp_path / "drive").create()
    recipe = colab.select_recipe(REPO, "auto", layout)
    assert recipe.demo and json.loads(layout.recipe.read_text())["demo"] is True
    assert layout.recipe.parent == layout.root  # not in state/, which mirrors files of the checkout


def test_nvidia_smi_output_is_parsed_and_cuda_visible_devices_is_honoured(tmp_path, monkeypatch):
    assert colab.parse_nvidia_smi("NVIDIA A100-SXM4-40GB, 40960, 8.0\n") == \
        colab.Gpu("NVIDIA A100-SXM4-40GB", 40.0, (8, 0))
    assert colab.parse_nvidia_smi("Tesla T4, 15360\n") == colab.Gpu("Tesla T4", 15.0, None)
    fake = tmp_path / "nvidia-smi"  # a stand-in for the driver's tool, on PATH
    fake.write_text("#!/bin/sh\necho 'NVIDIA L4, 23034, 8.9'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpu = colab.detect_gpu()
    assert gpu.name == "NVIDIA L4" and gpu.capability == (8, 9) and 22.4 < gpu.memory_gib < 22.6
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert colab.detect_gpu() is None


# --------------------------------------------------------------------------- environment and Drive

def test_local_test_mode_and_drive_layout(tmp_path):
    env = colab.detect_environment({colab.ENV_LOCAL: str(tmp_path / "drive")})
    assert env.local_test and env.drive_root == (tmp_path / "drive").resolve()
    layout = colab.mount_drive(env, "proj")
    root = tmp_path / "drive" / "proj"
    assert (layout.dvc_cache, layout.checkpoints, layout.state, layout.logs) == \
        (root / "dvc-cache", root / "checkpoints", root / "state", root / "logs")
    assert all(p.is_dir() for p in (layout.dvc_cache, layout.checkpoints, layout.state, layout.logs))
    for bad in ("", "../elsewhere", "/abs"):
        with pytest.raises(UserError, match="PROJECT"):
            colab.DriveLayout.under(tmp_path, bad)


def test_outside_colab_without_the_switch_is_one_clear_error():
    with pytest.raises(UserError, match=colab.ENV_LOCAL):
        colab.detect_environment({})


def test_state_paths_are_the_uncached_outs(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": "x", "outs": ["data/a", {"logs": {"cache": False}}, {"data/p": {"persist": True}}],
              "metrics": [{"metrics/a.json": {"cache": False}}]},
        "b": {"cmd": "y", "plots": [{"plots/b.png": {"cache": False}}, "plots/cached.png"]}}}))
    assert colab.state_paths(tmp_path / "dvc.yaml") == ["logs", "metrics/a.json", "plots/b.png"]
    real = colab.state_paths(REPO / "dvc.yaml")
    assert {"metrics/eval.json", "metrics/train.json", "plots/samples_grid.png", "dvclive"} <= set(real)
    assert not {"data/raw", "data/cache", ".cache/checkpoints", "models/lora"} & set(real)


def test_state_mirror_syncs_exactly_and_restores(tmp_path):
    repo, state = tmp_path / "repo", tmp_path / "state"
    (repo / "live").mkdir(parents=True)
    (repo / "dvc.lock").write_text("lock 1")
    (repo / "m.json").write_text("{}")
    (repo / "live" / "a.tsv").write_text("a")
    (repo / "live" / "b.tsv").write_text("b")
    mirror = colab.StateMirror(repo, state, ["m.json", "live"])
    assert mirror.sync() == 4 and mirror.sync() == 0
    (repo / "live" / "b.tsv").unlink()  # gone from a present folder: gone from the mirror
    (repo / "m.json").unlink()  # a path missing locally keeps its last mirrored version
    (repo / "dvc.lock").write_text("lock 2")
    assert mirror.sync() == 2
    assert sorted(p.relative_to(state).as_posix() for p in state.rglob("*") if p.is_file()) == \
        ["dvc.lock", "live/a.tsv", "m.json"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    restored = colab.StateMirror(fresh, state, ["m.json", "live"]).restore()
    assert sorted(restored) == ["dvc.lock", "live/a.tsv", "m.json"]
    assert (fresh / "dvc.lock").read_text() == "lock 2" and (fresh / "m.json").read_text() == "{}"


def test_state_mirror_thread_syncs_when_poked(tmp_path):
    repo, state = tmp_path / "repo", tmp_path / "state"
    repo.mkdir()
    with colab.StateMirror(repo, state, [], interval=60) as mirror:
        (repo / "dvc.lock").write_text("stage done")
        mirror.poke()
        deadline = time.monotonic() + 10
        while not (state / "dvc.lock").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (state / "dvc.lock").read_text() == "stage done"
        (repo / "dvc.lock").write_text("final")
    assert (state / "dvc.lock").read_text() == "final"  # synced once more on exit


def test_checkpoints_are_moved_to_drive_and_linked(tmp_path):
    repo, target = tmp_path / "repo", tmp_path / "drive" / "checkpoints"
    local = repo / ".cache" / "checkpoints" / "run1" / "step-00000010"
    local.mkdir(parents=True)
    (local / "impressionist.json").write_text('{"step": 10}')
    link = colab.link_checkpoints(repo, target)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "run1" / "step-00000010" / "impressionist.json").read_text() == '{"step": 10}'
    assert colab.link_checkpoints(repo, target) == link  # idempotent
    assert (link / "run1" / "step-00000010").is_dir()


def test_incomplete_checkpoints_on_drive_are_removed(tmp_path):
    def checkpoint(step, files, run="r1", listed=None):
        folder = tmp_path / run / f"step-{step:08d}"  # the trainer's layout: a folder per run hash
        folder.mkdir(parents=True)
        meta = {"step": step, "run_hash": run, **({"files": listed} if listed else {})}
        (folder / "impressionist.json").write_text(json.dumps(meta))
        for name, data in files.items():
            (folder / name).write_bytes(data)
        return folder

    full = {"optimizer.bin": b"x" * 8, "lora_state.safetensors": b"y" * 4}
    good = checkpoint(10, full)
    listed = checkpoint(20, full, listed={"optimizer.bin": 8})
    empty = checkpoint(30, {**full, "optimizer.bin": b""})
    lacking = checkpoint(40, {"optimizer.bin": b"x" * 8})
    short = checkpoint(50, full, listed={"optimizer.bin": 9})
    other_run = checkpoint(60, {"model.safetensors": b"z"}, run="r2")  # judged against its own run
    removed = colab.drop_incomplete_checkpoints(tmp_path, log=lambda _: None)
    assert sorted(removed) == [empty, lacking, short]
    assert good.is_dir() and listed.is_dir() and other_run.is_dir()


# --------------------------------------------------------------------------- Hub login

def test_login_is_skipped_in_local_test_mode(tmp_path):
    def no_prompt(_):
        raise AssertionError("asked for a token in test mode")

    colab.login(colab.Environment(False, tmp_path), model="black-forest-labs/FLUX.1-dev", prompt=no_prompt)


def test_login_never_shows_or_keeps_a_refused_token(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    secret = "hf_notARealToken0123456789"

    def refuse(self, token=None, **kwargs):  # the Hub's answer, which quotes what it was sent
        raise RuntimeError(f"401 Unauthorized for token {token}")

    monkeypatch.setattr(HfApi, "whoami", refuse)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UserError) as err:
        colab.login(colab.Environment(True, tmp_path), prompt=lambda _: secret)
    assert secret not in str(err.value) and "refused this token" in str(err.value)
    assert "HF_TOKEN" not in os.environ
    assert secret not in capsys.readouterr().out
    with pytest.raises(UserError, match="no Hugging Face token"):
        colab.login(colab.Environment(True, tmp_path), prompt=lambda _: "  ")


def test_login_checks_the_model_gate_and_keeps_the_token_in_memory_only(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    secret = "hf_anotherFakeToken987"
    monkeypatch.setattr(HfApi, "whoami", lambda self, token=None, **kw: {"name": "painter"})
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))

    def gated(self, repo_id, token=None, **kwargs):  # the Hub's answer for a licence not accepted
        url = f"https://huggingface.co/api/models/{repo_id}/auth-check"
        answer = httpx.Response(403, request=httpx.Request("GET", url))
        raise GatedRepoError(f"{repo_id} is gated", response=answer)

    monkeypatch.setattr(HfApi, "auth_check", gated)
    with pytest.raises(UserError, match="accept its licence at https://huggingface.co/black-forest"):
        colab.login(colab.Environment(True, tmp_path), "black-forest-labs/FLUX.1-dev",
                    prompt=lambda _: secret)
    monkeypatch.setattr(HfApi, "auth_check", lambda self, repo_id, token=None, **kw: None)
    colab.login(colab.Environment(True, tmp_path), "black-forest-labs/FLUX.1-dev", prompt=lambda _: secret)
    assert os.environ["HF_TOKEN"] == secret
    assert "painter" in capsys.readouterr().out
    assert not any(secret in p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- the run command

def test_the_run_skips_finished_stages_whose_outputs_are_gone_and_pulls_what_a_stage_needs(tmp_path):
    """A fresh clone has dvc.lock (from Drive) and the cache, but no outputs. `make` has a persist out,
    as download and train do, so DVC keeps no run-cache for it: plain `dvc repro` would run it again."""
    from test_pipeline_e2e import sh

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("a:\n  n: 1\nb:\n  k: 1\n")
    read = "import json, yaml; p = yaml.safe_load(open('params.yaml')); "
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "make": {"cmd": f'python -c "{read}open(\'data.txt\', \'w\').write(str(p[\'a\'][\'n\']))"',
                 "params": ["a"], "outs": [{"data.txt": {"persist": True}}]},
        "use": {"cmd": f'python -c "{read}json.dump(open(\'data.txt\').read() + str(p[\'b\'][\'k\']), '
                       f'open(\'m.json\', \'w\'))"',
                "deps": ["data.txt"], "params": ["b"], "metrics": [{"m.json": {"cache": False}}]}}}))
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    layout = colab.DriveLayout.under(tmp_path / "drive").create()
    colab.run(repo, layout, {}, out=io.StringIO())
    assert json.loads((repo / "m.json").read_text()) == "11"

    (repo / "data.txt").unlink()  # the outputs are only in the cache now
    shown = io.StringIO()
    colab.run(repo, layout, {}, out=shown)
    assert "Running stage" not in shown.getvalue()
    assert not (repo / "data.txt").exists()  # skipped without copying the output back

    shown = io.StringIO()
    colab.run(repo, layout, {"b.k": 2}, out=shown)  # `use` must run: it gets data.txt from the cache
    assert "Stage 'make' didn't change, skipping" in shown.getvalue()
    assert "Running stage 'use'" in shown.getvalue()
    assert json.loads((repo / "m.json").read_text()) == "12"

    (repo / "data.txt").unlink()
    assert "Running stage 'make'" in sh(repo, "dvc", "repro", "--dry", check=False).stdout  # what the flags avoid


def test_without_dvc_the_run_stops_with_one_line(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("a:\n  n: 1\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr("sys.executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(UserError, match="dvc is not installed"):
        colab.run(tmp_path, colab.DriveLayout.under(tmp_path / "drive").create(), {}, out=io.StringIO())


def test_params_are_written_like_dvc_exp_run_set_param_keeping_comments(tmp_path):
    (tmp_path / "params.yaml").write_text(committed_params_text())
    colab.apply_params(tmp_path, {"train.max_steps": 30, "model.pretrained": "builtin:tiny-flux",
                                  "sample.seeds": [0, 1], "train.gradient_checkpointing": False})
    text = (tmp_path / "params.yaml").read_text()
    params = yaml.safe_load(text)
    assert params["train"]["max_steps"] == 30 and params["model"]["pretrained"] == "builtin:tiny-flux"
    assert params["sample"]["seeds"] == [0, 1] and params["train"]["gradient_checkpointing"] is False
    assert "# The real recipe" in text and "# bfloat16 | float16 | float32" in text
    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(UserError, match="train.no_such_key"):
        colab.apply_params(tmp_path, {"lora.rank": 4, "train.no_such_key": 1})
    assert (tmp_path / "params.yaml").read_text() == before  # nothing written


def test_unknown_override_stops_before_the_run(tmp_path):
    (tmp_path / "params.yaml").write_text(committed_params_text())
    with pytest.raises(UserError, match="train.no_such_key"):
        colab.planned_params(tmp_path, {"train.no_such_key": 1})
    with pytest.raises(UserError, match="train.nested.key"):
        colab.planned_params(tmp_path, {"train.nested.key": 1})
    assert colab.planned_params(tmp_path, {"lora.rank": 4})["lora"]["rank"] == 4


def test_show_results_says_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="plots/samples_grid.png"):
        colab.show_results(tmp_path)


def test_prepare_points_dvc_at_drive_and_restores_only_into_a_fresh_clone(tmp_path):
    from test_pipeline_e2e import sh

    repo = project_checkout(tmp_path / "repo")
    layout = colab.DriveLayout.under(tmp_path / "drive").create()
    (layout.state / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (layout.state / "metrics").mkdir()
    (layout.state / "metrics" / "eval.json").write_text('{"from": "drive"}')
    colab.prepare(repo, layout)
    assert "dvc-cache" not in (repo / ".dvc/config").read_text()  # the committed config is untouched
    assert sh(repo, "dvc", "cache", "dir").stdout.strip() == str(layout.dvc_cache)
    assert sh(repo, "dvc", "config", "cache.type").stdout.strip() == "copy"
    assert (repo / ".cache/checkpoints").resolve() == layout.checkpoints.resolve()
    assert (repo / "metrics/eval.json").read_text() == '{"from": "drive"}'
    (repo / "metrics/eval.json").write_text('{"from": "this runtime"}')
    colab.prepare(repo, layout)  # the same runtime again: local files are newer, nothing restored
    assert (repo / "metrics/eval.json").read_text() == '{"from": "this runtime"}'


def tiny_dvc_repo(root: Path) -> Path:
    """A one-stage DVC project: writes m.json (uncached) from params a.n and fails when n == 7."""
    from test_pipeline_e2e import sh

    root.mkdir()
    (root / "params.yaml").write_text("a:\n  n: 1  # the number\n")
    (root / "stage.py").write_text(
        "import json, sys, yaml\n"
        "n = yaml.safe_load(open('params.yaml'))['a']['n']\n"
        "print('stage sees', n, flush=True)\n"
        "json.dump({'n': n}, open('m.json', 'w'))\n"
        "sys.exit(3 if n == 7 else 0)\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {
        "cmd": "python stage.py", "deps": ["stage.py"], "params": ["a"],
        "metrics": [{"m.json": {"cache": False}}]}}}))
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    return root


def test_run_streams_to_a_drive_log_mirrors_state_and_fails_with_one_line(tmp_path):
    repo = tiny_dvc_repo(tmp_path / "repo")
    layout = colab.DriveLayout.under(tmp_path / "drive").create()
    shown = io.StringIO()
    log = colab.run(repo, layout, {"a.n": 5}, out=shown)
    assert "stage sees 5" in shown.getvalue() and "stage sees 5" in log.read_text()
    assert log.parent == layout.logs
    assert json.loads((layout.state / "m.json").read_text()) == {"n": 5}
    assert "m.json" in (layout.state / "dvc.lock").read_text()
    assert "# the number" in (repo / "params.yaml").read_text()
    with pytest.raises(UserError, match=r"exit code \d+.*run-.*\.log") as err:
        colab.run(repo, layout, {"a.n": 7}, out=io.StringIO())
    assert "\n" not in str(err.value)
    assert json.loads((layout.state / "m.json").read_text()) == {"n": 7}  # mirrored after the failure too


def test_stop_ends_the_whole_process_group():
    process = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    deadline = time.monotonic() + 10
    while not psutil.Process(process.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    children = psutil.Process(process.pid).children()
    _stop(process, grace=5)
    assert process.poll() is not None
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive


# --------------------------------------------------------------------------- the notebook

def execute_notebook(repo: Path, drive: Path, overrides: dict, *, timeout: int = 600):
    """Run the project's notebook as Colab would, in local test mode; OVERRIDES are injected after
    the cell tagged "parameters" (papermill's convention). Returns (notebook, client)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(f"OVERRIDES = {overrides!r}"))
    env = dict(os.environ, IMPRESSIONIST_COLAB_LOCAL=str(drive), IMPRESSIONIST_REPO=str(repo),
               CUDA_VISIBLE_DEVICES="", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3")
    return nb, client, env


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append("".join(output.get("traceback", [])))
            parts.append(str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def kill_kernel_tree(pid: int) -> None:
    """SIGKILL the kernel and everything it started (dvc and the stage): a lost Colab runtime."""
    kernel = psutil.Process(pid)
    tree = kernel.children(recursive=True) + [kernel]  # collected before any dies and is reparented
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


def wait_for_line(folder: Path, pattern: str, worker: threading.Thread, failure: list,
                  timeout: float = 400) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.is_alive():
        for log in folder.glob("run-*.log"):
            text = log.read_text(errors="replace")
            if re.search(pattern, text):
                return text
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in the run log before the run ended or timed out: {failure}")


def project_checkout(dest: Path) -> Path:
    """A git repository of the project as committed (test_pipeline_e2e.copy_project), plus this
    feature's own files, which a working tree may hold uncommitted."""
    from test_pipeline_e2e import copy_project, sh

    repo = copy_project(dest)
    colab_package = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "src/impressionist/colab").glob("*.py"))
    for name in (*colab_package, "notebooks/train_colab.ipynb", "src/impressionist/dvc_cli.py",
                 "src/impressionist/hub.py", "src/impressionist/tables.py", "src/impressionist/prompts.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes((REPO / name).read_bytes())
    sh(repo, "git", "add", "-A")
    if sh(repo, "git", "status", "--porcelain").stdout.strip():
        sh(repo, "git", "commit", "-qm", "colab")
    return repo


def fresh_clone(source: Path, dest: Path) -> Path:
    """What the notebook finds after a disconnect: a new clone, no DVC outputs, no dvc.lock."""
    subprocess.run(["git", "clone", "-q", str(source), str(dest)], check=True)
    return dest


@pytest.mark.slow
def test_notebook_resumes_after_a_disconnect_and_skips_finished_stages(tmp_path):
    drive = tmp_path / "drive"
    first = project_checkout(tmp_path / "first")
    # The demo's 60 steps, checkpointed every 20; fewer samples and one LoRA (no training-seed
    # replicates: the e2e test covers them) keep the test short.
    overrides = {"sample.seeds": [0], "sample.lora_scales": [1.0], "replicates.count": 1}

    # 1. Run until the first checkpoint reaches "Drive", then kill the kernel and all it started.
    nb, client, env = execute_notebook(first, drive, overrides)
    failure = []

    def execute():
        try:
            client.execute(env=env)
        except BaseException as err:  # expected: the kernel dies (DeadKernelError) or the cell fails
            failure.append(err)

    worker = threading.Thread(target=execute)
    worker.start()
    log = wait_for_line(drive / "impressionist" / "logs", r"train: checkpoint \S+step-", worker, failure)
    kill_kernel_tree(client.km.provisioner.pid)
    worker.join(120)
    assert not worker.is_alive() and failure, "the killed run should fail"
    assert isinstance(failure[0], (CellExecutionError, DeadKernelError)), failure
    assert [s for s in DATA_STAGES if f"Running stage '{s}'" in log] == DATA_STAGES
    assert list((drive / "impressionist" / "checkpoints").glob("*/step-*"))
    assert "encode_text:" in (drive / "impressionist" / "state" / "dvc.lock").read_text()

    # 2. Rerun in a fresh clone (Colab's wiped disk): resume training, skip the data stages.
    second = fresh_clone(first, tmp_path / "second")
    nb, client, env = execute_notebook(second, drive, overrides)
    client.execute(env=env)
    text = outputs_text(nb)
    resumed = re.search(r"train: resuming from \.cache/checkpoints/[0-9a-f]+/step-(\d+) at step (\d+) of 60",
                        text)
    assert resumed, text[-3000:]
    assert int(resumed.group(1)) == int(resumed.group(2)) >= 20
    for stage in DATA_STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in text
        assert f"Running stage '{stage}'" not in text
    assert "Running stage 'evaluate'" in text
    eval_metrics = json.loads((second / "metrics/eval.json").read_text())
    train_metrics = json.loads((second / "metrics/train.json").read_text())
    assert train_metrics["steps"] == 60 and eval_metrics
    shown = [o for o in nb.cells[-1].outputs if "image/png" in o.get("data", {})]
    assert shown, "the last cell shows the sample grid"

    # 3. Once more after the run finished: everything comes from Drive, nothing runs.
    third = fresh_clone(first, tmp_path / "third")
    nb, client, env = execute_notebook(third, drive, overrides)
    client.execute(env=env)
    text = outputs_text(nb)
    assert "Running stage" not in text, text[-3000:]
    assert json.loads((third / "metrics/eval.json").read_text()) == eval_metrics
