"""The evaluation set the sample stages draw: subjects x seeds, paired by (subject, seed) across the
base model and every LoRA scale, fingerprinted, and refused with one line when misconfigured."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import REPO, committed_params_text, train_tiny_lora
from PIL import Image

from impressionist import sample
from impressionist.errors import UserError
from impressionist.layout import EVAL_SET_TABLE
from impressionist.params.evaluation import EvalSetParams, SampleParams
from impressionist.params.model import ModelParams


def eval_params(params, tmp_path, subjects=("a harbor at sunset", "a field of poppies", "a bridge at dusk")):
    (tmp_path / "subjects.txt").write_text("# a comment\n" + "\n".join(subjects) + "\n\n" + subjects[0] + "\n")
    params["caption"]["trigger"] = "trig"
    params["sample"].update(prompts=["a harbor at sunset"], seeds=[0], resolution=32, steps=2,
                            lora_scales=[0.5, 1.0], val_captions=0)
    params["sample"]["eval_set"] = dict(subjects=str(tmp_path / "subjects.txt"), num_subjects=2, seeds=[3, 7],
                                        steps=2, resolution=32, guidance_scale=3.5)
    return params


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, _demo_params_master, encoded_cache):
    return train_tiny_lora(tmp_path_factory.mktemp("lora"), _demo_params_master, encoded_cache)


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def test_base_and_lora_eval_sets_pair_by_subject_and_seed(demo_params, trained_lora, tmp_path):
    params = eval_params(demo_params, tmp_path)
    sample.run_base(params, tmp_path / "base")
    base = pd.read_csv(tmp_path / "base" / EVAL_SET_TABLE)
    assert list(base["subject"]) == ["a harbor at sunset"] * 2 + ["a field of poppies"] * 2
    assert list(base["prompt"]) == [f"trig, {s}" for s in base["subject"]]  # trigger first, no style words
    assert list(base["seed"]) == [3, 7, 3, 7] and set(base["lora_scale"]) == {0.0}
    assert list(base["prompt_id"]) == [sample.prompt_id(s) for s in base["subject"]]
    assert base["eval_set"].nunique() == 1

    # an image is the pipeline's own output for its recorded prompt and seed at the set's settings
    cfg = SampleParams.check(params)
    pipe = sample.load(ModelParams.check(params), cfg, torch.device("cpu"))
    row = base.iloc[3]
    assert row["noise_seed"] == sample.noise_seed(row["prompt_id"], row["seed"])
    direct = np.asarray(sample.draw(pipe, sample.eval_sampler(cfg), row["prompt"], int(row["noise_seed"]))
                        ).astype(np.int16)
    assert np.array_equal(pixels(tmp_path / "base" / row["file"]), direct)
    assert pixels(tmp_path / "base" / row["file"]).shape == (32, 32, 3)
    # different seeds of one subject give different images
    assert not np.array_equal(pixels(tmp_path / "base" / base.iloc[2]["file"]),
                              pixels(tmp_path / "base" / base.iloc[3]["file"]))

    sample.run_lora(params, trained_lora, tmp_path / "base", tmp_path / "lora", tmp_path / "grid.png")
    lora = pd.read_csv(tmp_path / "lora" / EVAL_SET_TABLE)
    assert sorted(set(lora["lora_scale"])) == [0.5, 1.0]
    for scale, group in lora.groupby("lora_scale"):
        assert list(zip(group["prompt_id"], group["seed"])) == list(zip(base["prompt_id"], base["seed"]))
        assert set(group["eval_set"]) == set(base["eval_set"])
    # the LoRA changes the picture of the same (subject, seed)
    top = lora[lora["lora_scale"] == 1.0].iloc[0]
    assert not np.array_equal(pixels(tmp_path / "lora" / top["file"]), pixels(tmp_path / "base" / base.iloc[0]["file"]))
    # the show set is unchanged beside it
    assert len(pd.read_csv(tmp_path / "lora" / "samples.csv")) == 2


def test_fingerprint_follows_what_shapes_the_images_not_the_model(demo_params, tmp_path, monkeypatch):
    params = eval_params(demo_params, tmp_path)

    def fingerprint(p):
        cfg = SampleParams.check(p)
        return sample.eval_set_fingerprint(cfg, p["caption"]["trigger"], sample.evaluation_subjects(cfg.eval_set))

    first = fingerprint(params)
    params["model"]["pretrained"] = "black-forest-labs/FLUX.1-dev"
    assert fingerprint(params) == first  # comparing models on one set is the point
    for key, value in (("seeds", [3, 8]), ("steps", 3), ("resolution", 48), ("num_subjects", 3),
                       ("guidance_scale", 1.0)):
        changed = eval_params(demo_params, tmp_path)
        changed["sample"]["eval_set"][key] = value
        assert fingerprint(changed) != first, key
    assert sample.prompt_id("a harbor at sunset") == sample.prompt_id("a harbor at sunset") != sample.prompt_id("a field")
    # the way starting noise is derived is part of it: sets drawn under another rule never pair
    monkeypatch.setattr(sample, "NOISE_VERSION", sample.NOISE_VERSION + 1)
    assert fingerprint(params) != first


class _NoisePipe:
    """A stand-in pipeline: records each image's generator seed and starting noise, draws nothing."""

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, prompt, *, generator, height, width, **_):
        self.calls.append((prompt, generator.initial_seed(), torch.randn(4, 8, 8, generator=generator)))

        class Out:
            images = [Image.new("RGB", (width, height))]
        return Out()


def test_subjects_at_one_seed_start_from_independent_noise_and_base_and_lora_from_the_same(
        demo_params, tmp_path):
    params = eval_params(demo_params, tmp_path)
    cfg = SampleParams.check(params)
    pipe = _NoisePipe()
    rows = []
    for scale in (0.0, 0.5, 1.0):  # base and two LoRA scales, as the two stages draw them
        rows += sample.generate_eval_set(pipe, cfg, "trig", scale, tmp_path / f"out{scale}")
    noise = {(r["prompt_id"], r["seed"], r["lora_scale"]): latents
             for r, (_, _, latents) in zip(rows, pipe.calls, strict=True)}
    seeds = {(r["prompt_id"], r["seed"], r["lora_scale"]): r["noise_seed"] for r in rows}
    assert [seed for _, seed, _ in pipe.calls] == [r["noise_seed"] for r in rows]
    a, b = sorted({r["prompt_id"] for r in rows})
    for seed in (3, 7):
        # two subjects at the same seed: different starting noise
        assert seeds[a, seed, 0.0] != seeds[b, seed, 0.0]
        assert not torch.allclose(noise[a, seed, 0.0], noise[b, seed, 0.0])
        # base and every LoRA scale of one (subject, seed): the same starting noise
        for key in (a, b):
            for scale in (0.5, 1.0):
                assert torch.equal(noise[key, seed, scale], noise[key, seed, 0.0])
    assert not torch.allclose(noise[a, 3, 0.0], noise[a, 7, 0.0])
    # stable across runs and machines: a hash, not Python's salted hash()
    assert sample.noise_seed("abc", 3) == 5708972147600778899


def test_shipped_subjects_have_no_style_words_and_enough_for_the_recipe():
    import yaml

    recipe = yaml.safe_load(committed_params_text())  # the recipe, not a demo applied in the workspace
    ev = {**recipe["sample"]["eval_set"], "subjects": str(REPO / recipe["sample"]["eval_set"]["subjects"])}
    subjects = sample.evaluation_subjects(EvalSetParams.of(ev))
    assert len(subjects) == ev["num_subjects"] == 100 and len(set(subjects)) == 100
    words = ("impression", "monet", "renoir", "painting", "style", recipe["caption"]["trigger"])
    assert not [s for s in subjects if any(w in s.lower() for w in words)]


@pytest.mark.parametrize(("change", "needle"), [
    ({"subjects": "/nowhere/subjects.txt"}, "/nowhere/subjects.txt not found"),
    ({"num_subjects": 5}, "lists only 3 distinct subject(s)"),
    ({"seeds": [1, 1]}, "sample.eval_set.seeds must list distinct integer seeds"),
    ({"resolution": 30}, "sample.eval_set.resolution"),
    ({"steps": 0}, "sample.eval_set.steps"),
])
def test_bad_eval_set_is_one_line_before_any_model(demo_params, tmp_path, monkeypatch, change, needle):
    params = eval_params(demo_params, tmp_path)
    params["sample"]["eval_set"].update(change)
    monkeypatch.setattr(sample, "load", lambda *a, **k: pytest.fail("model loaded before the params were checked"))
    with pytest.raises(UserError) as err:
        sample.run_base(params, tmp_path / "base")
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "base").exists()


def test_lora_stage_refuses_a_base_eval_set_of_other_settings(demo_params, trained_lora, tmp_path, monkeypatch):
    params = eval_params(demo_params, tmp_path)
    sample.run_base(params, tmp_path / "base")
    params["sample"]["eval_set"]["seeds"] = [3, 9]
    monkeypatch.setattr(sample, "load", lambda *a, **k: pytest.fail("model loaded before the inputs were checked"))
    with pytest.raises(UserError, match="no base-model evaluation set for the current sample.eval_set"):
        sample.run_lora(params, trained_lora, tmp_path / "base", tmp_path / "lora", tmp_path / "grid.png")
    assert not (tmp_path / "lora").exists()
