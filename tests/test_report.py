"""The pull-request report on two commits of a throw-away git + DVC repository, and its workflow."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from impressionist import report
from impressionist.errors import UserError
from impressionist.stats import Estimate, mean_estimate, paired_difference

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


N_SUBJECTS, SEEDS = 20, (0, 1)
KEYS = [(f"id{i:03d}", seed) for i in range(N_SUBJECTS) for seed in SEEDS]


def scores(rng, offset=0.0):
    """Per-image scores of one generated set: a subject effect shared by all revisions, plus noise."""
    subject = np.repeat(np.linspace(-2.0, 2.0, N_SUBJECTS), len(SEEDS))
    return {"clip_score": 25.0 + subject + rng.normal(0.0, 1.0, len(KEYS)) + offset,
            "style_score": 0.4 + 0.05 * subject + rng.normal(0.0, 0.05, len(KEYS)) + offset / 20}


def set_distance(value, half_width):
    return Estimate(value, value - half_width, value + half_width, len(KEYS))


def evaluation(seed: int, lora_offset: float = 0.0, kid=(0.5, 0.3), eval_set="set-1"):
    """(eval.json, eval_images.csv text) as the evaluate stage writes them, for a base model and a LoRA
    at scale 1.0. ``lora_offset`` plants a real improvement of the LoRA's per-image scores; ``kid``
    gives (base, LoRA) KID values, each with a CI of ±0.05."""
    rng = np.random.default_rng(seed)
    per_scale = {0.0: scores(np.random.default_rng(1000)), 1.0: scores(rng, 1.0 + lora_offset)}
    clusters = [k[0] for k in KEYS]
    metrics = {"n_real": 30, "real": {**mean_estimate([0.5, 0.6, 0.7]).as_keys("style_score")}}
    for section, scale, kid_value in (("base", 0.0, kid[0]), ("lora", 1.0, kid[1])):
        values = {}
        for name in ("clip_score", "style_score"):
            values.update(mean_estimate(per_scale[scale][name], clusters).as_keys(name))
        values.update(set_distance(kid_value, 0.05).as_keys("kid"))
        values.update(set_distance(kid_value * 2, 0.1).as_keys("cmmd"))
        values.update(fid=100.0 * kid_value + seed, fid_n=len(KEYS))
        metrics[section] = values
    metrics["lora"]["lora_scale"] = 1.0
    metrics["delta"] = {}
    for name in ("clip_score", "style_score"):
        metrics["delta"].update(paired_difference(per_scale[0.0][name], per_scale[1.0][name], clusters).as_keys(name))
    for name in ("kid", "cmmd"):
        value = metrics["lora"][name] - metrics["base"][name]
        metrics["delta"].update(set_distance(value, 0.03).as_keys(name))
    rows = [{"lora_scale": scale, "prompt_id": key[0], "seed": key[1], "subject": f"subject {key[0]}",
             "clip_score": per_scale[scale]["clip_score"][i], "style_score": per_scale[scale]["style_score"][i],
             "eval_set": eval_set} for scale in per_scale for i, key in enumerate(KEYS)]
    return metrics, pd.DataFrame(rows).to_csv(index=False)


# The base branch's evaluation, and pull requests': another LoRA seed only (noise), a planted real
# improvement (per-image scores +2, KID well below), and one measured on another evaluation set.
BASE_EVAL = evaluation(seed=0)
NOISE_EVAL = evaluation(seed=1)
BETTER_EVAL = evaluation(seed=2, lora_offset=2.0, kid=(0.5, 0.1))
OTHER_SET_EVAL = evaluation(seed=3, lora_offset=2.0, eval_set="set-2")


def env() -> dict[str, str]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    return dict(os.environ, PATH=path, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def sh(cwd: Path, *command: str) -> str:
    result = subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True)
    assert result.returncode == 0, f"{command}: {result.stdout}\n{result.stderr}"
    return result.stdout


def commit(repo: Path, evaluated: tuple[dict, str], seed: int, message: str) -> None:
    metrics, images = evaluated
    (repo / "metrics" / "eval.json").write_text(json.dumps(metrics, indent=2))
    (repo / "metrics" / "eval_images.csv").write_text(images)
    (repo / "params.yaml").write_text(yaml.safe_dump({"evaluate": {"seed": seed, "image_size": 299}}))
    Image.new("RGB", (8, 8), (seed * 40, 0, 0)).save(repo / "plots" / "samples_grid.png")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", message)


@pytest.fixture(scope="module")
def two_commits(tmp_path_factory) -> Path:
    """A git + DVC repository: branch `base` with BASE_EVAL; branches `noise`, `better` and `other-set`
    with the pull requests' evaluations; HEAD at `noise` (another seed, nothing else)."""
    repo = tmp_path_factory.mktemp("pr-repo")
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "dvc", "init", "-q")
    (repo / "metrics").mkdir()
    (repo / "plots").mkdir()
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    commit(repo, BASE_EVAL, 0, "base")
    sh(repo, "git", "branch", "base")
    for branch, evaluated, seed in (("better", BETTER_EVAL, 2), ("other-set", OTHER_SET_EVAL, 3),
                                    ("noise", NOISE_EVAL, 1)):
        sh(repo, "git", "checkout", "-q", "-b", branch, "base")
        commit(repo, evaluated, seed, f"pr: {branch}")
    return repo


def verdict_line(text: str, metric: str) -> str | None:
    found = [line for line in text.splitlines() if line.startswith(f"- `{metric}`:")]
    assert len(found) <= 1, found
    return found[0] if found else None


def verdict_of(text: str, metric: str) -> str | None:
    found = re.findall(rf"^- `{re.escape(metric)}`: .*\*\*([\w ]+)\*\*", text, flags=re.M)
    assert len(found) <= 1, found
    return found[0] if found else None


def table_row(text: str, name: str) -> list[str] | None:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1] == name:
            return cells
    return None


JUDGED = [f"{section}.{name}" for section in ("lora", "delta", "base")
          for name in ("kid", "cmmd", "clip_score", "style_score")]


def test_noise_alone_is_no_significant_change_for_every_metric(two_commits, monkeypatch, capsys):
    monkeypatch.chdir(two_commits)
    sh(two_commits, "git", "checkout", "-q", "noise")
    report.main(["--base-rev", "base", "--out", "report.md", "--weight-level"])
    assert "report.md" in capsys.readouterr().out
    text = (two_commits / "report.md").read_text()

    # the raw numbers did move (dvc metrics diff rows: path, metric, base value, workspace value, change)
    old, new = BASE_EVAL[0]["lora"]["clip_score"], NOISE_EVAL[0]["lora"]["clip_score"]
    shown = [float(x) for x in table_row(text, "lora.clip_score")[2:4]]
    assert abs(old - new) > 0.01 and shown == pytest.approx([old, new], abs=1e-5)
    assert table_row(text, "evaluate.seed") == ["params.yaml", "evaluate.seed", "0", "1"]
    # ... but no verdict calls noise a change
    for metric in JUDGED:
        assert verdict_of(text, metric) == "no significant change", verdict_line(text, metric)
    assert "12 no significant change, 2 not judged." in text or "12 no significant change." in text
    line = verdict_line(text, "lora.clip_score")
    assert f"paired bootstrap over {len(KEYS)} (subject, seed) pairs, {N_SUBJECTS} subjects" in line
    assert "CI [" in line and "**no significant change**" in line
    assert "unpaired" in verdict_line(text, "lora.kid")
    # FID is shown, never judged; intervals, counts and the paintings get no verdict
    assert verdict_of(text, "lora.fid") is None and table_row(text, "lora.fid") is not None
    for metric in ("lora.kid_ci_low", "lora.clip_score_n", "n_real", "real.style_score", "lora.lora_scale"):
        assert verdict_of(text, metric) is None, metric
    assert "confidence interval of the change excludes zero. The intervals are at 99.58% each" in text
    assert "all 12 verdicts together aim to call noise a change with at most 5% chance (Bonferroni;" in text
    assert "not training noise: a verdict is about these weights" in text
    assert "per-image scores paired image by image" in text
    assert "](plots/samples_grid.png)" in text


def test_a_planted_improvement_is_better_with_its_ci(two_commits, monkeypatch):
    monkeypatch.chdir(two_commits)
    sh(two_commits, "git", "checkout", "-q", "better")
    text = report.build_report("base", weight_level_verdicts=True)
    for metric in ("lora.clip_score", "lora.style_score", "delta.clip_score", "delta.style_score",
                   "lora.kid", "lora.cmmd", "delta.kid", "delta.cmmd"):
        assert verdict_of(text, metric) == "better", verdict_line(text, metric)
    line = verdict_line(text, "lora.clip_score")
    low, high = (float(x) for x in re.search(r"CI \[([-+\d.e]+), ([-+\d.e]+)\]", line).groups())
    assert 0 < low < 2.0 < high  # the planted +2 lies inside its interval
    for metric in ("base.clip_score", "base.kid"):  # the base model did not change
        assert verdict_of(text, metric) == "no significant change"


def test_one_replicate_gives_no_recipe_verdict_unless_weight_level_is_asked(two_commits, monkeypatch):
    monkeypatch.chdir(two_commits)
    sh(two_commits, "git", "checkout", "-q", "better")
    text = report.build_report("base")  # R = 1 on both sides: a planted +2 is not a recipe verdict
    for metric in JUDGED:
        section = metric.partition(".")[0]
        if section == "base":  # the base model has no training noise: judged as before
            assert verdict_of(text, metric) == "no significant change", verdict_line(text, metric)
        else:
            assert verdict_of(text, metric) == "not judged", verdict_line(text, metric)
            assert "training noise is unmeasured" in verdict_line(text, metric)
    assert "**These verdicts are about these weights, not the recipe:** training noise is unmeasured" in text
    assert "better" not in summary_line(text) and "worse" not in summary_line(text)
    assert "all 4 verdicts together" in text  # Bonferroni over what is judged
    flagged = report.build_report("base", weight_level_verdicts=True)
    assert verdict_of(flagged, "lora.clip_score") == "better"
    assert "Weight-level verdicts were asked for (`--weight-level`)" in flagged


def summary_line(text: str) -> str:
    """The verdict count line under the Verdicts heading."""
    lines = text.split("### Verdicts", 1)[1].splitlines()
    return next(line for line in lines if "no significant change" in line and line.endswith("."))


def test_other_evaluation_sets_are_not_paired_and_say_so(two_commits, monkeypatch):
    monkeypatch.chdir(two_commits)
    sh(two_commits, "git", "checkout", "-q", "other-set")
    text = report.build_report("base", weight_level_verdicts=True)
    line = verdict_line(text, "lora.clip_score")
    assert "unpaired" in line and "not paired: the evaluation sets differ" in line
    assert "per-image scores not paired: the evaluation sets differ" in text


def test_the_report_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import impressionist.report"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


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
    sh(two_commits, "git", "checkout", "-q", "noise")
    text = report.build_report("HEAD", weight_level_verdicts=True)
    assert "_No metric changed._" in text and "_No param changed._" in text
    assert verdict_of(text, "lora.clip_score") == "no significant change"
    assert "change +0, CI [+0, +0]" in verdict_line(text, "lora.clip_score")
    assert "12 no significant change." in text


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
    up, down, across = Estimate(1.0, 0.5, 1.5, 10), Estimate(-1.0, -1.5, -0.5, 10), Estimate(0.1, -0.4, 0.6, 10)
    assert report.word_for("lora.kid", down) == "better"
    assert report.word_for("lora.cmmd", up) == "worse"
    assert report.word_for("lora.clip_score", up) == "better"
    assert report.word_for("base.style_score", down) == "worse"
    assert report.word_for("delta.clip_score", across) == "no significant change"
    for informational in ("lora.fid", "lora.kid_ci_low", "n_real", "lora.clip_score_n", "real.style_score",
                          "lora.lora_scale"):
        assert report.direction(informational) is None
    with pytest.raises(ValueError):
        report.word_for("lora.fid", up)
    diff = {report.EVAL_METRICS: {"lora.kid": {"old": None, "new": 0.1}, "lora.cmmd": {"old": 0.2, "new": None},
                                  "lora.clip_score": {"old": 20.0, "new": 21.0}}}
    words = {v.metric: v.word for v in report.verdicts(diff)}
    assert words == {"lora.kid": "new", "lora.cmmd": "removed", "lora.clip_score": "not judged"}


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
