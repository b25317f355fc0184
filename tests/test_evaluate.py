"""The evaluate stage: shared preprocessing, FID/KID, CLIP and style scores, metrics JSON, bad input."""

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

from impressionist import evaluate
from impressionist.errors import UserError
from impressionist.evaluate import (
    ClipScorer, FidKid, kid_subset_size, prepare_images, run, style_prompts,
)
from impressionist.feature_nets import TinyFeatureNet, load_clip
from impressionist.wikiart import STYLES

DEMO_CFG = {
    "fid_features": "builtin:tiny",
    "inception_weights": "",
    "image_size": 32,
    "kid_subset_size": 1000,
    "clip_model": "builtin:tiny-clip",
    "clip_pretrained": "builtin",
    "seed": 0,
}
SECTION_KEYS = {"fid", "kid_mean", "kid_std", "clip_score", "style_score", "n_fake", "kid_subset_size"}
DELTA_KEYS = {"fid", "kid_mean", "kid_std", "clip_score", "style_score"}


@pytest.fixture(scope="module")
def tiny_clip(isolated_cache):
    return load_clip("builtin:tiny-clip", "builtin")


def smooth_image(rng: np.random.Generator, size: tuple[int, int] = (48, 48), shift: int = 0) -> Image.Image:
    """A random low-frequency RGB picture, brightened by ``shift``."""
    low = rng.integers(0, 200, (6, 6, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(low).resize(size, Image.BICUBIC)).astype(np.int16) + shift
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def brighten(images: list[Image.Image], shift: int) -> list[Image.Image]:
    return [Image.fromarray(np.clip(np.asarray(im).astype(np.int16) + shift, 0, 255).astype(np.uint8))
            for im in images]


def make_project(root: Path, *, n_val: int = 6, n_train: int = 3, n_base: int = 4,
                 lora_scales: tuple[float, ...] = (0.5, 1.0), per_scale: int = 4, seed: int = 0) -> Path:
    """samples/{base,lora} and data/filtered as the sample and filter stages write them.

    LoRA images are brightened in proportion to their scale, so at scale 1.0 they are clearly further
    from the real (validation) images than the base images, which share the real images' distribution.
    """
    rng = np.random.default_rng(seed)
    prompts = ["a harbor at sunset", "water lilies on a pond"]
    for name, scales, count in (("base", (0.0,), n_base), ("lora", lora_scales, per_scale)):
        folder = root / "samples" / name
        folder.mkdir(parents=True)
        rows = []
        for scale in scales:
            for i in range(count):
                file = f"{name}-{scale}-{i}.png"
                smooth_image(rng, (48, 48), shift=int(90 * scale)).save(folder / file)
                rows.append({"file": file, "prompt": f"impr3ssionism, {prompts[i % 2]}", "seed": i,
                             "lora_scale": scale})
        pd.DataFrame(rows).to_csv(folder / "samples.csv", index=False)
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
    return root


def run_in(root: Path, cfg: dict | None = None) -> dict:
    return run(cfg or DEMO_CFG, root / "samples", root / "data" / "filtered",
               root / "metrics" / "eval.json", root / "plots")


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


# ---------------------------------------------------------------- FID / KID


def test_fid_zero_for_same_set_and_grows_with_shift():
    rng = np.random.default_rng(3)
    real = [smooth_image(rng) for _ in range(12)]
    scorer = FidKid(TinyFeatureNet(), kid_subset_size=1000, seed=0)
    scorer.add_real(prepare_images(real, 32))

    results = {}
    for shift in (0, 40, 80):
        scorer.add_fake(prepare_images(brighten(real, shift), 32))
        results[shift] = scorer.compute()
    assert abs(results[0]["fid"]) < 1e-3
    assert results[40]["fid"] > 100 * max(abs(results[0]["fid"]), 1e-6)
    assert results[80]["fid"] > results[40]["fid"]
    assert results[80]["kid_mean"] > results[40]["kid_mean"] > results[0]["kid_mean"]

    # the same pictures as float tensors, or at twice the size, score (almost) the same
    shifted = brighten(real, 40)
    as_float = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255 for im in shifted]
    scorer.add_fake(prepare_images(as_float, 32))
    assert scorer.compute()["fid"] == pytest.approx(results[40]["fid"], rel=1e-6)
    scorer.add_fake(prepare_images([im.resize((96, 96), Image.BICUBIC) for im in shifted], 32))
    assert scorer.compute()["fid"] == pytest.approx(results[40]["fid"], rel=0.25)


class CountingNet(TinyFeatureNet):
    """The tiny feature net, counting the images it is run on."""

    def __init__(self):
        super().__init__()
        self.images_seen = 0

    def forward(self, images):
        self.images_seen += images.shape[0]
        return super().forward(images)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_fid_and_kid_share_one_feature_pass_and_equal_torchmetrics_own():
    """Each image goes through the feature network once, and FID/KID are what torchmetrics gives when
    each metric runs the network itself."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(8)
    real = prepare_images([smooth_image(rng) for _ in range(7)], 32)
    fake = prepare_images([smooth_image(rng, shift=30) for _ in range(5)], 32)
    net = CountingNet()
    scorer = FidKid(net, kid_subset_size=4, seed=3)
    scorer.add_real(real)
    scorer.add_fake(fake)
    ours = scorer.compute()
    assert net.images_seen == 7 + 5

    fid = FrechetInceptionDistance(feature=TinyFeatureNet())
    kid = KernelInceptionDistance(feature=TinyFeatureNet(), subsets=evaluate.KID_SUBSETS, subset_size=4)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # FidKid draws KID's subsets from its seed
        kid_mean, kid_std = kid.compute()
    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-9)
    assert (ours["kid_mean"], ours["kid_std"]) == pytest.approx((float(kid_mean), float(kid_std)), rel=1e-9)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_subset_size_adapts_and_is_seeded():
    assert kid_subset_size(1000, 5, 3) == 3
    assert kid_subset_size(1000, 3, 7) == 3
    assert kid_subset_size(4, 10, 10) == 4

    rng = np.random.default_rng(4)
    real = prepare_images([smooth_image(rng) for _ in range(5)], 32)
    fake = prepare_images([smooth_image(rng, shift=30) for _ in range(3)], 32)
    scorer = FidKid(TinyFeatureNet(), kid_subset_size=1000, seed=0)
    scorer.add_real(real)
    scorer.add_fake(fake)
    result = scorer.compute()
    assert result["kid_subset_size"] == 3
    assert math.isfinite(result["kid_mean"]) and result["kid_mean"] > 0

    # torchmetrics on its own refuses a subset larger than the set: the adaptation is what makes it work
    from torchmetrics.image.kid import KernelInceptionDistance

    plain = KernelInceptionDistance(feature=TinyFeatureNet(), subset_size=1000)
    plain.update(real, real=True)
    plain.update(fake, real=False)
    with pytest.raises(ValueError):
        plain.compute()

    # subsets are drawn from the seed: same seed, same KID; another seed, another draw
    many_real = prepare_images([smooth_image(rng) for _ in range(8)], 32)
    many_fake = prepare_images([smooth_image(rng, shift=30) for _ in range(8)], 32)

    def kid(seed):
        scorer = FidKid(TinyFeatureNet(), kid_subset_size=4, seed=seed)
        scorer.add_real(many_real)
        scorer.add_fake(many_fake)
        return scorer.compute()

    assert kid(0) == kid(0)
    assert kid(0)["kid_mean"] != kid(1)["kid_mean"]


def test_fid_needs_two_images_per_side():
    rng = np.random.default_rng(5)
    scorer = FidKid(TinyFeatureNet())
    scorer.add_real(prepare_images([smooth_image(rng) for _ in range(4)], 32))
    scorer.add_fake(prepare_images([smooth_image(rng)], 32))
    with pytest.raises(UserError, match="at least 2"):
        scorer.compute()


# ---------------------------------------------------------------- CLIP score and style score


def test_clip_score_equals_direct_open_clip(tiny_clip):
    import open_clip

    model, preprocess, tokenizer = tiny_clip
    rng = np.random.default_rng(6)
    images = [smooth_image(rng, (40 + 8 * i, 48)) for i in range(5)]
    prompts = ["a harbor at sunset", "a woman with a parasol in a field"] * 2 + ["water lilies on a pond"]

    scorer = ClipScorer(model, preprocess, tokenizer)
    ours = scorer.clip_score(scorer.image_features(images), prompts)

    direct = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            image_emb = model.encode_image(preprocess(image)[None])
            text_emb = model.encode_text(open_clip.tokenize([prompt]))
            direct.append(100 * max(F.cosine_similarity(image_emb, text_emb).item(), 0.0))
    assert ours == pytest.approx(sum(direct) / len(direct), rel=1e-5)
    # a prompt really matters: scoring against other prompts gives another value
    assert scorer.clip_score(scorer.image_features(images), ["a cubist guitar"] * 5) != pytest.approx(ours)


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
    assert scorer.style_score(feats) == pytest.approx(expected, rel=1e-5)


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
    impressionist = scorer.style_score(scorer.image_features(reddish))
    cubist = scorer.style_score(scorer.image_features(bluish))
    assert impressionist > 0.9 > 0.1 > cubist


def test_clip_score_clamps_negative_cosine_to_zero():
    model, preprocess, tokenizer = planted_tools()
    scorer = ClipScorer(model, preprocess, tokenizer)
    opposite = -torch.eye(len(STYLES))[:2]  # exactly opposite to the first two prompts' embeddings
    prompts = style_prompts()[:2]
    assert scorer.clip_score(opposite, prompts) == 0.0
    assert scorer.clip_score(-opposite, prompts) == pytest.approx(100.0)


# ---------------------------------------------------------------- the stage


def test_run_writes_stable_metrics_and_plots(tmp_path, monkeypatch):
    from conftest import assert_png_shows, record_figures

    root = make_project(tmp_path / "p")
    figures = record_figures(monkeypatch)
    metrics = run_in(root)
    written = json.loads((root / "metrics" / "eval.json").read_text())
    assert written == metrics

    assert set(written) == {"n_real", "real", "base", "lora", "delta", "lora_scale_0.5", "lora_scale_1.0"}
    assert set(written["real"]) == {"style_score"}
    assert set(written["base"]) == SECTION_KEYS
    assert set(written["lora_scale_0.5"]) == set(written["lora_scale_1.0"]) == SECTION_KEYS
    assert set(written["lora"]) == SECTION_KEYS | {"lora_scale"}
    assert set(written["delta"]) == DELTA_KEYS

    assert written["n_real"] == 6  # validation rows only, not the 3 training rows
    assert written["base"]["n_fake"] == written["lora_scale_1.0"]["n_fake"] == 4
    # KID's subset size, lowered from the requested 1000 to the smaller side (4 generated images)
    assert written["base"]["kid_subset_size"] == written["lora"]["kid_subset_size"] == 4
    # flat numbers only under each key: what `dvc metrics diff` / `dvc exp show` compare
    for value in written.values():
        leaves = value.values() if isinstance(value, dict) else [value]
        assert all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in leaves)
    assert written["lora"]["lora_scale"] == 1.0
    assert {k: v for k, v in written["lora"].items() if k != "lora_scale"} == written["lora_scale_1.0"]
    for name in DELTA_KEYS:
        assert written["delta"][name] == pytest.approx(written["lora"][name] - written["base"][name])
    # base images share the real images' distribution; LoRA images are brightened with their scale
    assert written["base"]["fid"] < written["lora_scale_0.5"]["fid"] < written["lora_scale_1.0"]["fid"]
    for section in ("base", "lora_scale_0.5", "lora_scale_1.0"):
        assert 0.0 <= written[section]["clip_score"] <= 100.0
        assert 0.0 < written[section]["style_score"] < 1.0

    # the plots show these numbers: one panel per metric (kid_std is kid_mean's error bar)
    shown = [name for name in evaluate.METRICS if name != "kid_std"]
    bars = figures["eval_base_vs_lora.png"]
    assert [ax.get_title() for ax in bars.axes] == shown
    for ax, name in zip(bars.axes, shown):
        heights = [bar.get_height() for bar in ax.containers[-1]]
        assert heights == pytest.approx([written["base"][name], written["lora"][name]])
    kid_errors = bars.axes[shown.index("kid_mean")].containers[0].lines[2][0].get_segments()
    assert [s[1][1] - s[0][1] for s in kid_errors] == pytest.approx(
        [2 * written["base"]["kid_std"], 2 * written["lora"]["kid_std"]])
    lines = figures["eval_vs_scale.png"]
    assert [ax.get_title() for ax in lines.axes] == shown
    for ax, name in zip(lines.axes, shown):
        (line,) = ax.get_lines()
        assert list(line.get_xdata()) == [0.0, 0.5, 1.0]
        assert list(line.get_ydata()) == pytest.approx(
            [written[key][name] for key in ("base", "lora_scale_0.5", "lora_scale_1.0")])
    for plot in ("eval_base_vs_lora.png", "eval_vs_scale.png"):
        assert_png_shows(root / "plots" / plot, figures[plot])

    # deterministic: the CLI on the same inputs writes the very same numbers
    monkeypatch.chdir(root)
    (root / "params.yaml").write_text(yaml.safe_dump({"evaluate": DEMO_CFG}))
    (root / "metrics" / "eval.json").unlink()
    evaluate.main(["--params", "params.yaml"])
    assert json.loads((root / "metrics" / "eval.json").read_text()) == written


def _remove_lora(root):
    shutil.rmtree(root / "samples" / "lora")


def _empty_base(root):
    (root / "samples" / "base" / "samples.csv").write_text("file,prompt,seed,lora_scale\n")


def _drop_split(root):
    meta = root / "data" / "filtered" / "metadata.parquet"
    pd.read_parquet(meta).drop(columns="split").to_parquet(meta)


def _no_val(root):
    meta = root / "data" / "filtered" / "metadata.parquet"
    pd.read_parquet(meta).assign(split="train").to_parquet(meta)


def _one_image_at_a_scale(root):
    csv = root / "samples" / "lora" / "samples.csv"
    table = pd.read_csv(csv)
    keep = table[table["lora_scale"] != 0.5]
    pd.concat([keep, table[table["lora_scale"] == 0.5].head(1)]).to_csv(csv, index=False)


def _missing_png(root):
    (root / "samples" / "base" / "base-0.0-1.png").unlink()


@pytest.mark.parametrize(
    ("breakage", "cfg_change", "needle"),
    [
        (_remove_lora, {}, "run the sample stages first"),
        (_empty_base, {}, "lists no images"),
        (_drop_split, {}, "lacks column(s) split; rerun the filter stage"),
        (_no_val, {}, "0 validation image(s); FID and KID need at least 2 real images — raise "
                      "filter.val_fraction"),
        (_one_image_at_a_scale, {}, "has 1 image(s) at lora_scale 0.5; FID/KID need at least 2 per set "
                                    "(prompts x seeds) — add seeds to sample.seeds or prompts to "
                                    "sample.prompts / sample.val_captions"),
        (_missing_png, {}, "missing from"),
        (None, {"fid_features": "inception", "inception_weights": "/nowhere/pt_inception.pth"},
         "inception_weights"),
        (None, {"kid_subset_size": 1}, "kid_subset_size"),
    ],
)
def test_bad_input_is_one_line_before_heavy_work(tmp_path, monkeypatch, breakage, cfg_change, needle):
    root = make_project(tmp_path / "p", n_base=3, per_scale=3)
    if breakage:
        breakage(root)

    def heavy(*args, **kwargs):
        raise AssertionError("model loaded before the inputs were checked")

    monkeypatch.setattr(evaluate, "fid_feature_extractor", heavy)
    monkeypatch.setattr(evaluate, "load_clip", heavy)
    with pytest.raises(UserError) as err:
        run_in(root, {**DEMO_CFG, **cfg_change})
    message = str(err.value)
    assert needle in message and "\n" not in message
    assert not (root / "metrics").exists()
    assert not (root / "plots").exists()


def test_main_reports_bad_input_as_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": DEMO_CFG}))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "samples" in err and "run the sample stages first" in err


def test_small_sample_note_points_to_kid():
    metrics = {"n_real": 600, "base": {"n_fake": 800}, "lora": {"n_fake": 12, "lora_scale": 1.0},
               "delta": {"fid": 1.0}, "real": {"style_score": 0.5}}
    note = evaluate.small_sample_note(metrics)
    assert note.startswith("note: FID from 12 images") and "kid_mean" in note and "\n" not in note
    assert evaluate.small_sample_note({**metrics, "lora": {"n_fake": 900}}) is None
    assert "from 3 images" in evaluate.small_sample_note({**metrics, "n_real": 3, "lora": {"n_fake": 900}})
