"""The evaluate and reference stages: shared preprocessing, FID, CLIP and style scores, the
evaluation set's metrics with CIs, the per-image table, the data plot and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from impressionist import evaluate, reference
from impressionist.errors import UserError
from impressionist.feature_nets import TinyFeatureNet, load_clip
from impressionist.image_features import ClipScorer, prepare_images, style_prompts
from impressionist.wikiart import STYLES

DEMO_CFG = {
    "fid_features": "builtin:tiny",
    "inception_weights": "",
    "image_size": 32,
    "clip_model": "builtin:tiny-clip",
    "clip_pretrained": "builtin",
    "cmmd_clip_model": "builtin:tiny-clip",
    "cmmd_clip_pretrained": "builtin",
    "bootstrap_resamples": 500,
    "confidence": 0.95,
    "seed": 0,
}
METRIC_KEYS = {f"{m}{suffix}" for m in ("clip_score", "style_score", "kid", "cmmd")
               for suffix in ("", "_ci_low", "_ci_high", "_n")}
SECTION_KEYS = METRIC_KEYS | {"fid", "fid_n"}


@pytest.fixture(scope="module")
def tiny_clip(isolated_cache):
    return load_clip("builtin:tiny-clip", "builtin")


def smooth_image(rng: np.random.Generator, size: tuple[int, int] = (48, 48), shift: int = 0) -> Image.Image:
    """A random low-frequency RGB picture, brightened by ``shift``."""
    low = rng.integers(0, 200, (6, 6, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(low).resize(size, Image.BICUBIC)).astype(np.int16) + shift
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def brighten(image: Image.Image, shift: int) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(image).astype(np.int16) + shift, 0, 255).astype(np.uint8))


SUBJECTS = ["a harbor at sunset", "water lilies on a pond", "a wheat field", "a bridge at dusk",
            "a garden path", "a sailboat", "a snowy road", "a flower market", "a cliff", "a pier"]


def make_project(root: Path, *, n_val: int = 8, n_train: int = 3, n_subjects: int = 6, seeds=(0, 1),
                 lora_scales: tuple[float, ...] = (0.5, 1.0), shift: int = 90, seed: int = 0,
                 with_reference: bool = True) -> Path:
    """samples/{base,lora} evaluation sets as the sample stages write them, data/filtered as the filter
    stage does, and data/reference from the real reference stage.

    Each LoRA image is its base image (same subject and seed) brightened in proportion to the scale,
    so the LoRA images are clearly further from the real paintings, which share the base images'
    distribution.
    """
    rng = np.random.default_rng(seed)
    base_images = {(i, s): smooth_image(rng) for i in range(n_subjects) for s in seeds}
    for name, scales in (("base", (0.0,)), ("lora", lora_scales)):
        folder = root / "samples" / name
        (folder / "eval").mkdir(parents=True)
        rows = []
        for scale in scales:
            for (i, s), image in base_images.items():
                file = f"eval/s{i:03d}_seed{s}_scale{scale:g}.png"
                brighten(image, int(shift * scale)).save(folder / file)
                rows.append({"file": file, "subject": SUBJECTS[i], "prompt": f"trig, {SUBJECTS[i]}",
                             "prompt_id": f"id{i:03d}", "seed": s, "lora_scale": scale, "eval_set": "set-1"})
        pd.DataFrame(rows).to_csv(folder / "eval.csv", index=False)
    filtered = root / "data" / "filtered"
    (filtered / "images").mkdir(parents=True)
    rows = []
    for i in range(n_val + n_train):
        image_id = f"{i:016x}"
        # real paintings are not square: exercise the shared resize + centre crop
        smooth_image(rng, (56, 44)).save(filtered / "images" / f"{image_id}.png")
        rows.append({"id": image_id, "file": f"images/{image_id}.png", "artist": "claude-monet",
                     "style": "Impressionism", "split": "val" if i < n_val else "train"})
    pd.DataFrame(rows).to_parquet(filtered / "metadata.parquet")
    if with_reference:
        reference.run({"evaluate": DEMO_CFG}, filtered, root / "data" / "reference")
    return root


def run_in(root: Path, cfg: dict | None = None) -> dict:
    return evaluate.run({"evaluate": cfg or DEMO_CFG}, root / "samples", root / "data" / "reference",
                        root / "metrics" / "eval.json", root / "metrics" / "eval_images.csv", root / "plots",
                        filtered_dir=root / "data" / "filtered")


# ---------------------------------------------------------------- shared preprocessing


def test_prepare_images_same_for_pil_uint8_and_float():
    rng = np.random.default_rng(1)
    image = smooth_image(rng, (40, 56))  # width 40, height 56
    array = np.asarray(image)
    as_uint8 = torch.from_numpy(array.copy()).permute(2, 0, 1)
    as_float = as_uint8.float() / 255.0
    outputs = [prepare_images([image], 32), prepare_images([array], 32), prepare_images([as_uint8], 32),
               prepare_images([as_float], 32), prepare_images(as_float[None], 32)]
    for out in outputs:
        assert out.dtype == torch.uint8 and out.shape == (1, 3, 32, 32)
        assert torch.equal(out, outputs[0])


def test_prepare_images_resizes_shorter_side_and_centre_crops():
    rng = np.random.default_rng(2)
    tall = torch.from_numpy(np.asarray(smooth_image(rng, (32, 48))).copy()).permute(2, 0, 1)  # 48 high, 32 wide
    # the shorter side is already 32: no resampling, only the centre crop
    assert torch.equal(prepare_images([tall], 32)[0], tall[:, 8:40, :])
    # the same picture at two resolutions comes out (almost) the same
    for _ in range(3):
        low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        small = prepare_images([Image.fromarray(low).resize((64, 64), Image.BICUBIC)], 32).int()
        large = prepare_images([Image.fromarray(low).resize((128, 128), Image.BICUBIC)], 32).int()
        assert (small - large).abs().max() <= 2
    # images of different sizes end up in one batch of the requested size
    batch = prepare_images([smooth_image(rng, (30, 70)), smooth_image(rng, (90, 50))], 24)
    assert batch.shape == (2, 3, 24, 24)


# ---------------------------------------------------------------- CLIP score and style score


def test_clip_score_equals_direct_open_clip(tiny_clip):
    import open_clip

    model, preprocess, tokenizer = tiny_clip
    rng = np.random.default_rng(6)
    images = [smooth_image(rng, (40 + 8 * i, 48)) for i in range(5)]
    prompts = ["a harbor at sunset", "a woman with a parasol in a field"] * 2 + ["water lilies on a pond"]

    scorer = ClipScorer(model, preprocess, tokenizer)
    ours = float(scorer.clip_scores(scorer.image_features(images), prompts).mean())

    direct = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            image_emb = model.encode_image(preprocess(image)[None])
            text_emb = model.encode_text(open_clip.tokenize([prompt]))
            direct.append(100 * max(F.cosine_similarity(image_emb, text_emb).item(), 0.0))
    assert ours == pytest.approx(sum(direct) / len(direct), rel=1e-5)
    # a prompt really matters: scoring against other prompts gives another value
    assert float(scorer.clip_scores(scorer.image_features(images), ["a cubist guitar"] * 5).mean()) != pytest.approx(ours)


def test_style_probability_equals_direct_softmax(tiny_clip):
    import open_clip

    model, preprocess, tokenizer = tiny_clip
    rng = np.random.default_rng(7)
    images = [smooth_image(rng) for _ in range(4)]
    prompts = [f"an {style.replace('_', ' ')} painting" for style in STYLES]
    assert style_prompts() == prompts and len(prompts) == 27

    with torch.no_grad():
        image_emb = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
        text_emb = F.normalize(model.encode_text(open_clip.tokenize(prompts)), dim=-1)
        probs = (model.logit_scale.exp() * image_emb @ text_emb.T).softmax(dim=-1)
    expected = probs[:, STYLES.index("Impressionism")].mean().item()

    scorer = ClipScorer(model, preprocess, tokenizer)
    feats = scorer.image_features(images)
    torch.testing.assert_close(scorer.style_probabilities(feats), probs, rtol=1e-5, atol=1e-6)
    assert float(scorer.style_scores(feats).mean()) == pytest.approx(expected, rel=1e-5)


class PlantedClip(torch.nn.Module):
    """A fake CLIP whose embeddings are planted: text i → axis i; an image → the axis its colour names."""

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(100.0)))

    def encode_text(self, tokens):
        return F.one_hot(tokens, len(STYLES)).float()

    def encode_image(self, pixels):
        return pixels


def planted_tools():
    prompts = [f"an {style.replace('_', ' ')} painting" for style in STYLES]

    def tokenizer(texts):  # fails loudly if the stage asks for prompts other than the expected ones
        return torch.tensor([prompts.index(t) for t in texts])

    def preprocess(image):  # reddish → Impressionism, bluish → Cubism, plus a little of everything
        r, _, b = np.asarray(image).reshape(-1, 3).mean(0)
        vec = torch.full((len(STYLES),), 0.05)
        vec[STYLES.index("Impressionism" if r > b else "Cubism")] = 1.0
        return vec

    return PlantedClip(), preprocess, tokenizer


def test_style_score_ranks_planted_case():
    model, preprocess, tokenizer = planted_tools()
    scorer = ClipScorer(model, preprocess, tokenizer)
    reddish = [Image.new("RGB", (16, 16), (200, 80, 60 + i)) for i in range(3)]
    bluish = [Image.new("RGB", (16, 16), (40, 80, 200 - i)) for i in range(3)]
    impressionist = float(scorer.style_scores(scorer.image_features(reddish)).mean())
    cubist = float(scorer.style_scores(scorer.image_features(bluish)).mean())
    assert impressionist > 0.9 > 0.1 > cubist


def test_clip_score_clamps_negative_cosine_to_zero():
    model, preprocess, tokenizer = planted_tools()
    scorer = ClipScorer(model, preprocess, tokenizer)
    opposite = -torch.eye(len(STYLES))[:2]  # exactly opposite to the first two prompts' embeddings
    prompts = style_prompts()[:2]
    assert scorer.clip_scores(opposite, prompts).tolist() == [0.0, 0.0]
    assert scorer.clip_scores(-opposite, prompts).tolist() == pytest.approx([100.0, 100.0])


# ---------------------------------------------------------------- FID


def test_fid_equals_torchmetrics_running_the_network_itself():
    """FID on features extracted once equals torchmetrics' FID when it runs the network itself."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(8)
    real = prepare_images([smooth_image(rng) for _ in range(7)], 32)
    fake = prepare_images([smooth_image(rng, shift=30) for _ in range(5)], 32)
    net = TinyFeatureNet()
    direct = FrechetInceptionDistance(feature=TinyFeatureNet())
    direct.update(real, real=True)
    direct.update(fake, real=False)
    assert evaluate.fid(net(real), net(fake)) == pytest.approx(float(direct.compute()), rel=1e-6)
    assert abs(evaluate.fid(net(real), net(real))) < 1e-3


# ---------------------------------------------------------------- the stage


def test_run_writes_flat_metrics_with_cis_table_and_plots(tmp_path, monkeypatch):
    from helpers import assert_png_shows, record_figures

    root = make_project(tmp_path / "p")
    figures = record_figures(monkeypatch)
    metrics = run_in(root)
    written = json.loads((root / "metrics" / "eval.json").read_text())
    assert written == metrics

    # the top scale is `lora`; no duplicate `lora_scale_1.0` section
    # one LoRA (no samples/replicates): no recipe sections, R = 1, every interval about these weights
    assert set(written) == {"n_real", "bootstrap_redrawn", "real", "base", "lora", "delta", "lora_scale_0.5",
                            "replicates"}
    assert written["replicates"] == {"count": 1}
    assert written["bootstrap_redrawn"] == evaluate.Resampling.draw(
        8, [f"s{i}" for i in range(6) for _ in (0, 1)], DEMO_CFG["bootstrap_resamples"], DEMO_CFG["seed"]).redrawn
    assert set(written["real"]) == {"style_score", "style_score_ci_low", "style_score_ci_high", "style_score_n"}
    assert set(written["base"]) == set(written["lora_scale_0.5"]) == SECTION_KEYS | {"_covers"}
    assert set(written["lora"]) == SECTION_KEYS | {"lora_scale", "_covers"}
    assert set(written["delta"]) == METRIC_KEYS | {"_covers"}
    assert {written[s]["_covers"] for s in ("base", "lora", "delta", "lora_scale_0.5")} == {"images, subjects"}
    assert written["n_real"] == written["real"]["style_score_n"] == 8  # validation rows only
    for section in ("base", "lora_scale_0.5", "lora", "delta"):
        for name in ("clip_score", "style_score", "kid", "cmmd"):
            assert written[section][f"{name}_n"] == 12  # 6 subjects x 2 seeds
            low, value, high = (written[section][f"{name}{s}"] for s in ("_ci_low", "", "_ci_high"))
            assert low <= high
            if name in ("clip_score", "style_score"):  # a mean is inside its percentile interval
                assert low <= value <= high
    # flat numbers only under each key (what `dvc metrics diff` / `dvc exp show` compare), but the
    # `_covers` line saying what the section's intervals cover
    for value in written.values():
        leaves = [x for k, x in value.items() if k != "_covers"] if isinstance(value, dict) else [value]
        assert all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in leaves)
    assert written["lora"]["lora_scale"] == 1.0
    for name in ("clip_score", "style_score", "kid", "cmmd"):
        assert written["delta"][name] == pytest.approx(written["lora"][name] - written["base"][name])
    # the LoRA images are the base images brightened: every distance to the paintings grows with the
    # scale, and the paired KID/CMMD deltas say so with intervals above zero
    for name in ("kid", "cmmd", "fid"):
        assert written["base"][name] < written["lora_scale_0.5"][name] < written["lora"][name]
    assert written["delta"]["kid_ci_low"] > 0 and written["delta"]["cmmd_ci_low"] > 0

    images = pd.read_csv(root / "metrics" / "eval_images.csv")
    assert list(images.columns) == evaluate.IMAGE_COLUMNS
    # the CLIP score is taken against the subject alone, not the prompt with its trigger
    model, preprocess, tokenizer = load_clip("builtin:tiny-clip", "builtin")
    scorer = ClipScorer(model, preprocess, tokenizer)
    first = images.iloc[0]
    with Image.open(root / "samples" / "base" / "eval" / "s000_seed0_scale0.png") as picture:
        features = scorer.image_features([picture.convert("RGB")])
    assert first["subject"] == SUBJECTS[0]
    assert first["clip_score"] == pytest.approx(float(scorer.clip_scores(features, [SUBJECTS[0]])[0]), abs=1e-5)
    assert first["clip_score"] != pytest.approx(float(scorer.clip_scores(features, [f"trig, {SUBJECTS[0]}"])[0]),
                                                abs=1e-5)
    assert len(images) == 3 * 12 and sorted(set(images["lora_scale"])) == [0.0, 0.5, 1.0]
    for scale, section in ((0.0, "base"), (1.0, "lora")):
        rows = images[images["lora_scale"] == scale]
        assert rows["clip_score"].mean() == pytest.approx(written[section]["clip_score"], abs=1e-5)
        assert rows["style_score"].mean() == pytest.approx(written[section]["style_score"], abs=1e-5)
        assert list(zip(rows["prompt_id"], rows["seed"])) == [(f"id{i:03d}", s) for i in range(6) for s in (0, 1)]

    data = pd.read_csv(root / "plots" / "eval_vs_scale.csv")
    assert list(data.columns) == ["metric", "lora_scale", "value", "ci_low", "ci_high", "n"]
    kid_rows = data[data["metric"] == "kid"].set_index("lora_scale")
    assert kid_rows.loc[1.0, "value"] == pytest.approx(written["lora"]["kid"])
    assert kid_rows.loc[0.5, "ci_high"] == pytest.approx(written["lora_scale_0.5"]["kid_ci_high"])
    # the pictures show these numbers: one panel per metric, value and CI at each scale (0 = base)
    names = ["clip_score", "style_score", "kid", "cmmd"]
    sections = ("base", "lora_scale_0.5", "lora")
    lines = figures["eval_vs_scale.png"]
    assert [ax.get_title() for ax in lines.axes] == names
    for ax, name in zip(lines.axes, names):
        line = ax.containers[0].lines[0]  # the errorbar's data line
        assert list(line.get_xdata()) == [0.0, 0.5, 1.0]
        assert list(line.get_ydata()) == pytest.approx([written[k][name] for k in sections])
        bars = ax.containers[0].lines[2][0].get_segments()  # the error bars: from ci_low to ci_high
        assert [y for seg in bars for y in (seg[0][1], seg[1][1])] == pytest.approx(
            [written[k][f"{name}{end}"] for k in sections for end in ("_ci_low", "_ci_high")])
    deltas = figures["eval_delta.png"]
    assert [ax.get_title() for ax in deltas.axes] == [f"Δ {name}" for name in names]
    for ax, name in zip(deltas.axes, names):
        (segment,) = ax.containers[0].lines[2][0].get_segments()
        assert (segment[0][1], segment[1][1]) == pytest.approx(
            (written["delta"][f"{name}_ci_low"], written["delta"][f"{name}_ci_high"]))
    for plot in ("eval_vs_scale.png", "eval_delta.png"):
        assert_png_shows(root / "plots" / plot, figures[plot])

    # deterministic: the CLI on the same inputs writes the very same numbers
    monkeypatch.chdir(root)
    (root / "params.yaml").write_text(yaml.safe_dump({"evaluate": DEMO_CFG}))
    (root / "metrics" / "eval.json").unlink()
    evaluate.main(["--params", "params.yaml"])
    assert json.loads((root / "metrics" / "eval.json").read_text()) == written


def test_identical_lora_images_give_zero_deltas_with_zero_width_cis(tmp_path):
    root = make_project(tmp_path / "p", lora_scales=(1.0,), shift=0)
    delta = run_in(root)["delta"]
    for name in ("clip_score", "style_score", "kid", "cmmd"):
        assert delta[name] == pytest.approx(0.0, abs=1e-9)
        assert delta[f"{name}_ci_low"] == pytest.approx(0.0, abs=1e-9)
        assert delta[f"{name}_ci_high"] == pytest.approx(0.0, abs=1e-9)


def test_reference_and_evaluate_unpickle_nothing(tmp_path, no_pickle_loads):
    """Every file the reference and evaluate stages load with torch.load (the CLIP checkpoint here;
    reference features are safetensors) goes through weights_only=True."""
    root = make_project(tmp_path / "p")
    run_in(root)
    assert no_pickle_loads and all(f.endswith(".pt") for f in no_pickle_loads)


def test_reference_features_are_reused_and_checked(tmp_path, monkeypatch):
    root = make_project(tmp_path / "p")
    ref = root / "data" / "reference"
    info = json.loads((ref / "reference.json").read_text())
    assert info["n"] == 8 and info["ids"] == sorted(info["ids"])
    # evaluate reads the stored real features (and the split's ids): the real images may be gone
    shutil.rmtree(root / "data" / "filtered" / "images")
    seen = []
    original = evaluate.Extractors.features
    monkeypatch.setattr(evaluate.Extractors, "features", lambda self, paths: seen.append(len(paths)) or original(self, paths))
    run_in(root)
    assert seen == [12, 12, 12]  # the generated sets only, never the 8 paintings
    # features from other networks are refused, before any model loads
    with pytest.raises(UserError, match="other feature networks.*dvc repro reference"):
        run_in(root, {**DEMO_CFG, "image_size": 48})


@pytest.mark.parametrize("change", ["one_val_image_moved_to_train", "one_id_renamed"])
def test_reference_features_of_other_paintings_are_refused(tmp_path, monkeypatch, change):
    """New data (another filter.* param, a new download) must not be scored against stale features."""
    root = make_project(tmp_path / "p")
    meta = root / "data" / "filtered" / "metadata.parquet"
    table = pd.read_parquet(meta)
    first_val = table.index[table["split"] == "val"][0]
    if change == "one_val_image_moved_to_train":
        table.loc[first_val, "split"] = "train"
    else:
        table.loc[first_val, "id"] = "f" * 16
    table.to_parquet(meta)
    monkeypatch.setattr(evaluate.Extractors, "load", lambda cfg: pytest.fail("a model loaded before the check"))
    with pytest.raises(UserError) as err:
        run_in(root)
    message = str(err.value)
    assert "other paintings than the validation split" in message and "dvc repro reference" in message
    assert "\n" not in message
    assert not (root / "metrics").exists() and not (root / "plots").exists()


def _remove_lora(root):
    shutil.rmtree(root / "samples" / "lora")


def _empty_base(root):
    (root / "samples" / "base" / "eval.csv").write_text(",".join(evaluate.EVAL_COLUMNS) + "\n")


def _other_eval_set(root):
    csv = root / "samples" / "lora" / "eval.csv"
    pd.read_csv(csv).assign(eval_set="set-2").to_csv(csv, index=False)


def _missing_seed_at_a_scale(root):
    csv = root / "samples" / "lora" / "eval.csv"
    table = pd.read_csv(csv)
    table.drop(index=table[table["lora_scale"] == 0.5].index[0]).to_csv(csv, index=False)


def _missing_png(root):
    (root / "samples" / "base" / "eval" / "s000_seed0_scale0.png").unlink()


def _no_reference(root):
    shutil.rmtree(root / "data" / "reference")


@pytest.mark.parametrize(
    ("breakage", "cfg_change", "needle"),
    [
        (_remove_lora, {}, "run the sample stages first"),
        (_empty_base, {}, "lists no images"),
        (_other_eval_set, {}, "hold different evaluation sets"),
        (_missing_seed_at_a_scale, {}, "lora_scale 0.5 has other subjects or seeds than"),
        (_missing_png, {}, "missing from"),
        (_no_reference, {}, "no reference features"),
        (None, {"fid_features": "inception", "inception_weights": "/nowhere/pt_inception.pth"},
         "inception_weights"),
        (None, {"bootstrap_resamples": 10}, "bootstrap_resamples"),
        (None, {"confidence": 1.5}, "evaluate.confidence"),
        (None, {"cmmd_clip_pretrained": "nope"}, "evaluate.cmmd_clip_pretrained"),
    ],
)
def test_bad_input_is_one_line_before_heavy_work(tmp_path, monkeypatch, breakage, cfg_change, needle):
    root = make_project(tmp_path / "p", n_subjects=2)
    if breakage:
        breakage(root)

    def heavy(*args, **kwargs):
        raise AssertionError("model loaded before the inputs were checked")

    monkeypatch.setattr(evaluate.Extractors, "load", heavy)
    with pytest.raises(UserError) as err:
        run_in(root, {**DEMO_CFG, **cfg_change})
    message = str(err.value)
    assert needle in message and "\n" not in message
    assert not (root / "metrics").exists()
    assert not (root / "plots").exists()


def test_reference_bad_input_is_one_line_and_writes_nothing(tmp_path):
    root = make_project(tmp_path / "p", n_val=reference.MIN_REAL - 1, with_reference=False)
    with pytest.raises(UserError, match=f"{reference.MIN_REAL - 1} validation image.*at least {reference.MIN_REAL}"):
        reference.run({"evaluate": DEMO_CFG}, root / "data" / "filtered", root / "data" / "reference")
    assert not (root / "data" / "reference").exists()
    assert reference.MIN_REAL == 5  # the number stats.py's docstring argues for


def test_evaluate_refuses_too_few_paintings_before_any_network(tmp_path, monkeypatch):
    """A reference of another config (or an older, smaller one) is refused by evaluate too."""
    root = make_project(tmp_path / "p", n_val=8)
    ids = list(evaluate.validation_split(root / "data" / "filtered")["id"])
    real = {k: v[: reference.MIN_REAL - 1] for k, v in evaluate.load_reference(
        root / "data" / "reference", evaluate.EvaluateParams.check({"evaluate": DEMO_CFG}), ids)[0].items()}
    monkeypatch.setattr(evaluate, "load_reference", lambda *a: (real, reference.MIN_REAL - 1))
    monkeypatch.setattr(evaluate.Extractors, "load", lambda *a: pytest.fail("a network was loaded"))
    with pytest.raises(UserError, match=f"{reference.MIN_REAL - 1} validation painting.*at least {reference.MIN_REAL}"):
        run_in(root, DEMO_CFG)
    assert not (root / "metrics").exists()


def test_main_reports_bad_input_as_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": DEMO_CFG}))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "samples" in err and "run the sample stages first" in err


def test_summary_gives_n_ci_and_flags_fid(tmp_path):
    metrics = run_in(make_project(tmp_path / "p"))
    lines = evaluate.summary_lines(metrics)
    assert lines[0].startswith("evaluate: 12 images per model, 8 validation paintings")
    kid_line = next(line for line in lines if line.strip().startswith("kid:"))
    assert "(n=12)" in kid_line and kid_line.endswith("— significant")
    assert "biased: n=12 < 2000" in lines[-2]
    assert "training noise unmeasured" in lines[-1]


def test_replicates_add_recipe_sections_covering_training_seeds(tmp_path):
    """samples/replicates/<k> (what sample --replicates writes) gives recipe and recipe_delta sections
    whose intervals include the replicates' spread, and one per-image table of every replicate."""
    root = make_project(tmp_path / "p", shift=60)
    lora = pd.read_csv(root / "samples" / "lora" / "eval.csv")
    folder = root / "samples" / "replicates"
    for k, shift in ((1, 120), (2, 90)):  # other training seeds: other brightening
        (folder / str(k) / "eval").mkdir(parents=True)
        for _, row in lora.iterrows():
            with Image.open(root / "samples" / "base" / row["file"].replace(f"scale{row['lora_scale']:g}", "scale0")) \
                    as base_image:
                brighten(base_image.convert("RGB"), int(shift * row["lora_scale"])).save(folder / str(k) / row["file"])
        lora.to_csv(folder / str(k) / "eval.csv", index=False)
    (folder / "replicates.json").write_text(json.dumps({"count": 3, "seeds": [42, 1, 2]}))
    metrics = run_in(root)
    assert metrics["replicates"] == {"count": 3}
    for section in ("recipe", "recipe_delta"):
        assert metrics[section]["replicates"] == 3
        assert metrics[section]["_covers"] == "images, subjects, training seeds"
        for name in ("clip_score", "style_score", "kid", "cmmd"):
            low, value, high = (metrics[section][f"{name}{s}"] for s in ("_ci_low", "", "_ci_high"))
            assert low < value < high and metrics[section][f"{name}_se"] > 0 and metrics[section][f"{name}_df"] >= 1
    # the recipe's KID is the mean of the three LoRAs' and its interval is wider than one LoRA's
    assert metrics["recipe"]["kid_ci_high"] - metrics["recipe"]["kid_ci_low"] > \
        metrics["lora"]["kid_ci_high"] - metrics["lora"]["kid_ci_low"]
    summary = evaluate.summary_lines(metrics)
    assert any(line.startswith("recipe over 3 training seeds − base") and "images, subjects, training seeds" in line
               for line in summary)
    table = pd.read_csv(root / "metrics" / "eval_replicates.csv")
    assert sorted(set(table["replicate"])) == [0, 1, 2] and len(table) == 3 * 2 * 12
    top = table[table["lora_scale"] == 1.0]
    assert metrics["recipe"]["style_score"] == pytest.approx(top["style_score"].mean(), abs=1e-5)
    # a replicate folder of another evaluation set stops with one line
    broken = lora.assign(eval_set="set-2")
    broken.to_csv(folder / "2" / "eval.csv", index=False)
    with pytest.raises(UserError, match="another evaluation set"):
        run_in(root)
