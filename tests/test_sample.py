"""Sampling with and without the LoRA, the prompt set, the grid, and the refusals."""

import copy
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import train_tiny_lora
from PIL import Image

from impressionist import sample
from impressionist.errors import UserError
from impressionist.grid import sample_grid_figure
from impressionist.params.data import CaptionParams
from impressionist.params.evaluation import SampleParams
from impressionist.params.model import ModelParams


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, _demo_params_master, encoded_cache):
    return train_tiny_lora(tmp_path_factory.mktemp("lora"), _demo_params_master, encoded_cache)


def small(params):
    params["sample"].update(prompts=["a harbor at sunset", "a field"], seeds=[0, 1], resolution=32,
                            steps=2, lora_scales=[0.5, 1.0], val_captions=0)
    params["sample"]["eval_set"].update(num_subjects=2, seeds=[0, 1], resolution=32, steps=2)
    return params


# Validation captions as the caption stage writes them: the trigger is already inside, and not
# always first (a sidecar caption is verbatim). Rows are out of id order on purpose.
CAPTION_ROWS = [
    ("00000000000000c0", "val", "trig, a painting of a landscape by Claude Monet"),
    ("00000000000000a0", "train", "trig, a training caption that must never be sampled"),
    ("00000000000000b0", "val", "a quiet river at dawn, trig style"),
    ("00000000000000d0", "val", "trig, a painting of a landscape by Claude Monet"),  # a repeat of c0
    ("00000000000000e0", "val", "trig, a portrait sitter by Mary Cassatt"),
    ("0000000000000010", "val", "   "),                                                # blank: skipped
]


def write_captions(path, rows=CAPTION_ROWS):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([dict(id=i, split=s, caption=c, caption_source="template") for i, s, c in rows]).to_parquet(path)
    return path


def prompt_set(params, captions):
    return sample.prompt_set(SampleParams.check(params), CaptionParams.check(params).trigger, captions)


def test_prompt_set_is_subjects_with_trigger_then_val_captions_verbatim(demo_params, tmp_path):
    params = small(demo_params)
    params["caption"]["trigger"] = "trig"
    params["sample"]["val_captions"] = 3
    captions = write_captions(tmp_path / "captions.parquet")
    assert prompt_set(params, captions) == [
        ("trig, a harbor at sunset", "subject"),
        ("trig, a field", "subject"),
        # first distinct validation captions by image id: b0, c0 (d0 repeats c0), e0
        ("a quiet river at dawn, trig style", "val_caption"),
        ("trig, a painting of a landscape by Claude Monet", "val_caption"),
        ("trig, a portrait sitter by Mary Cassatt", "val_caption"),
    ]
    params["sample"]["val_captions"] = 1
    assert [p for p, _ in prompt_set(params, captions)][-1] == "a quiet river at dawn, trig style"
    # captions alone are a prompt set; the captions file is not read when none are asked for
    params["sample"].update(prompts=[], val_captions=2)
    assert len(prompt_set(params, captions)) == 2
    params["sample"].update(prompts=["a field"], val_captions=0)
    assert prompt_set(params, tmp_path / "absent.parquet") == [("trig, a field", "subject")]


@pytest.mark.parametrize(("change", "needle"), [
    ({"val_captions": 4}, "only 3 distinct validation caption"),
    ({"val_captions": -1}, "sample.val_captions"),
    ({"val_captions": True}, "sample.val_captions"),
    ({"val_captions": "2"}, "sample.val_captions"),
    ({"prompts": [], "val_captions": 0}, "prompt set is empty"),
    ({"prompts": ["ok", " "]}, "sample.prompts"),
])
def test_prompt_set_refusals(demo_params, tmp_path, change, needle):
    params = small(demo_params)
    params["sample"].update(change)
    with pytest.raises(UserError) as err:
        prompt_set(params, write_captions(tmp_path / "captions.parquet"))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_captions_file_is_one_line_before_any_model(demo_params, tmp_path, monkeypatch):
    params = small(demo_params)
    params["sample"]["val_captions"] = 2
    monkeypatch.setattr(sample, "build_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(UserError) as err:
        sample.run_base(params, tmp_path / "base", tmp_path / "no" / "captions.parquet")
    message = str(err.value)
    assert "captions.parquet not found" in message and "dvc repro caption" in message
    assert "sample.val_captions: 0" in message and "\n" not in message
    assert not (tmp_path / "base").exists()


def record_initial_noise(monkeypatch) -> list[list]:
    """``[prompt, seed of its generator, initial latents]`` of every image the pipeline draws, in order
    (the real pipeline runs; this only watches)."""
    from diffusers import FluxPipeline

    drawn = []
    real_call, real_prepare = FluxPipeline.__call__, FluxPipeline.prepare_latents

    def call(self, prompt, *args, **kwargs):
        drawn.append([prompt, kwargs["generator"].initial_seed(), None])
        return real_call(self, prompt, *args, **kwargs)

    def prepare_latents(self, *args, **kwargs):
        latents, ids = real_prepare(self, *args, **kwargs)
        drawn[-1][2] = latents.clone()
        return latents, ids

    monkeypatch.setattr(FluxPipeline, "__call__", call)
    monkeypatch.setattr(FluxPipeline, "prepare_latents", prepare_latents)
    return drawn


def image_array(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_base_then_lora_samples_and_grid(demo_params, trained_lora, tmp_path, monkeypatch):
    params = small(demo_params)
    params["caption"]["trigger"] = "trig"
    params["sample"]["val_captions"] = 1
    captions = write_captions(tmp_path / "captions.parquet")
    drawn = record_initial_noise(monkeypatch)
    sample.run_base(params, tmp_path / "base", captions)
    base_noise = drawn[:]
    base = pd.read_csv(tmp_path / "base/samples.csv")
    assert len(base) == 6 and set(base.lora_scale) == {0.0}
    assert list(base.prompt.drop_duplicates()) == ["trig, a harbor at sunset", "trig, a field",
                                                   "a quiet river at dawn, trig style"]
    assert list(base.prompt_source.drop_duplicates()) == ["subject", "val_caption"]
    assert Image.open(tmp_path / "base" / base.file.iloc[0]).size == (32, 32)

    sample.run_lora(params, trained_lora, tmp_path / "base", tmp_path / "lora", tmp_path / "grid.png", captions)
    lora = pd.read_csv(tmp_path / "lora/samples.csv")
    assert sorted(lora.lora_scale.unique()) == [0.5, 1.0] and len(lora) == 12
    # the LoRA images use exactly the base images' prompts and seeds at every scale
    for scale in (0.5, 1.0):
        at = lora[lora.lora_scale == scale]
        assert list(zip(at.prompt, at.seed)) == list(zip(base.prompt, base.seed))
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[0] > 3 * 32 and grid.size[1] > 6 * 32

    # Same prompt and seed: the LoRA changes the picture, and the scale matters.
    def pixels(folder, table, scale):
        row = table[(table.seed == 0) & (table.lora_scale == scale)].iloc[0]
        return Image.open(folder / row.file).tobytes()
    base_px = pixels(tmp_path / "base", base, 0.0)
    assert pixels(tmp_path / "lora", lora, 1.0) != base_px
    assert pixels(tmp_path / "lora", lora, 0.5) != pixels(tmp_path / "lora", lora, 1.0)

    # Base and LoRA rows of the same (prompt, seed) start from the same noise: the evaluation's
    # pairing stands on it. Each row of samples.csv is the image drawn in its place, from its seed.
    # Each stage draws its show rows, then its evaluation-set rows (eval.csv), scale by scale.
    lora_noise = drawn[len(base_noise):]
    base_eval, lora_eval = pd.read_csv(tmp_path / "base/eval.csv"), pd.read_csv(tmp_path / "lora/eval.csv")

    def order(show, evaluation, scales):  # (prompt, generator seed) of every row, in drawing order
        return [key for scale in scales for table in (show, evaluation)
                for key in zip(table.prompt[table.lora_scale == scale],
                               table.noise_seed[table.lora_scale == scale])]

    # the generator seed of a show image is noise_seed(prompt, seed), of an evaluation image
    # noise_seed(prompt_id, seed): recorded as drawn
    assert list(base.noise_seed) == [sample.noise_seed(p, s) for p, s in zip(base.prompt, base.seed)]
    assert list(base_eval.noise_seed) == [sample.noise_seed(k, s) for k, s in zip(base_eval.prompt_id, base_eval.seed)]

    assert [(p, s) for p, s, _ in base_noise] == order(base, base_eval, [0.0])
    assert [(p, s) for p, s, _ in lora_noise] == order(lora, lora_eval, [0.5, 1.0])
    base_by_key = {(p, s): latents for p, s, latents in base_noise}
    for prompt, seed, latents in lora_noise:
        assert torch.equal(latents, base_by_key[prompt, seed]), (prompt, seed)
    first = base[base.prompt == base.prompt[0]]
    assert not torch.equal(base_by_key[base.prompt[0], first.noise_seed.iloc[0]],
                           base_by_key[base.prompt[0], first.noise_seed.iloc[1]])
    # two prompts at one seed start from different noise (not one latent shared by every prompt)
    at_0 = base[base.seed == 0]
    assert not torch.equal(base_by_key[at_0.prompt.iloc[0], at_0.noise_seed.iloc[0]],
                           base_by_key[at_0.prompt.iloc[1], at_0.noise_seed.iloc[1]])


def test_each_image_is_the_pipelines_output_for_its_recorded_prompt_and_seed(demo_params, tiny_flux_dir,
                                                                           tmp_path):
    from impressionist.models import load_pipeline, resolve_dtype

    params = small(demo_params)  # two prompts x seeds 0 and 1
    cfg = params["sample"]
    sample.run_base(params, tmp_path / "base")
    table = pd.read_csv(tmp_path / "base/samples.csv")
    assert sorted(zip(table.prompt, table.seed)) == sorted(
        (f"impr3ssionism, {p}", s) for p in cfg["prompts"] for s in cfg["seeds"])
    images = {row.file: image_array(tmp_path / "base" / row.file) for row in table.itertuples()}
    # different seeds, and different prompts, give different pictures
    for (a, pa), (b, pb) in itertools.combinations(images.items(), 2):
        assert not np.array_equal(pa, pb), f"{a} and {b} are the same image"

    # The second prompt at seed 1 and the first at seed 1, drawn here straight from the pipeline.
    pipe = load_pipeline(tiny_flux_dir, resolve_dtype(ModelParams.check(params)))
    pipe.set_progress_bar_config(disable=True)
    for row in (table.iloc[-1], table[(table.prompt == table.prompt[0]) & (table.seed == 1)].iloc[0]):
        assert row.seed == 1 and row.noise_seed == sample.noise_seed(row.prompt, 1)
        expected = pipe(row.prompt, height=cfg["resolution"], width=cfg["resolution"],
                        num_inference_steps=cfg["steps"], guidance_scale=cfg["guidance_scale"],
                        max_sequence_length=cfg["max_sequence_length"],
                        generator=torch.Generator("cpu").manual_seed(
                            sample.noise_seed(row.prompt, row.seed))).images[0]
        assert np.array_equal(images[row.file], np.asarray(expected.convert("RGB"))), row.file


def test_sampling_is_deterministic(demo_params, tmp_path):
    params = small(demo_params)
    params["sample"]["prompts"] = ["a field"]
    sample.run_base(params, tmp_path / "a")
    sample.run_base(params, tmp_path / "b")
    for name in pd.read_csv(tmp_path / "a/samples.csv").file:
        assert Image.open(tmp_path / "a" / name).tobytes() == Image.open(tmp_path / "b" / name).tobytes()


def _write_samples(folder, rows, colour):
    folder.mkdir(parents=True)
    for i, row in enumerate(rows):
        row["file"] = f"{i}.png"
        Image.new("RGB", (16, 16), colour).save(folder / row["file"])
    pd.DataFrame(rows).to_csv(folder / "samples.csv", index=False)


def test_grid_is_captioned_rows_prompts_columns_scales(tmp_path):
    prompts = [("trig, a harbor at sunset", "subject"), ("trig, a landscape by Claude Monet", "val_caption")]
    base = [dict(prompt=p, seed=0, lora_scale=0.0, prompt_source=s) for p, s in prompts]
    lora = [dict(prompt=p, seed=0, lora_scale=scale, prompt_source=s) for scale in (0.5, 1.0) for p, s in prompts]
    _write_samples(tmp_path / "base", base, (255, 0, 0))
    _write_samples(tmp_path / "lora", lora[:-1], (0, 0, 255))  # the last cell is missing
    fig = sample_grid_figure(tmp_path / "base", tmp_path / "lora")
    axes = fig.axes
    assert len(axes) == 2 * 3
    assert [ax.get_title() for ax in axes[:3]] == ["base", "LoRA x0.5", "LoRA x1"]
    row_labels = [" ".join(t.get_text().split()) for ax in axes[::3] for t in ax.texts]
    assert row_labels == ["trig, a harbor at sunset (seed 0)", "val caption: trig, a landscape by Claude Monet (seed 0)"]
    # base cells show the base images, LoRA cells the LoRA images, the missing one says so
    assert axes[0].images[0].get_array()[0, 0].tolist() == [255, 0, 0]
    assert axes[1].images[0].get_array()[0, 0].tolist() == [0, 0, 255]
    assert not axes[5].images and [t.get_text() for t in axes[5].texts] == ["missing"]
    # the title names the base model, and flags the demo's random weights
    assert "RANDOM" in sample_grid_figure(tmp_path / "base", tmp_path / "lora", "builtin:tiny-flux")._suptitle.get_text()
    real = sample_grid_figure(tmp_path / "base", tmp_path / "lora", "black-forest-labs/FLUX.1-dev")._suptitle.get_text()
    assert real.startswith("black-forest-labs/FLUX.1-dev\n") and "RANDOM" not in real


def test_refusals(demo_params, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "build_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    params = small(demo_params)
    with pytest.raises(UserError, match="no LoRA"):
        sample.run_lora(params, tmp_path / "missing", tmp_path / "base", tmp_path / "out", tmp_path / "g.png")
    params["sample"]["prompts"] = []
    with pytest.raises(UserError, match="sample.prompts"):
        sample.run_base(params, tmp_path / "base")
    params = small(demo_params)
    params["sample"]["resolution"] = 40
    with pytest.raises(UserError, match="multiple of 16"):
        sample.run_base(params, tmp_path / "base")
    params = small(demo_params)
    params["sample"]["seeds"] = []
    with pytest.raises(UserError, match="sample.seeds"):
        sample.run_base(params, tmp_path / "base")
    params = copy.deepcopy(small(demo_params))  # small() changes demo_params itself
    del params["sample"]["guidance_scale"]
    with pytest.raises(UserError, match="'sample.guidance_scale' is missing"):
        sample.run_base(params, tmp_path / "base")

    # base samples made with other prompts than the params ask for: refused before loading a model
    params = small(demo_params)
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    (lora_dir / sample.LORA_WEIGHTS).write_bytes(b"")
    stale = [dict(prompt="an old prompt", seed=s, lora_scale=0.0, prompt_source="subject") for s in (0, 1)]
    _write_samples(tmp_path / "stale", stale, (0, 0, 0))
    with pytest.raises(UserError, match="dvc repro sample_base"):
        sample.run_lora(params, lora_dir, tmp_path / "stale", tmp_path / "out", tmp_path / "g.png")
    assert not (tmp_path / "base").exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("mode, message", [("sequential", "needs CUDA"), ("model", "needs CUDA"),
                                           ("disk", "sample.offload")])
def test_offload_modes_are_checked_before_loading(demo_params, tmp_path, mode, message):
    import torch

    if torch.cuda.is_available() and message == "needs CUDA":
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    demo_params["sample"]["offload"] = mode
    captions = write_captions(tmp_path / "captions.parquet")  # the demo's params sample validation captions
    with pytest.raises(UserError, match=message):
        sample.run_base(demo_params, tmp_path / "base", captions)
    assert not (tmp_path / "base").exists()
