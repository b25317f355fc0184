"""The whole DVC graph on the demo profile (with its two training replicates), in a throw-away git repository.

Slow (about two minutes): it runs every stage for real, then checks what DVC re-runs after a
change, that metrics diff, and that push / clone / pull restores the outputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import committed_params_text

from impressionist.cli import apply_overrides, demo_overrides
from impressionist.tiny_vlm import BUILDER_VERSION

REPO = Path(__file__).resolve().parents[1]
ALL_STAGES = ["download", "filter", "describe", "caption", "encode_latents", "encode_text", "train",
              "train_replicates", "export", "sample_base", "sample", "sample_replicates", "reference", "evaluate"]
pytestmark = pytest.mark.slow


def env() -> dict[str, str]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    return dict(os.environ, PATH=path, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def sh(cwd: Path, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def copy_project(dest: Path, params_overrides: dict | None = None, remote: Path | None = None) -> Path:
    """A fresh git repository holding the project's tracked files (what a clone would have)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    params = apply_overrides(yaml.safe_load(committed_params_text()), params_overrides or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(dest, "git", "init", "-q")
    if remote:
        sh(dest, "dvc", "remote", "modify", "local", "url", str(remote))
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "init")
    return dest


def set_param(repo: Path, dotted: str, value) -> None:
    params = apply_overrides(yaml.safe_load((repo / "params.yaml").read_text()), {dotted: value})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_demo_graph_reruns_only_what_changed_and_round_trips_through_the_remote(tmp_path):
    remote = tmp_path / "remote"
    repo = copy_project((tmp_path / "repo"), demo_overrides(REPO / "configs/demo.yaml"), remote)
    first = sh(repo, "dvc", "repro")
    assert sorted(ran_stages(first.stdout)) == sorted(ALL_STAGES)
    for out in ("metrics/data.json", "metrics/train.json", "metrics/eval.json", "metrics/eval_images.csv",
                "plots/samples_grid.png", "plots/loss.png", "plots/eval_vs_scale.csv",
                "data/reference/features.safetensors", "models/lora/pytorch_lora_weights.safetensors"):
        assert (repo / out).is_file(), out
    # the CI-band data plot renders through DVC with the project's template (what `dvc plots diff`
    # overlays per revision)
    shown = json.loads(sh(repo, "dvc", "plots", "show", "--json", "plots/eval_vs_scale.csv").stdout)
    spec = shown["data"]["plots/eval_vs_scale.csv"][0]["content"]
    assert spec["facet"]["column"]["field"] == "metric"
    band = spec["spec"]["layer"][0]["encoding"]
    assert (band["y"]["field"], band["y2"]["field"], band["x"]["field"]) == ("ci_low", "ci_high", "lora_scale")
    points = spec["data"]["values"]
    assert {p["metric"] for p in points} == {"clip_score", "style_score", "kid", "cmmd"}
    assert all(float(p["ci_low"]) <= float(p["ci_high"]) for p in points)
    # replicates.count: 2 (the demo): a second LoRA from a derived seed, its evaluation set, and
    # recipe sections whose intervals cover the training seeds
    assert (repo / "models/replicates/1/pytorch_lora_weights.safetensors").is_file()
    assert json.loads((repo / "models/replicates/replicates.json").read_text())["count"] == 2
    assert (repo / "samples/replicates/1/eval.csv").is_file()
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert metrics["replicates"]["count"] == 2 and metrics["recipe"]["replicates"] == 2
    assert metrics["recipe"]["_covers"] == "images, subjects, training seeds"
    assert metrics["lora"]["_covers"] == "images, subjects"
    replicates = (repo / "metrics/eval_replicates.csv").read_text().splitlines()
    # Training moves the samples measurably: the recipe's CMMD to the real paintings falls with an
    # interval (images, subjects, training seeds) below 0, and every show-set image at LoRA scale 1
    # differs from the base model's image of the same prompt and seed. (The demo's run of
    # 2026-12-04: CMMD delta -0.041 [-0.068, -0.014], n = 16, R = 2; mean absolute pixel difference
    # 0.040-0.054 of full scale. Measurable, not striking: the tiny model's random VAE decoder
    # dominates what the images look like, so a person barely sees it in the grid.)
    assert metrics["recipe_delta"]["cmmd_ci_high"] < 0, metrics["recipe_delta"]
    assert min(show_set_pixel_differences(repo)) > 0.02
    assert {line.split(",")[0] for line in replicates[1:]} == {"0", "1"}
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "demo run")

    assert ran_stages(sh(repo, "dvc", "repro").stdout) == []
    set_param(repo, "encode.dataloader_workers", 0)  # changes how fast, not what, is cached
    assert ran_stages(sh(repo, "dvc", "repro").stdout) == []

    set_param(repo, "lora.rank", 8)
    rerun = sh(repo, "dvc", "repro")
    # neither the real paintings' features nor the base-model samples are recomputed
    assert ran_stages(rerun.stdout) == ["train", "train_replicates", "export", "sample", "sample_replicates",
                                        "evaluate"]

    diff = sh(repo, "dvc", "metrics", "diff", "--md").stdout
    for row in ("lora.kid", "lora.cmmd", "lora.clip_score", "lora.clip_score_ci_low", "delta.style_score",
                "recipe.style_score", "recipe_delta.kid"):
        assert re.search(rf"\|\s*metrics/eval.json\s*\|\s*{re.escape(row)}\s*\|", diff), (row, diff)
    assert "base.fid" not in diff and "base.kid" not in diff  # the base-model samples were not regenerated
    assert "real.style_score" not in diff  # nor the real paintings' features

    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "rank 8")
    sh(repo, "dvc", "push")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "dvc", "pull")
    status = sh(clone, "dvc", "status").stdout
    assert "Data and pipelines are up to date" in status, status
    assert (clone / "models/lora/pytorch_lora_weights.safetensors").read_bytes() == \
        (repo / "models/lora/pytorch_lora_weights.safetensors").read_bytes()

    # A caption-template edit re-encodes only the text: no describe, no VAE. (Reproduced up to
    # encode_text only, to keep the suite short: `dvc status` then names the stages that read the
    # new captions or text cache, which a full repro would run, and encode_latents is not one.)
    set_param(repo, "caption.template", "{trigger}: {description}, painted by {artist}")
    ran = ran_stages(sh(repo, "dvc", "repro", "encode_text").stdout)
    assert ran == ["caption", "encode_text"], ran
    status = json.loads(sh(repo, "dvc", "status", "--json").stdout)
    assert set(status) == {"train", "train_replicates", "sample_base", "sample", "sample_replicates"}, status
    # The demo's descriptions give more distinct captions than the template alone on the same images.
    stats = json.loads((repo / "metrics/captions.json").read_text())
    assert stats["distinct_captions"] > stats["distinct_template_only"], stats
    assert json.loads((repo / "metrics/describe.json").read_text())["synthetic_model"] is True
    # Another captioner (the same tiny VLM named by its folder) re-runs describe; the captions it
    # gives are the same, so nothing after caption runs.
    set_param(repo, "describe.model", str(Path(os.environ["IMPRESSIONIST_CACHE"]) / f"tiny-vlm-v{BUILDER_VERSION}"))
    ran = ran_stages(sh(repo, "dvc", "repro", "encode_text").stdout)
    assert ran == ["describe", "caption"], ran


def show_set_pixel_differences(repo: Path) -> list[float]:
    """Mean absolute difference (0-1 scale) between each base show-set image and the LoRA's at scale 1."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    base, lora = (pd.read_csv(repo / f"samples/{kind}/samples.csv") for kind in ("base", "lora"))
    lora = lora[lora["lora_scale"] == 1.0].set_index(["prompt", "seed"])["file"]
    differences = []
    for row in base.itertuples():
        pair = [np.asarray(Image.open(path).convert("RGB"), dtype=float) / 255
                for path in (repo / "samples/base" / row.file, repo / "samples/lora" / lora[(row.prompt, row.seed)])]
        differences.append(float(np.abs(pair[0] - pair[1]).mean()))
    assert len(differences) == len(base) > 0
    return differences


def test_demo_refuses_unknown_options(capsys):
    from impressionist import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--dry-rn"])  # a typo must not start a full run
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --dry-rn" in capsys.readouterr().err


def test_real_recipe_without_network_stops_at_download_with_one_line(tmp_path):
    repo = copy_project(tmp_path / "repo")
    environment = dict(env(), HF_HUB_OFFLINE="1")
    result = subprocess.run(["dvc", "repro"], cwd=repo, env=environment, capture_output=True, text=True)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "huggan/wikiart" in errors[0] and "impressionist demo" in errors[0]
    assert not (repo / "data/raw").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_recipe_without_gpu_stops_at_encode_with_one_line(tmp_path):
    overrides = {k: v for k, v in demo_overrides(REPO / "configs/demo.yaml").items() if k != "model.device"}
    repo = copy_project(tmp_path / "repo", overrides)
    result = sh(repo, "dvc", "repro", "encode_latents", check=False)
    assert result.returncode != 0
    assert ran_stages(result.stdout) == ["download", "filter", "encode_latents"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no CUDA GPU" in errors[0], result.stderr
    assert not (repo / "data/cache").exists()
