"""The encode cache: buckets, FLUX latent scaling, flips, shards and caption embeddings."""

import copy

import pandas as pd
import pytest
import torch
from PIL import Image

from impressionist import encode
from impressionist.errors import UserError
from impressionist.latent_cache import EMPTY_CAPTION_KEY, CacheReader
from impressionist.models import load_text_pipeline, load_vae


def test_buckets_are_multiples_of_16_near_the_target_area():
    buckets = encode.aspect_buckets(512, 0.5, 2.0)
    assert (512, 512) in buckets
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0
        assert 0.5 <= w / h <= 2.0
        assert abs(h * w - 512 * 512) / (512 * 512) < 0.1
    assert encode.nearest_bucket(300, 600, buckets)[1] > encode.nearest_bucket(300, 600, buckets)[0]
    assert encode.nearest_bucket(600, 300, buckets)[0] > encode.nearest_bucket(600, 300, buckets)[1]


def test_crop_to_bucket_keeps_the_bucket_size():
    image = Image.new("RGB", (333, 150))
    assert encode.crop_to_bucket(image, (64, 128)).size == (128, 64)


@pytest.fixture(scope="module")
def flip_cache(tmp_path_factory, _demo_params_master, tiny_flux_dir):
    from helpers import write_filtered_dataset

    root = tmp_path_factory.mktemp("flip")
    filtered, captions = write_filtered_dataset(root, n_images=8)
    params = copy.deepcopy(_demo_params_master)
    params["encode"].update(flip=True, shard_size=3, batch_size=3)  # several batches of each kind
    encode.run(params, filtered, captions, root / "cache")
    return root, params


def test_latents_are_the_scaled_vae_posterior_mean(flip_cache, tiny_flux_dir):
    root, params = flip_cache
    cache = CacheReader(root / "cache")
    sample = next(s for s in cache.samples if not s["flip"])
    image = encode.crop_to_bucket(Image.open(root / "filtered/images" / f"{sample['id']}.png").convert("RGB"),
                                  tuple(sample["bucket"]))
    vae = load_vae(tiny_flux_dir, torch.float32)
    with torch.no_grad():
        mean = vae.encode(encode.to_pixels([image])).latent_dist.mean[0]
    expected = (mean - vae.config.shift_factor) * vae.config.scaling_factor
    # encode ran the image in a batch with others: convolution order differs in the last digits
    torch.testing.assert_close(cache.latent(sample), expected, atol=1e-3, rtol=1e-3)
    h, w = sample["bucket"]
    assert cache.latent(sample).shape == (16, h // 8, w // 8)


def test_flip_copies_and_shards(flip_cache):
    root, _ = flip_cache
    cache = CacheReader(root / "cache")
    plain = {s["id"]: s for s in cache.samples if not s["flip"]}
    flipped = {s["id"]: s for s in cache.samples if s["flip"]}
    assert plain.keys() == flipped.keys() and len(plain) == 7  # 8 images, one in the val split
    some = next(iter(plain))
    assert not torch.equal(cache.latent(plain[some]), cache.latent(flipped[some]))
    assert len(list((root / "cache/latents").glob("latents-*.safetensors"))) == -(-14 // 3)  # 14 latents, 3 per shard


def test_each_distinct_caption_is_encoded_once_plus_the_empty_one(flip_cache, tiny_flux_dir):
    root, params = flip_cache
    cache = CacheReader(root / "cache")
    keys = {s["caption_key"] for s in cache.samples}
    assert set(cache.index["text"]) == keys | {EMPTY_CAPTION_KEY}
    pipe = load_text_pipeline(tiny_flux_dir, torch.float32)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt=[""], prompt_2=None, device="cpu",
                                               max_sequence_length=params["caption"]["max_sequence_length"])
    cached_embeds, cached_pooled = cache.text(EMPTY_CAPTION_KEY)
    torch.testing.assert_close(cached_embeds, embeds[0])
    torch.testing.assert_close(cached_pooled, pooled[0])
    assert cached_embeds.shape[0] == params["caption"]["max_sequence_length"]


def test_bad_input_leaves_no_cache(demo_params, tmp_path):
    from helpers import write_filtered_dataset

    filtered, captions = write_filtered_dataset(tmp_path, n_images=3)
    demo_params["encode"]["resolution"] = 72
    with pytest.raises(UserError, match="multiple of 16"):
        encode.run(demo_params, filtered, captions, tmp_path / "cache")
    demo_params["encode"]["resolution"] = 64
    with pytest.raises(UserError, match="run the caption stage first"):
        encode.run(demo_params, filtered, tmp_path / "missing.parquet", tmp_path / "cache")
    del demo_params["encode"]["shard_size"]
    with pytest.raises(UserError, match="'encode.shard_size' is missing"):
        encode.run(demo_params, filtered, captions, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_failure_mid_run_leaves_no_cache_and_no_temporary_folder(demo_params, tmp_path):
    from helpers import write_filtered_dataset

    filtered, captions = write_filtered_dataset(tmp_path, n_images=6)
    # A corrupt training image is only met while latents are written into the temporary folder.
    (filtered / "images" / f"{4:016x}.png").write_bytes(b"not a png")
    leftover = tmp_path / ".cache.tmp-0badf00d"  # what a SIGKILLed earlier run leaves
    leftover.mkdir()
    (leftover / "latents-00000.safetensors").write_bytes(b"partial")
    with pytest.raises(UserError, match="cannot be read as an image") as err:
        encode.run(demo_params, filtered, captions, tmp_path / "cache")
    assert "\n" not in str(err.value) and "re-run the filter stage" in str(err.value)
    assert not (tmp_path / "cache").exists()
    assert not list(tmp_path.glob(".cache.tmp-*"))


def test_data_loader_workers_do_not_change_the_cache(demo_params, tmp_path):
    from helpers import write_filtered_dataset

    filtered, captions = write_filtered_dataset(tmp_path, n_images=7)
    demo_params["encode"].update(batch_size=2, shard_size=3, flip=True)
    for workers in (0, 2):
        demo_params["encode"]["dataloader_workers"] = workers
        encode.run(copy.deepcopy(demo_params), filtered, captions, tmp_path / f"cache{workers}")
    files = sorted(p.relative_to(tmp_path / "cache0").as_posix() for p in (tmp_path / "cache0").rglob("*.*"))
    assert files == sorted(p.relative_to(tmp_path / "cache2").as_posix() for p in (tmp_path / "cache2").rglob("*.*"))
    latents = len(CacheReader(tmp_path / "cache2").samples)
    n_train = int((pd.read_parquet(filtered / "metadata.parquet")["split"] == "train").sum())
    assert latents == 2 * n_train == 12  # each of the 6 training images and its flipped copy
    assert len([f for f in files if f.startswith("latents/latents-")]) == -(-latents // 3)  # 3 a shard
    for name in files:  # the fingerprint too: a worker-count change keeps the cache valid for train
        assert (tmp_path / "cache0" / name).read_bytes() == (tmp_path / "cache2" / name).read_bytes(), name


def test_the_dvc_stage_depends_on_every_encode_param_that_shapes_the_cache():
    import yaml

    from helpers import REPO

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stage, text = stages["encode_latents"], stages["encode_text"]
    declared = {p.split(".", 1)[1] for p in stage["params"] if isinstance(p, str) and p.startswith("encode.")}
    keys = set(yaml.safe_load((REPO / "params.yaml").read_text())["encode"])
    assert declared == keys - encode.NOT_CACHED
    assert "encode" not in stage["params"]  # the whole section would re-encode on a worker-count change
    # the text half reads only encode.TEXT_KEYS and the captions, never data/filtered or the resolution
    assert {p.split(".", 1)[1] for p in text["params"] if p.startswith("encode.")} == set(encode.TEXT_KEYS)
    assert "caption.max_sequence_length" in text["params"] and "caption.max_sequence_length" not in stage["params"]
    assert "data/captions" in text["deps"] and "data/filtered" not in text["deps"]
    assert "data/filtered" in stage["deps"] and "data/captions" not in stage["deps"]


def test_a_caption_change_keeps_the_latents_and_changes_only_the_text(demo_params, tmp_path):
    """The two halves are keyed apart: new captions re-encode the text, the latents stay byte for
    byte, and the joined fingerprint (the training run hash's input) still changes."""
    from helpers import write_filtered_dataset

    filtered, captions = write_filtered_dataset(tmp_path, n_images=4)
    encode.run(copy.deepcopy(demo_params), filtered, captions, tmp_path / "a")
    first = CacheReader(tmp_path / "a")
    table = pd.read_parquet(captions)
    table["caption"] = table["caption"] + ", with a boat"
    table.to_parquet(captions, index=False)
    encode.run_text(copy.deepcopy(demo_params), captions, tmp_path / "a/text")
    second = CacheReader(tmp_path / "a")
    assert second.index["fingerprint"] != first.index["fingerprint"]
    assert {s["caption_key"] for s in second.samples}.isdisjoint({s["caption_key"] for s in first.samples})
    assert [s["key"] for s in second.samples] == [s["key"] for s in first.samples]  # the latents as they were
    for sample in first.samples:
        assert torch.equal(first.latent(sample), second.latent(sample))


def test_a_cache_whose_halves_disagree_is_refused(demo_params, tmp_path):
    from helpers import write_filtered_dataset

    filtered, captions = write_filtered_dataset(tmp_path, n_images=4)
    encode.run(copy.deepcopy(demo_params), filtered, captions, tmp_path / "cache")
    table = pd.read_parquet(captions)
    table[table["split"] == "train"].iloc[:1].to_parquet(captions, index=False)  # one caption of three
    encode.run_text(copy.deepcopy(demo_params), captions, tmp_path / "cache/text")
    with pytest.raises(UserError, match="has latents but no caption embedding.*encode_text"):
        CacheReader(tmp_path / "cache")
    __import__("shutil").rmtree(tmp_path / "cache/text")
    with pytest.raises(UserError, match="run the encode_text stage first"):
        CacheReader(tmp_path / "cache")
