"""The base model is pinned: a Hub revision is resolved to its commit when a stage loads the model,
that snapshot is what loads, the commit is recorded and fingerprinted (encode cache, run hash), and
`impressionist pin-model` writes it into params.yaml. The Hub is a real Hugging Face cache layout in
a temporary folder (huggingface_hub reads it offline) plus a stand-in for the Hub API's answer."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import committed_params_text, write_filtered_dataset
from huggingface_hub import HfApi, constants

from impressionist import encode, pin_model, train
from impressionist.errors import UserError
from impressionist.models import base_model_of_cache, folder_digest, resolve_base_model, resolve_pretrained
from impressionist.params.model import BUILTIN_TINY_FLUX

REPO_ID = "someone/tiny-flux"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


class FakeHub:
    """A Hugging Face cache holding snapshots of the tiny model, and the Hub's answer for `main`."""

    def __init__(self, root: Path, tiny_flux_dir: str, monkeypatch):
        self.storage = root / f"models--{REPO_ID.replace('/', '--')}"
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
        self.monkeypatch, self.tiny, self.asked = monkeypatch, tiny_flux_dir, []

    def add_snapshot(self, commit: str, changed: bool = False) -> Path:
        folder = self.storage / "snapshots" / commit
        shutil.copytree(self.tiny, folder)
        if changed:  # another commit, other contents
            (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"changed": commit}))
        return folder

    def set_ref(self, commit: str, ref: str = "main") -> None:
        (self.storage / "refs").mkdir(parents=True, exist_ok=True)
        (self.storage / "refs" / ref).write_text(commit)

    def offline(self) -> None:
        self.monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def online(self, main_is: str) -> None:
        """The Hub is reachable and says `main` is ``main_is`` (no request leaves the machine)."""
        self.monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        self.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

        def repo_info(api, repo_id, *, revision=None, **kwargs):
            self.asked.append((repo_id, revision))
            return SimpleNamespace(sha=main_is if revision in (None, "main") else revision)

        self.monkeypatch.setattr(HfApi, "repo_info", repo_info)


@pytest.fixture
def hub(tmp_path, tiny_flux_dir, monkeypatch):
    return FakeHub(tmp_path / "hf-cache", tiny_flux_dir, monkeypatch)


def test_builtin_model_is_named_by_its_builder_version(tiny_flux_dir):
    base = resolve_base_model(BUILTIN_TINY_FLUX)
    assert base.folder == tiny_flux_dir and base.commit == "builtin:tiny-flux-v1"


def test_local_folder_is_named_by_its_content(tiny_flux_dir, tmp_path):
    local = Path(shutil.copytree(tiny_flux_dir, tmp_path / "my-flux"))
    first = resolve_base_model(str(local))
    assert first.folder == str(local) and first.commit.startswith("sha256:")
    assert folder_digest(local) == first.commit == folder_digest(shutil.copytree(local, tmp_path / "copy"))
    (local / "scheduler" / "scheduler_config.json").write_text("{}")
    assert folder_digest(local) != first.commit


def test_hub_revision_resolves_offline_from_the_local_cache(hub):
    folder_a, folder_b = hub.add_snapshot(COMMIT_A), hub.add_snapshot(COMMIT_B, changed=True)
    hub.set_ref(COMMIT_A)
    hub.offline()
    base = resolve_base_model(REPO_ID, "main")
    assert (base.commit, base.folder) == (COMMIT_A, str(folder_a))
    hub.set_ref(COMMIT_B)  # main moved (as recorded by a later download)
    assert resolve_base_model(REPO_ID, "main").folder == str(folder_b)
    assert resolve_pretrained(REPO_ID, COMMIT_A) == str(folder_a)  # a pinned commit needs no ref at all
    with pytest.raises(UserError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        resolve_base_model(REPO_ID, "v2")


def test_hub_revision_asks_the_hub_first_when_online(hub):
    hub.add_snapshot(COMMIT_A)
    folder_b = hub.add_snapshot(COMMIT_B, changed=True)
    hub.set_ref(COMMIT_A)  # the local cache still says main is A...
    hub.online(main_is=COMMIT_B)  # ...but the Hub has moved on
    base = resolve_base_model(REPO_ID, "main")
    assert (base.commit, base.folder) == (COMMIT_B, str(folder_b))
    assert hub.asked == [(REPO_ID, "main")]
    hub.asked.clear()
    assert resolve_base_model(REPO_ID, COMMIT_A).commit == COMMIT_A and hub.asked == []  # commits need no call


def test_encode_records_the_commit_and_fingerprints_it(hub, demo_params, tmp_path):
    hub.add_snapshot(COMMIT_A)
    hub.add_snapshot(COMMIT_B)  # the same files: only the commit differs
    hub.set_ref(COMMIT_A)
    hub.offline()
    demo_params["model"].update(pretrained=REPO_ID, revision="main")
    filtered, captions = write_filtered_dataset(tmp_path / "data", n_images=4)
    index_a = encode.run(copy.deepcopy(demo_params), filtered, captions, tmp_path / "cache_a")
    hub.set_ref(COMMIT_B)
    index_b = encode.run(copy.deepcopy(demo_params), filtered, captions, tmp_path / "cache_b")
    assert (index_a["base_model_commit"], index_b["base_model_commit"]) == (COMMIT_A, COMMIT_B)
    assert json.loads((tmp_path / "cache_a" / "latents" / "index.json").read_text())["base_model_commit"] == COMMIT_A
    assert index_a["fingerprint"] != index_b["fingerprint"]
    assert train.run_hash(demo_params, index_a["fingerprint"], 1) != train.run_hash(demo_params, index_b["fingerprint"], 1)

    # Training on cache A loads commit A although main has moved to B since.
    base = base_model_of_cache(REPO_ID, "main", index_a["base_model_commit"])
    assert base.commit == COMMIT_A and base.folder.endswith(COMMIT_A)


def test_a_cache_of_a_local_folder_that_changed_is_refused(tiny_flux_dir, tmp_path):
    local = Path(shutil.copytree(tiny_flux_dir, tmp_path / "my-flux"))
    recorded = resolve_base_model(str(local)).commit
    assert base_model_of_cache(str(local), None, recorded).commit == recorded
    (local / "scheduler" / "scheduler_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"data/cache was encoded with .* re-run encode"):
        base_model_of_cache(str(local), None, recorded)


def test_pin_model_writes_the_commit_into_params_yaml(hub, tmp_path, capsys):
    hub.online(main_is=COMMIT_B)
    params = tmp_path / "params.yaml"
    original = committed_params_text().replace("black-forest-labs/FLUX.1-dev", REPO_ID, 1)
    params.write_text(original)
    assert pin_model.pin(params) == COMMIT_B
    pinned = params.read_text()
    assert f"  revision: {COMMIT_B}\n" in pinned
    # only that line changed: comments, other revisions (download.revision) and order are kept
    assert [line for line in pinned.splitlines() if line not in original.splitlines()] == [f"  revision: {COMMIT_B}"]
    assert "download:" in pinned and "  revision: main" in pinned  # download.revision untouched
    assert "model.revision main -> " + COMMIT_B in capsys.readouterr().out


def test_pin_model_leaves_a_builtin_model_alone(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    text = committed_params_text().replace("black-forest-labs/FLUX.1-dev", BUILTIN_TINY_FLUX, 1)
    params.write_text(text)
    assert pin_model.pin(params) is None
    assert params.read_text() == text and "nothing to pin" in capsys.readouterr().out
