"""Feature networks for FID/KID and CLIP: tiny offline nets, and the real ones' offline errors."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from impressionist import feature_nets
from impressionist.errors import UserError
from impressionist.feature_nets import (
    TinyFeatureNet, cache_dir, fid_feature_extractor, load_clip, tiny_clip_checkpoint,
)
from impressionist.image_features import EvaluateParams

# The evaluate params of the offline networks, which EvaluateParams accepts without any download.
TINY_EVALUATE = {"fid_features": "builtin:tiny", "image_size": 32, "clip_model": "builtin:tiny-clip",
                 "clip_pretrained": "builtin", "cmmd_clip_model": "builtin:tiny-clip",
                 "cmmd_clip_pretrained": "builtin"}


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------- FID / KID feature nets


def test_tiny_feature_net_is_fixed_and_frozen():
    a, b = fid_feature_extractor("builtin:tiny"), TinyFeatureNet()
    assert isinstance(a, TinyFeatureNet)
    assert isinstance(a.num_features, int) and a.num_features > 0
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not any(p.requires_grad for p in a.parameters())
    a.train()
    assert not a.training
    # another seed really gives another network (so the equality above is not vacuous)
    other = TinyFeatureNet(seed=1)
    assert not torch.equal(other.body[0].weight, a.body[0].weight)


def test_tiny_feature_net_reads_uint8_and_float_alike():
    net = TinyFeatureNet()
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    from_uint8 = net(images)
    from_float = net(images.float() / 255.0)
    assert from_uint8.shape == (5, net.num_features)
    torch.testing.assert_close(from_uint8, from_float)
    # features depend on the image: two different images do not collapse to one vector
    assert not torch.allclose(from_uint8[0], from_uint8[1])
    with pytest.raises(ValueError):
        net(torch.zeros(2, 1, 8, 8))


def test_unknown_fid_features_is_a_user_error():
    with pytest.raises(UserError, match="fid_features"):
        EvaluateParams.of({**TINY_EVALUATE, "fid_features": "resnet"})


def test_inception_offline_download_is_one_line_user_error(monkeypatch, tmp_path):
    """No network and no cached weights: one line saying what is missing and what to do."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as err:
        fid_feature_extractor("inception", "")
    message = _one_line(err)
    assert "Inception weights" in message
    assert "evaluate.inception_weights" in message
    assert "demo" in message


def test_inception_weights_path_missing_or_broken(tmp_path):
    with pytest.raises(UserError) as err:
        EvaluateParams.of({**TINY_EVALUATE, "fid_features": "inception",
                           "inception_weights": str(tmp_path / "nope.pth")})
    assert "does not exist" in _one_line(err)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError) as err:
        fid_feature_extractor("inception", str(broken))
    assert "broken.pth" in _one_line(err)


def test_inception_local_weights_load_through_torchmetrics(monkeypatch, tmp_path, no_pickle_loads):
    """A local weights file goes through torchmetrics' NoTrainInceptionV3, read with
    weights_only=True (torch-fidelity's own loader would unpickle it with weights_only=False)."""
    from torch_fidelity import feature_extractor_inceptionv3 as tfi
    from torchmetrics.image.fid import NoTrainInceptionV3

    # Make a random-weights file with the right keys, without any download.
    with monkeypatch.context() as patch:
        patch.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        donor = NoTrainInceptionV3("inception-v3-compat", ["2048"])
    state = {k: torch.randn_like(v) * 0.05 if v.is_floating_point() else v for k, v in donor.state_dict().items()}
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state, weights)

    net = fid_feature_extractor("inception", str(weights))
    assert no_pickle_loads == [str(weights)]
    assert isinstance(net, NoTrainInceptionV3)
    assert net.num_features == 2048
    torch.testing.assert_close(net.state_dict()["fc.weight"], state["fc.weight"])
    out = net(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert out.shape == (2, 2048)


# ---------------------------------------------------------------- CLIP


def test_cache_dir_follows_env_or_cwd(monkeypatch, tmp_path):
    monkeypatch.setenv("IMPRESSIONIST_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("IMPRESSIONIST_CACHE")
    monkeypatch.chdir(tmp_path)
    assert cache_dir() == tmp_path / ".cache" / "impressionist"


def test_tiny_clip_is_built_once_and_identical_across_caches(monkeypatch, tmp_path, isolated_cache):
    import open_clip

    model, preprocess, tokenizer = load_clip("builtin:tiny-clip", "builtin")
    checkpoint = tiny_clip_checkpoint()
    assert checkpoint.is_file() and checkpoint.parent.parent == isolated_cache
    stamp = checkpoint.stat().st_mtime_ns
    load_clip("builtin:tiny-clip", "builtin")
    assert checkpoint.stat().st_mtime_ns == stamp  # reused, not rebuilt

    # A fresh cache folder builds the very same weights (fixed seed), and the loaded model holds them.
    monkeypatch.setenv("IMPRESSIONIST_CACHE", str(tmp_path / "fresh"))
    rebuilt = torch.load(tiny_clip_checkpoint(), weights_only=True)
    saved = torch.load(checkpoint, weights_only=True)
    assert rebuilt.keys() == saved.keys() == model.state_dict().keys()
    for key in saved:
        assert torch.equal(rebuilt[key], saved[key]), key
        assert torch.equal(model.state_dict()[key], saved[key]), key

    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # open_clip's own BPE tokenizer
    assert torch.equal(tokenizer(["a harbor at sunset"]), open_clip.tokenize(["a harbor at sunset"]))
    from PIL import Image

    pixels = preprocess(Image.new("RGB", (50, 70), (200, 100, 50)))
    size = feature_nets.TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    assert pixels.shape == (3, size, size)
    assert model.encode_image(pixels[None]).shape == (1, feature_nets.TINY_CLIP_CONFIG["embed_dim"])


def test_tiny_clip_wrong_pretrained_is_user_error():
    with pytest.raises(UserError, match="builtin"):
        load_clip("builtin:tiny-clip", "openai")


def test_real_clip_offline_download_is_one_line_user_error(monkeypatch):
    import open_clip.factory
    import open_clip.model

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    def must_not_build(*args, **kwargs):
        raise AssertionError("built the 428M-parameter model before the weights were there")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    monkeypatch.setattr(open_clip.model.CLIP, "__init__", must_not_build)
    with pytest.raises(UserError) as err:
        load_clip("ViT-L-14", "openai")
    message = _one_line(err)
    assert "ViT-L-14" in message and "clip_pretrained" in message
    assert "couldn't connect" in message  # the reason is the failed download, not any other failure


def test_real_recipe_clip_is_built_with_quick_gelu(monkeypatch, tmp_path):
    """params.yaml's CLIP (ViT-L-14 + openai) was trained with QuickGELU; open_clip builds plain GELU for
    "ViT-L-14" unless told. Built on the meta device with a stand-in download: no network, no 1.7 GB."""
    import open_clip.factory
    import yaml
    from helpers import committed_params_text
    from open_clip.transformer import QuickGELU

    cfg = yaml.safe_load(committed_params_text())["evaluate"]
    assert open_clip.get_pretrained_cfg(cfg["clip_model"], cfg["clip_pretrained"]).get("quick_gelu")
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"stand-in")
    loaded = []
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: str(weights))
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda model, path, **k: loaded.append(path))
    monkeypatch.setattr(open_clip.factory, "_set_model_device_and_precision", lambda *a, **k: None)
    with torch.device("meta"):
        model, _, _ = load_clip(cfg["clip_model"], cfg["clip_pretrained"])
    assert loaded == [str(weights)]
    activations = {type(m) for m in model.modules() if type(m).__name__ in ("GELU", "QuickGELU")}
    assert activations == {QuickGELU}
    # A tag trained with plain GELU keeps it.
    assert not feature_nets.needs_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")


@pytest.mark.parametrize(
    ("model", "pretrained", "needle"),
    [
        ("ViT-Nonexistent-99", "openai", "clip_model"),
        ("ViT-L-14", "/nowhere/clip.pt", "clip_pretrained"),
        ("ViT-L-14", "", "clip_pretrained"),
    ],
)
def test_real_clip_bad_params_fail_before_download(monkeypatch, model, pretrained, needle):
    import open_clip.factory

    def must_not_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", must_not_download)
    with pytest.raises(UserError) as err:
        load_clip(model, pretrained)
    assert needle in _one_line(err)
