"""The pull-request report on two commits of a throw-away git + DVC repository, and its workflow."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from impressionist import report
from impressionist.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = {
    "stages": {
        "evaluate": {
            "cmd": "python -m impressionist.evaluate",
            "params": ["evaluate"],
            "metrics": [{"metrics/eval.json": {"cache": False}}],
            "plots": [{"plots/samples_grid.png": {"cache": False}}],
        }
    }
}


def section(fid, kid_mean, kid_std, clip, style, n_fake=8):
    return {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std, "clip_score": clip, "style_score": style,
            "n_fake": n_fake, "kid_subset_size": n_fake}


# The base branch's metrics, and the pull request's: the LoRA's FID and KID went down (better), its
# CLIP score went down (worse), its style score went up (better); the base model is untouched.
BASE_METRICS = {
    "n_real": 6, "real": {"style_score": 0.25},
    "base": section(40.5, 0.5, 0.125, 30.5, 0.25),
    "lora_scale_1.0": section(20.5, 0.25, 0.0625, 31.5, 0.5),
    "lora": {**section(20.5, 0.25, 0.0625, 31.5, 0.5), "lora_scale": 1.0},
    "delta": {"fid": -20.0, "kid_mean": -0.25, "kid_std": -0.0625, "clip_score": 1.0, "style_score": 0.25},
}
PR_METRICS = {
    "n_real": 6, "real": {"style_score": 0.375},
    "base": section(40.5, 0.5, 0.125, 30.5, 0.25),
    "lora_scale_1.0": section(10.25, 0.125, 0.03125, 29.5, 0.75),
    "lora": {**section(10.25, 0.125, 0.03125, 29.5, 0.75), "lora_scale": 1.0},
    "delta": {"fid": -30.25, "kid_mean": -0.375, "kid_std": -0.09375, "clip_score": -1.0, "style_score": 0.5},
}


def env() -> dict[str, str]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    return dict(os.environ, PATH=path, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def sh(cwd: Path, *command: str) -> str:
    result = subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True)
    assert result.returncode == 0, f"{command}: {result.stdout}\n{result.stderr}"
    return result.stdout


def commit(repo: Path, metrics: dict, seed: int, message: str) -> None:
    (repo / "metrics" / "eval.json").write_text(json.dumps(metrics, indent=2))
    (repo / "params.yaml").write_text(yaml.safe_dump({"evaluate": {"seed": seed, "image_size": 299}}))
    Image.new("RGB", (8, 8), (seed * 40, 0, 0)).save(repo / "plots" / "samples_grid.png")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", message)


@pytest.fixture(scope="module")
def two_commits(tmp_path_factory) -> Path:
    """A git + DVC repository: branch `base` with BASE_METRICS, HEAD (a PR branch) with PR_METRICS."""
    repo = tmp_path_factory.mktemp("pr-repo")
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "dvc", "init", "-q")
    (repo / "metrics").mkdir()
    (repo / "plots").mkdir()
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    commit(repo, BASE_METRICS, 0, "base")
    sh(repo, "git", "branch", "base")
    sh(repo, "git", "checkout", "-qb", "pr")
    commit(repo, PR_METRICS, 1, "pr: another seed")
    return repo


def verdict_of(text: str, metric: str) -> str | None:
    found = re.findall(rf"^- `{re.escape(metric)}`: .*\*\*(\w+)\*\*", text, flags=re.M)
    assert len(found) <= 1, found
    return found[0] if found else None


def table_row(text: str, name: str) -> list[str] | None:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1] == name:
            return cells
    return None


def test_report_on_two_commits(two_commits, monkeypatch, capsys):
    monkeypatch.chdir(two_commits)
    report.main(["--base-rev", "base", "--out", "report.md"])
    assert "report.md" in capsys.readouterr().out
    text = (two_commits / "report.md").read_text()

    # dvc metrics diff rows: path, metric, base value, workspace value, change
    assert table_row(text, "lora.fid") == ["metrics/eval.json", "lora.fid", "20.5", "10.25", "-10.25"]
    assert table_row(text, "lora.clip_score")[2:4] == ["31.5", "29.5"]
    assert table_row(text, "real.style_score")[2:4] == ["0.25", "0.375"]
    assert table_row(text, "base.fid") is None  # unchanged: dvc leaves it out of the table
    # dvc params diff row
    assert table_row(text, "evaluate.seed") == ["params.yaml", "evaluate.seed", "0", "1"]

    # one verdict per directional metric, in the direction of each metric
    assert verdict_of(text, "lora.fid") == "better"
    assert verdict_of(text, "lora.kid_mean") == "better"
    assert verdict_of(text, "lora.clip_score") == "worse"
    assert verdict_of(text, "lora.style_score") == "better"
    assert verdict_of(text, "delta.fid") == "better"
    assert verdict_of(text, "delta.clip_score") == "worse"
    assert verdict_of(text, "base.fid") == "unchanged"
    assert verdict_of(text, "base.clip_score") == "unchanged"
    assert verdict_of(text, "lora_scale_1.0.style_score") == "better"
    # informational values get no verdict
    for metric in ("lora.kid_std", "lora.n_fake", "n_real", "real.style_score", "lora.lora_scale"):
        assert verdict_of(text, metric) is None, metric
    # 4 sections (lora, delta, base, lora_scale_1.0) x 4 directional metrics
    assert len(re.findall(r"^- `", text, flags=re.M)) == 16
    assert "9 better, 3 worse, 4 unchanged." in text

    # the grid, linked relative to the report
    assert "](plots/samples_grid.png)" in text


def test_report_links_grid_relative_to_the_report_or_by_url(two_commits, monkeypatch, tmp_path):
    monkeypatch.chdir(two_commits)
    grid = report.GRID
    assert "](../plots/samples_grid.png)" in report.grid_section(two_commits, grid, Path("reports/pr.md"), None)
    url = "https://github.com/o/r/blob/abc/plots/samples_grid.png?raw=true"
    assert f"]({url})" in report.grid_section(two_commits, grid, Path("report.md"), url)
    # a URL to a grid that is not committed would be a broken image: say so instead
    (two_commits / "plots" / "uncommitted.png").write_bytes((two_commits / grid).read_bytes())
    try:
        text = report.grid_section(two_commits, Path("plots/uncommitted.png"), Path("report.md"), url)
    finally:
        (two_commits / "plots" / "uncommitted.png").unlink()
    assert "not committed" in text and url not in text
    assert "No sample grid" in report.grid_section(two_commits, Path("plots/none.png"), Path("report.md"), None)


def test_report_against_itself_says_nothing_changed(two_commits, monkeypatch):
    monkeypatch.chdir(two_commits)
    text = report.build_report("HEAD")
    assert "_No metric changed._" in text and "_No param changed._" in text
    assert verdict_of(text, "lora.fid") == "unchanged"
    assert "16 unchanged." in text


def test_bad_input_is_one_line_and_writes_nothing(two_commits, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(two_commits)
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--base-rev", "no-such-branch", "--out", str(tmp_path / "r.md")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: base revision 'no-such-branch' is not known to git") and "\n" not in err
    assert "fetch-depth: 0" in err
    assert not (tmp_path / "r.md").exists()

    monkeypatch.chdir(tmp_path)  # no .dvc folder at or above a pytest tmp folder
    with pytest.raises(UserError, match="not inside a DVC repository"):
        report.build_report("main")


def test_verdict_directions():
    assert report.verdict("lora.fid", 2.0, 1.0) == "better"
    assert report.verdict("lora.kid_mean", 0.1, 0.2) == "worse"
    assert report.verdict("lora.clip_score", 30.0, 31.0) == "better"
    assert report.verdict("base.style_score", 0.5, 0.4) == "worse"
    assert report.verdict("lora_scale_0.5.fid", 1.0, 1.0) == "unchanged"
    assert report.verdict("lora.fid", None, 1.0) == "new"
    assert report.verdict("lora.fid", 1.0, None) == "removed"
    for informational in ("lora.kid_std", "n_real", "lora.n_fake", "real.style_score", "lora.lora_scale"):
        assert report.direction(informational) is None
    with pytest.raises(ValueError):
        report.verdict("lora.kid_std", 1.0, 2.0)


def test_workflow_runs_the_report_with_flags_it_accepts():
    workflow = yaml.safe_load((REPO / ".github/workflows/pr-report.yaml").read_text())
    assert "pull_request" in workflow[True]  # YAML 1.1 reads the key `on` as True
    steps = workflow["jobs"]["report"]["steps"]
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0
    scripts = "\n".join(s.get("run", "") for s in steps)
    assert "dvc pull" not in scripts  # everything the report reads is tracked by git
    command = next(line for line in scripts.replace("\\\n", " ").splitlines() if "impressionist.report" in line)
    words = shlex.split(command)
    flags = [w for w in words if w.startswith("--")]
    assert flags == ["--base-rev", "--image-url", "--out"]
    known = {option for action in report.build_parser()._actions for option in action.option_strings}
    assert set(flags) <= known
    assert words[words.index("--base-rev") + 1] == "origin/${{ github.base_ref }}"
    assert "gh pr comment" in scripts and "--body-file report.md" in scripts


def test_demo_networks_are_flagged_next_to_the_verdicts(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "model": {"pretrained": "black-forest-labs/FLUX.1-dev"},
        "evaluate": {"fid_features": "builtin:tiny", "clip_model": "ViT-L-14"}}))
    note = report.random_nets_note(tmp_path)
    assert "evaluate.fid_features=builtin:tiny" in note and "clip_model" not in note
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "model": {"pretrained": "black-forest-labs/FLUX.1-dev"},
        "evaluate": {"fid_features": "inception", "clip_model": "ViT-L-14"}}))
    assert report.random_nets_note(tmp_path) is None


def test_dvc_failures_and_a_missing_dvc_are_one_line(tmp_path, monkeypatch):
    """The shared dvc runner (report and Colab): DVC's own ERROR line, not its last hint line."""
    from impressionist import dvc_cli

    output = "Traceback (most recent call last):\nERROR: unexpected error - boom\n\nHaving any troubles? Hit us up\n"
    assert dvc_cli.error_line(output) == "ERROR: unexpected error - boom"
    assert dvc_cli.error_line("only this\n\n") == "only this"
    folder = tmp_path / "no-repo"
    folder.mkdir()
    with pytest.raises(UserError) as err:
        dvc_cli.run_dvc(folder, "status")  # not a DVC repository
    message = str(err.value)
    assert message.startswith("`dvc status` failed in ") and "ERROR: you are not inside of a DVC repository" in message
    assert "\n" not in message

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr("sys.executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(UserError, match="dvc is not installed; `pip install -r requirements.txt`"):
        dvc_cli.run_dvc(folder, "status")
