"""Publishing: the dry run writes exactly what an upload sends, the card carries the metadata and
the metrics, the token never lands in a file, and no network means one clear error and nothing made.

The Hub is unreachable here: the upload path runs against a recording stand-in for HfApi's four
calls; everything else (card, folder, token lookup) is the real code."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from helpers import train_tiny_lora

from impressionist import export, publish
from impressionist.errors import UserError

from helpers import committed_params_text

SECRET = "hf_TestTokenThatMustNeverBeWritten123"
REPO = "someone/impressionist-flux-lora"


def _section(clip, style, kid, cmmd, fid, n=8, width=0.5):
    out = {"fid": fid, "fid_n": n}
    for name, value in (("clip_score", clip), ("style_score", style), ("kid", kid), ("cmmd", cmmd)):
        out.update({name: value, f"{name}_ci_low": value - width * abs(value), f"{name}_ci_high": value + width * abs(value),
                    f"{name}_n": n})
    return out


EVAL = {"n_real": 6, "real": {"style_score": 0.25, "style_score_ci_low": 0.125, "style_score_ci_high": 0.375,
                              "style_score_n": 6},
        "base": _section(28.5, 0.125, 0.0625, 1.5, 101.5),
        "lora_scale_0.5": _section(29.25, 0.375, 0.05, 1.25, 88.25),
        "lora": {**_section(30.5, 0.5, 0.0375, 1.0, 77.75), "lora_scale": 1.0},
        # the style score's change is significant (its interval excludes 0), the others are not
        "delta": {**_section(2.0, 0.375, -0.025, -0.5, 0.0, width=2.0),
                  "style_score_ci_low": 0.25, "style_score_ci_high": 0.5}}


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory, _demo_params_master, encoded_cache):
    """What train, export, sample and evaluate leave: a real trained + exported LoRA, and a grid
    and eval.json written here (their content is copied, not interpreted, by publish)."""
    root = tmp_path_factory.mktemp("publish-inputs")
    train_tiny_lora(root, _demo_params_master, encoded_cache, lora=dict(rank=4, alpha=4), steps=2,
                    learning_rate=None)
    export.run(copy.deepcopy(_demo_params_master), root / "lora", root / "export")
    Image.new("RGB", (64, 32), (200, 120, 40)).save(root / "grid.png")
    (root / "eval.json").write_text(json.dumps(EVAL))
    (root / "data.json").write_text(json.dumps({"train": 29, "val": 6}))
    return dict(lora_dir=root / "lora", export_dir=root / "export", grid=root / "grid.png",
                eval_metrics=root / "eval.json", data_metrics=root / "data.json")


@pytest.fixture
def recipe_params():
    """The committed real recipe (FLUX.1-dev, huggan/wikiart)."""
    return yaml.safe_load(committed_params_text())


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records calls; ``fail`` names a call that raises."""

    def __init__(self, fail: str | None = None, error: Exception | None = None):
        self.calls, self.fail, self.error, self.uploaded = [], fail, error, {}

    def __call__(self, *args, **kwargs):  # HfApi() -> this recorder
        return self

    def _call(self, name, **kwargs):
        self.calls.append((name, kwargs))
        if name == self.fail:
            raise self.error

    def whoami(self, token=None):
        self._call("whoami", token=token)
        return {"name": "someone"}

    def repo_exists(self, repo_id, token=None):
        self._call("repo_exists", repo_id=repo_id, token=token)
        return False

    def create_repo(self, repo_id, private=None, exist_ok=False, token=None):
        self._call("create_repo", repo_id=repo_id, private=private, token=token)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, token=None, commit_message=None):
        self._call("upload_folder", repo_id=repo_id, token=token)
        self.uploaded = {str(p.relative_to(folder_path)): p.read_bytes()
                         for p in Path(folder_path).rglob("*") if p.is_file()}

    def delete_repo(self, repo_id, token=None, missing_ok=False):
        self._call("delete_repo", repo_id=repo_id, token=token)

    def names(self):
        return [name for name, _ in self.calls]


def online(monkeypatch):
    """HF_HUB_OFFLINE unset, also where huggingface_hub read it at import (a test run with it set)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_dry_run_writes_the_folder_and_card_offline(demo_params, artefacts, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    hub = RecordingHub()
    monkeypatch.setattr("huggingface_hub.HfApi", hub)
    out = tmp_path / "hub"
    files = publish.run(demo_params, REPO, dry_run=True, out=out, **artefacts)
    assert hub.calls == []  # a dry run talks to nobody
    assert files == sorted(["README.md", "images/samples_grid.png", export.KOHYA_FILE,
                            "pytorch_lora_weights.safetensors"])
    written = folder_bytes(out)
    assert sorted(written) == files
    # the export's scale-1 file (alpha/r baked in), not the trained one
    assert written["pytorch_lora_weights.safetensors"] == (artefacts["export_dir"] / "pytorch_lora_weights.safetensors").read_bytes()
    assert written[export.KOHYA_FILE] == (artefacts["export_dir"] / export.KOHYA_FILE).read_bytes()
    assert not any(SECRET.encode() in blob for blob in written.values())

    card = ModelCard.load(out / "README.md")
    assert card.data.license == "other"
    assert card.data.license_name == "flux-1-dev-non-commercial-license"
    assert card.data.license_link.endswith("black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md")
    assert card.data.instance_prompt == demo_params["caption"]["trigger"]
    assert {"lora", "flux", "text-to-image"} <= set(card.data.tags)
    assert card.data.base_model is None  # builtin:tiny-flux is not a Hub model
    text = card.text
    assert "| base model | 28.5 [14.25, 42.75] | 0.125 [0.0625, 0.1875] | 0.0625 [0.03125, 0.09375] | " \
           "1.5 [0.75, 2.25] | 101.5 | 8 |" in text
    assert "| LoRA × 0.5 | 29.25 [" in text and "| LoRA × 1 | 30.5 [15.25, 45.75] |" in text
    assert "| change (LoRA − base, paired) | 2 [-2, 6] | 0.375 [0.25, 0.5] |" in text
    assert "8 generated images per row" in text and "against 6 held-out paintings" in text
    assert "significant (its interval excludes 0) for: style_score." in text
    assert "biased upwards below ~2000 images" in text
    assert "SYNTHETIC" in text and "Offline demo artefact" in text
    assert "| LoRA rank / alpha | 4 / 4 |" in text and "| steps | 2 |" in text
    assert f'load_lora_weights("{REPO}"' in text and "images/samples_grid.png" in text


def test_card_for_the_real_recipe(recipe_params, artefacts, tmp_path):
    from huggingface_hub import ModelCard

    training = json.loads((artefacts["lora_dir"] / "training_config.json").read_text())
    training["base_model"] = recipe_params["model"]["pretrained"]  # as a FLUX.1-dev run records it
    card = publish.build_card(repo_id=REPO, params=recipe_params, training=training, metrics=EVAL,
                              publish=publish.publish_params(recipe_params, REPO),
                              lora_file="pytorch_lora_weights.safetensors",
                              kohya_file=export.KOHYA_FILE, grid_file="images/samples_grid.png",
                              data_metrics={"train": 12345})
    card.save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "black-forest-labs/FLUX.1-dev"
    assert card.data.datasets == ["huggan/wikiart"]
    assert "12345 paintings of the WikiArt style *Impressionism*" in card.text
    assert "research use" in card.text and "SYNTHETIC" not in card.text
    assert "mean nothing" not in card.text  # real feature networks: no demo warning


def test_upload_sends_exactly_the_dry_run_folder(recipe_params, artefacts, tmp_path, monkeypatch):
    online(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    hub = RecordingHub()
    monkeypatch.setattr("huggingface_hub.HfApi", hub)
    recipe_params["publish"] = {"repo_id": REPO, "private": False}
    url = publish.run(recipe_params, **artefacts)
    assert url == f"https://huggingface.co/{REPO}"
    assert hub.names() == ["whoami", "repo_exists", "create_repo", "upload_folder"]
    assert all(kwargs["token"] == SECRET for _, kwargs in hub.calls)  # from the environment
    assert dict(hub.calls)["create_repo"]["private"] is False
    publish.run(recipe_params, dry_run=True, out=tmp_path / "dry", **artefacts)
    assert hub.uploaded == folder_bytes(tmp_path / "dry")
    assert not any(SECRET.encode() in blob for blob in hub.uploaded.values())


@pytest.mark.parametrize("case", ["offline", "unreachable", "no-token"])
def test_no_network_or_token_is_one_error_before_anything(case, recipe_params, artefacts, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    online(monkeypatch)
    hub = RecordingHub()
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        expected = "HF_HUB_OFFLINE is set"
    elif case == "unreachable":
        import httpx

        hub = RecordingHub(fail="whoami", error=httpx.ConnectError("[Errno -3] name resolution"))
        expected = "cannot reach the Hugging Face Hub"
    else:
        monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
        expected = "no Hugging Face token"
    monkeypatch.setattr("huggingface_hub.HfApi", hub)
    with pytest.raises(UserError, match=expected) as info:
        publish.run(recipe_params, REPO, **artefacts)
    assert "\n" not in str(info.value) and SECRET not in str(info.value)
    assert not {"create_repo", "upload_folder"} & set(hub.names())
    assert SECRET not in capsys.readouterr().out


def test_failed_upload_removes_the_repo_it_created(recipe_params, artefacts, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    online(monkeypatch)
    hub = RecordingHub(fail="upload_folder", error=ConnectionError("reset by peer"))
    monkeypatch.setattr("huggingface_hub.HfApi", hub)
    with pytest.raises(UserError, match="nothing was committed"):
        publish.run(recipe_params, REPO, **artefacts)
    assert hub.names()[-2:] == ["upload_folder", "delete_repo"]


def test_refusals(demo_params, recipe_params, artefacts, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hub"
    demo_params["publish"] = {"repo_id": REPO, "hf_token": SECRET}
    with pytest.raises(UserError, match="never put a Hugging Face token in params") as info:
        publish.run(demo_params, dry_run=True, out=out, **artefacts)
    assert SECRET not in str(info.value)
    del demo_params["publish"]
    with pytest.raises(UserError, match="--repo-id"):
        publish.run(demo_params, dry_run=True, out=out, **artefacts)
    with pytest.raises(UserError, match="not a valid Hub repo id"):
        publish.run(demo_params, "some one/x..y", dry_run=True, out=out, **artefacts)
    with pytest.raises(UserError, match="needs a namespace"):
        publish.run(demo_params, "lonely-name", dry_run=True, out=out, **artefacts)
    missing_eval = dict(artefacts, eval_metrics=tmp_path / "nope.json")
    with pytest.raises(UserError, match="dvc repro evaluate"):
        publish.run(demo_params, REPO, dry_run=True, out=out, **missing_eval)
    with pytest.raises(UserError, match="dvc repro export"):
        publish.run(demo_params, REPO, dry_run=True, out=out, **dict(artefacts, export_dir=tmp_path))
    hub = RecordingHub()
    monkeypatch.setattr("huggingface_hub.HfApi", hub)
    with pytest.raises(UserError, match="offline demo's random-weight model"):
        publish.run(demo_params, REPO, **artefacts)  # a tiny-model LoRA is not for the Hub
    assert hub.calls == [] and not out.exists()

    with pytest.raises(SystemExit) as exit_info:
        publish.main(["--params", str(tmp_path / "missing.yaml"), "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: params file") and "\n" not in err


@pytest.mark.parametrize("name, text, needle", [
    ("export.json", "{not json", "export.json is not readable JSON"),
    ("export.json", '{"rank": 4}', "export.json lacks kohya_file; run `dvc repro export` again"),
    ("eval.json", "[1, 2]", "eval.json holds a JSON list, not an object; run `dvc repro evaluate` again"),
])
def test_broken_stage_outputs_are_one_line(demo_params, artefacts, tmp_path, name, text, needle):
    broken = dict(artefacts)
    if name == "export.json":
        broken["export_dir"] = tmp_path / "export"
        shutil.copytree(artefacts["export_dir"], broken["export_dir"])
        (broken["export_dir"] / name).write_text(text)
    else:
        broken["eval_metrics"] = tmp_path / name
        broken["eval_metrics"].write_text(text)
    with pytest.raises(UserError, match=needle) as info:
        publish.run(demo_params, REPO, dry_run=True, out=tmp_path / "hub", **broken)
    assert "\n" not in str(info.value) and not (tmp_path / "hub").exists()


@pytest.mark.parametrize("value", ["1", "ON", "yes", "True", "0", "", "off"])
def test_hub_offline_reads_the_variable_as_huggingface_hub_does(value, monkeypatch):
    """One reading of HF_HUB_OFFLINE for download, publish and models: the values huggingface_hub
    itself takes as true (its ENV_VARS_TRUE_VALUES), "on" included."""
    from huggingface_hub import constants

    from impressionist.hub import hub_offline

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() == (value.upper() in constants.ENV_VARS_TRUE_VALUES)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # set when huggingface_hub was imported
    assert hub_offline()


def test_card_says_what_each_interval_covers_and_shows_the_recipe_rows():
    from impressionist.model_card import evaluation_note, metrics_table

    one = evaluation_note(EVAL, 0.95)
    assert "cover images and subjects, not training noise" in one and "`replicates.count` ≥ 2" in one
    assert "recipe" not in metrics_table(EVAL)
    recipe = {**_section(30.0, 0.45, 0.04, 1.1, 0.0), "lora_scale": 1.0, "replicates": 3,
              "_covers": "images, subjects, training seeds"}
    with_replicates = {**EVAL, "replicates": {"count": 3}, "recipe": recipe,
                       "recipe_delta": {**_section(1.5, 0.3, -0.02, -0.4, 0.0), "replicates": 3}}
    table = metrics_table(with_replicates)
    assert "| recipe: LoRA × 1, mean of 3 training seeds | 30 [15, 45] |" in table
    assert "| recipe change (recipe − base) | 1.5 [" in table
    note = evaluation_note(with_replicates, 0.95)
    assert "about this LoRA's weights" in note and "average 3 LoRAs" in note and "also cover training seeds" in note
