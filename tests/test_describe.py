"""Stage `describe` on the tiny random VLM: a description per image, the scrub, captions with
{description}, sidecars, SIGKILL + resume, bad inputs."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import write_filtered_dataset
from impressionist import caption, describe, tiny_vlm
from impressionist.errors import UserError


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    root = tmp_path_factory.mktemp("describe-data")
    folder, _ = write_filtered_dataset(root, n_images=8)
    return folder


def run_describe(params, filtered, root: Path, **changes) -> pd.DataFrame:
    params = copy.deepcopy(params)
    params["describe"].update(changes)
    return describe.run(params, filtered, root / "descriptions", root / "describe.json",
                        raw_rows_dir=root / "raw_rows")


def test_every_filtered_image_gets_a_labelled_description(demo_params, filtered, tmp_path):
    table = run_describe(demo_params, filtered, tmp_path)
    ids = pd.read_parquet(filtered / "metadata.parquet")["id"]
    assert sorted(table["id"]) == sorted(ids)
    assert table.equals(pd.read_parquet(tmp_path / "descriptions/descriptions.parquet"))
    assert (table["raw"].str.len() > 0).all()
    assert table["synthetic_model"].all() and set(table["model"]) == {"builtin:tiny-vlm"}
    assert set(table["revision"]) == {f"builtin:tiny-vlm-v{tiny_vlm.BUILDER_VERSION}"}
    assert table["prompt_fingerprint"].nunique() == 1 and (table["t5_tokens"] > 0).all()
    assert (table["clip_truncated"] == (table["clip_tokens"] > 77)).all()
    metrics = json.loads((tmp_path / "describe.json").read_text())
    assert metrics["images"] == 8 and metrics["described"] == 8 and metrics["resumed_from"] == 0
    assert metrics["synthetic_model"] is True
    assert len((tmp_path / "raw_rows/rows.jsonl").read_text().splitlines()) == 8  # kept: the raw cache
    # greedy decoding: a second run writes the same table
    again = run_describe(demo_params, filtered, tmp_path / "again")
    pd.testing.assert_frame_equal(table, again)


def test_scrub_removes_the_phrases_and_tidies():
    text = "An impressionist oil painting of haystacks by Claude Monet, brushstrokes , under a pink sky"
    cleaned = describe.scrub(text, ["impressionist", "oil painting", "brushstrokes", "claude monet", "monet"])
    assert cleaned == "An of haystacks, under a pink sky"
    assert describe.scrub("Monet's garden", ["monet"]) == "'s garden"
    assert describe.scrub("a  harbour ", []) == "a harbour"
    assert describe.artist_phrases("claude-monet") == ["claude monet", "monet"]
    assert describe.artist_phrases("Unknown Artist") == []


def test_the_scrub_removes_planted_words_and_is_counted(demo_params, filtered, tmp_path):
    plain = run_describe(demo_params, filtered, tmp_path / "plain", scrub=[], scrub_artists=False)
    assert not plain["scrubbed"].any()
    words = pd.Series(" ".join(plain["raw"]).split()).value_counts()
    planted = [w for w in ("oil", "impressionist", "brushstrokes", "canvas", "painting") if w in words][:2]
    assert planted, words  # the tiny VLM's vocabulary holds these style words on purpose
    scrubbed = run_describe(demo_params, filtered, tmp_path / "scrubbed", scrub=planted, scrub_artists=False)
    assert (scrubbed["raw"] == plain["raw"]).all()
    for text in scrubbed["description"]:
        assert not set(text.lower().split()) & set(planted), text
    changed = plain["raw"].apply(lambda r: bool(set(r.split()) & set(planted)))
    assert (scrubbed["scrubbed"] == changed).all() and changed.any()
    assert json.loads((tmp_path / "scrubbed/describe.json").read_text())["scrubbed"] == int(changed.sum())


def write_caption_inputs(filtered: Path, root: Path, descriptions: dict[str, str]) -> tuple[Path, Path]:
    raw = root / "raw"
    (raw / "images").mkdir(parents=True)
    path = root / "descriptions.parquet"
    pd.DataFrame({"id": list(descriptions), "description": list(descriptions.values())}).to_parquet(path)
    return raw, path


def run_caption(params, filtered, raw, descriptions, root) -> pd.DataFrame:
    return caption.run(params, filtered, raw, root / "captions", descriptions_path=descriptions,
                       metrics_path=root / "captions.json", plot_path=root / "lengths.png")


def test_captions_hold_the_descriptions_sidecars_win_and_empty_ones_fall_back(demo_params, filtered, tmp_path):
    ids = sorted(pd.read_parquet(filtered / "metadata.parquet")["id"])
    descriptions = {i: f"a boat number {n} on a river" for n, i in enumerate(ids)}
    descriptions[ids[1]] = ""
    raw, path = write_caption_inputs(filtered, tmp_path, descriptions)
    (raw / "images" / f"{ids[2]}.txt").write_text("impr3ssionism, my own words for this one")
    table = run_caption(demo_params, filtered, raw, path, tmp_path).set_index("id")
    assert table.loc[ids[0], "caption"] == "impr3ssionism, a painting by Claude Monet: a boat number 0 on a river"
    assert table.loc[ids[0], "caption_source"] == "description"
    assert table.loc[ids[1], "caption"] == "impr3ssionism, a painting by Claude Monet: a landscape"
    assert table.loc[ids[1], "caption_source"] == "genre_fallback"
    assert table.loc[ids[2], "caption"] == "impr3ssionism, my own words for this one"
    assert table.loc[ids[2], "caption_source"] == "sidecar"
    stats = json.loads((tmp_path / "captions.json").read_text())
    assert stats["images"] == 8 and stats["sources"] == {"description": 6, "genre_fallback": 1, "sidecar": 1}
    assert stats["distinct_captions"] == 8 > stats["distinct_template_only"] == 1
    assert stats["t5_tokens"]["n"] == 8 and stats["t5_tokens"]["p0"] <= stats["t5_tokens"]["p50"]
    assert stats["share_truncated_clip"] == pytest.approx((table["clip_tokens"] > 77).mean(), abs=1e-4)
    assert ["boat", 6] in stats["top_words"] and ["river", 6] in stats["top_words"]
    assert (tmp_path / "lengths.png").stat().st_size > 0


def test_disabled_describe_loads_no_model_and_keeps_template_captions(demo_params, filtered, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a captioner was loaded with describe.enabled false")

    monkeypatch.setattr(describe, "Generator", no_model)
    monkeypatch.setattr(describe, "resolve_captioner", no_model)
    table = run_describe(demo_params, filtered, tmp_path, enabled=False)
    assert table.empty and list(table.columns) == list(describe.COLUMNS)
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    path = tmp_path / "descriptions/descriptions.parquet"
    demo_params["caption"]["template"] = "{trigger}, an impressionist painting of {genre} by {artist}"
    captions = run_caption(demo_params, filtered, raw, path, tmp_path)
    assert set(captions["caption"]) == {"impr3ssionism, an impressionist painting of a landscape by Claude Monet"}
    assert set(captions["caption_source"]) == {"template"}
    # the recipe's template still works: {description} falls back to the genre, as template captions
    demo_params["caption"]["template"] = "{trigger}: {description}"
    captions = run_caption(demo_params, filtered, raw, path, tmp_path / "second")
    assert set(captions["caption"]) == {"impr3ssionism: a landscape"}
    assert set(captions["caption_source"]) == {"template"}


def test_sigkill_then_rerun_gives_the_same_table_and_describes_only_the_rest(demo_params, filtered, tmp_path):
    params = copy.deepcopy(demo_params)
    params["describe"].update(batch_size=1, max_new_tokens=40)
    reference = describe.run(params, filtered, tmp_path / "reference", tmp_path / "reference.json")
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    os.symlink(filtered, work / "data/filtered")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "impressionist.describe"]
    proc = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # the finished rows go to the checkpoint root (on Colab a Drive folder), outside the DVC out
    rows = work / ".cache/checkpoints/.describe-raw/rows.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if rows.is_file() and len(rows.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "describe finished before it could be killed"
    assert not (work / "data/descriptions/descriptions.parquet").exists()
    finished = len(rows.read_text().splitlines())
    assert 3 <= finished < 8
    subprocess.run(command, cwd=work, check=True, capture_output=True)
    metrics = json.loads((work / "metrics/describe.json").read_text())
    assert metrics["resumed_from"] == finished and metrics["described"] == 8 - finished
    pd.testing.assert_frame_equal(pd.read_parquet(work / "data/descriptions/descriptions.parquet"), reference)
    assert len(rows.read_text().splitlines()) == 8
    assert sorted(p.name for p in (work / "data/descriptions").iterdir()) == ["descriptions.parquet"]


def test_changed_settings_discard_the_unfinished_run(demo_params, filtered, tmp_path):
    out = tmp_path / "raw_rows"
    describe.RawRows(out, "another-key").load()
    describe.RawRows(out, "another-key").add([("0000000000000000", "stale words")])
    table = run_describe(demo_params, filtered, tmp_path)
    assert "stale words" not in set(table["raw"])
    assert json.loads((tmp_path / "describe.json").read_text())["resumed_from"] == 0


def test_raw_rows_are_kept_under_the_checkpoint_root_and_reused(demo_params, filtered, tmp_path, monkeypatch):
    # IMPRESSIONIST_CHECKPOINTS (or the .cache/checkpoints symlink the Colab notebook points at
    # Drive) is where a disconnect-surviving run keeps them
    monkeypatch.setenv("IMPRESSIONIST_CHECKPOINTS", str(tmp_path / "drive"))
    table = describe.run(demo_params, filtered, tmp_path / "descriptions", tmp_path / "describe.json")
    rows = [json.loads(line) for line in (tmp_path / "drive/.describe-raw/rows.jsonl").read_text().splitlines()]
    assert {row["id"]: row["raw"] for row in rows} == dict(zip(table["id"], table["raw"]))
    assert sorted(p.name for p in (tmp_path / "descriptions").iterdir()) == ["descriptions.parquet"]

    # A change after the VLM (the scrub here; model.pretrained's tokenizers likewise) re-runs the
    # stage, which then loads no captioner: every raw text comes from the kept rows.
    monkeypatch.setattr(describe, "Generator", lambda *a, **k: pytest.fail("the VLM was loaded again"))
    demo_params["describe"]["scrub"] = demo_params["describe"]["scrub"] + [table["raw"][0].split()[0]]
    again = describe.run(demo_params, filtered, tmp_path / "again", tmp_path / "again.json")
    assert again["raw"].tolist() == table["raw"].tolist()
    assert json.loads((tmp_path / "again.json").read_text())["described"] == 0


def assert_refused(params, filtered, root, match):
    with pytest.raises(UserError, match=match) as err:
        describe.run(params, filtered, root / "descriptions", root / "describe.json")
    assert "\n" not in str(err.value)
    assert not (root / "descriptions").exists() and not (root / "describe.json").exists()


def test_a_captioner_not_cached_offline_is_one_line(demo_params, filtered, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    demo_params["describe"]["model"] = "nobody-here/no-such-vlm"
    assert_refused(demo_params, filtered, tmp_path, r"describe.model.*no-such-vlm.*not in the local Hugging Face cache")


def test_a_gpu_dtype_without_a_gpu_is_one_line(demo_params, filtered, tmp_path):
    demo_params["describe"]["dtype"] = "bfloat16"
    assert_refused(demo_params, filtered, tmp_path, r"describe.dtype=bfloat16 is for a GPU.*describe.dtype: float32")


def test_a_model_without_image_input_is_one_line(demo_params, filtered, tmp_path, tiny_flux_dir):
    demo_params["describe"]["model"] = str(Path(tiny_flux_dir) / "text_encoder_2")  # a T5 encoder
    assert_refused(demo_params, filtered, tmp_path, r"is a 't5' model, which takes no image input")


def test_a_folder_that_is_no_transformers_model_is_one_line(demo_params, filtered, tmp_path):
    (tmp_path / "empty-model").mkdir()
    demo_params["describe"]["model"] = str(tmp_path / "empty-model")
    assert_refused(demo_params, filtered, tmp_path, r"folder has no config.json")


def test_bad_describe_params_are_one_line(demo_params, filtered, tmp_path):
    demo_params["describe"]["scrub"] = "impressionist"
    assert_refused(demo_params, filtered, tmp_path, r"describe.scrub=.*must be a list")
