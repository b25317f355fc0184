"""Stage `filter`: planted defects are rejected with the right reason, nothing else is; split is stable."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from impressionist import filter as filter_stage
from impressionist.errors import UserError
from impressionist.synthetic import paint, synthetic_rows

CFG = {"min_side": 96, "max_aspect": 2.5, "drop_grayscale": True, "phash_threshold": 4, "val_fraction": 0.3}
# docs/layout.md's columns of data/raw/metadata.parquet, written out (not read from the code).
RAW_COLUMNS = ["id", "file", "artist", "genre", "style", "width", "height", "sha256", "source", "revision",
               "origin"]


def encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width, height):
    """A PNG that declares width x height pixels and holds none: PIL reads only its header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def painted(width, height, seed):
    return paint(width, height, "claude-monet", "landscape", "Impressionism", np.random.default_rng(seed))


class RawBuilder:
    """Writes images and a metadata.parquet in the layout the download stage produces."""

    def __init__(self, raw_dir):
        self.raw_dir = raw_dir
        (raw_dir / "images").mkdir(parents=True, exist_ok=True)
        self.rows = []

    def add(self, data: bytes, ext: str, artist="claude-monet", write=True) -> str:
        digest = hashlib.sha256(data).hexdigest()
        try:
            width, height = Image.open(io.BytesIO(data)).size
        except Exception:
            width = height = 0
        file = f"images/{digest[:16]}.{ext}"
        if write:
            (self.raw_dir / file).write_bytes(data)
        self.rows.append({"id": digest[:16], "file": file, "artist": artist, "genre": "landscape",
                          "style": "Impressionism", "width": width, "height": height, "sha256": digest,
                          "source": "test", "revision": "",
                          "origin": f"my paintings/{len(self.rows):02d}-{artist}.{ext}"})
        return digest[:16]

    def save(self, rows=None):
        pd.DataFrame(rows if rows is not None else self.rows, columns=RAW_COLUMNS).to_parquet(
            self.raw_dir / "metadata.parquet", index=False)
        return self.raw_dir


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A raw folder with 8 good images plus one of each defect; returns (raw_dir, expected reasons, ids)."""
    raw = RawBuilder(tmp_path_factory.mktemp("planted") / "raw")
    good = [row for row in synthetic_rows(8, seed=11, broken=False)]
    good_ids = [raw.add(row["bytes"], "png" if row["bytes"][:4] == b"\x89PNG" else "jpg", row["artist"])
                for row in good]
    source = Image.open(io.BytesIO(good[0]["bytes"])).convert("RGB")
    ids, expected = {}, {}

    def plant(name, data, ext, reason, write=True):
        ids[name] = raw.add(data, ext, write=write)
        if reason:
            expected[ids[name]] = reason

    full = encode(painted(150, 120, 1), "JPEG", quality=90)
    plant("truncated", full[: len(full) * 6 // 10], "jpg", "undecodable")
    plant("garbage", b"this is not an image at all", "bin", "undecodable")
    # Declares 400 MP: PIL refuses to open it (DecompressionBombError); download keeps it as .bin.
    plant("decompression_bomb", png_header_only(20000, 20000), "bin", "undecodable")
    plant("missing", encode(painted(150, 120, 2), "JPEG"), "jpg", "missing_file", write=False)
    plant("tiny", encode(painted(20, 20, 3), "JPEG"), "jpg", "too_small")
    plant("panorama", encode(painted(300, 100, 4), "JPEG"), "jpg", "extreme_aspect")
    plant("gray_l", encode(painted(140, 120, 5).convert("L"), "JPEG"), "jpg", "grayscale")
    plant("gray_rgb", encode(painted(140, 120, 6).convert("L").convert("RGB"), "JPEG"), "jpg", "grayscale")
    gray16 = Image.fromarray((np.linspace(0, 65535, 130 * 110).reshape(110, 130)).astype(np.uint16))
    plant("gray16", encode(gray16, "PNG"), "png", "grayscale")
    duplicate = source.resize((source.width * 85 // 100, source.height * 85 // 100), Image.Resampling.LANCZOS)
    plant("near_duplicate", encode(duplicate, "JPEG", quality=70), "jpg", "near_duplicate")
    # Odd but valid encodings that must be kept, converted to RGB.
    sepia = np.asarray(painted(140, 120, 7).convert("L"), dtype=np.int16)[..., None] + np.array([25, 0, -25])
    plant("sepia", encode(Image.fromarray(sepia.clip(0, 255).astype(np.uint8)), "JPEG", quality=95), "jpg", None)
    cmyk_source = painted(140, 120, 8)
    plant("cmyk", encode(cmyk_source.convert("CMYK"), "JPEG", quality=95), "jpg", None)
    rgba = painted(140, 120, 9).convert("RGBA")
    alpha = np.full((120, 140), 255, np.uint8)
    alpha[:30] = 0  # fully transparent band: must come out white, not black
    rgba.putalpha(Image.fromarray(alpha))
    plant("rgba", encode(rgba, "PNG"), "png", None)
    raw.save()
    return raw.raw_dir, expected, ids, good_ids, cmyk_source


def run_filter(raw_dir, out, **overrides):
    return filter_stage.run({"filter": {**CFG, **overrides}}, raw_dir, out / "filtered", out / "metrics" / "data.json",
                            out / "plots" / "data_artists.png")


@pytest.fixture(scope="module")
def filtered(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("filtered")
    metrics = run_filter(planted[0], out)
    return out, metrics


def test_planted_defects_are_rejected_with_their_reason_and_nothing_else(planted, filtered):
    raw_dir, expected, ids, good_ids, _ = planted
    out, metrics = filtered
    rejected = pd.read_csv(out / "filtered" / "rejected.csv", dtype=str)
    assert list(rejected.columns) == ["id", "reason", "origin"]
    assert dict(zip(rejected["id"], rejected["reason"])) == expected
    # each rejected image is named as the source has it, next to its reason
    raw_origins = dict(zip(*pd.read_parquet(raw_dir / "metadata.parquet")[["id", "origin"]].values.T))
    assert dict(zip(rejected["id"], rejected["origin"])) == {i: raw_origins[i] for i in expected}
    assert all(origin.startswith("my paintings/") for origin in rejected["origin"])
    kept = pd.read_parquet(out / "filtered" / "metadata.parquet")
    raw = pd.read_parquet(raw_dir / "metadata.parquet")
    assert set(kept["id"]) == set(raw["id"]) - set(expected)
    assert set(good_ids) | {ids["sepia"], ids["cmyk"], ids["rgba"]} == set(kept["id"])
    assert list(kept.columns) == RAW_COLUMNS + ["split"]
    assert metrics["images_in"] == len(raw) and metrics["kept"] == len(kept)
    assert metrics["rejected_by_reason"] == {
        "missing_file": 1, "undecodable": 3, "too_small": 1, "extreme_aspect": 1, "grayscale": 3,
        "near_duplicate": 1}
    assert json.loads((out / "metrics" / "data.json").read_text()) == metrics


def test_kept_images_are_rgb_pngs_with_converted_colours(planted, filtered):
    _, _, ids, _, cmyk_source = planted
    out, _ = filtered
    kept = pd.read_parquet(out / "filtered" / "metadata.parquet")
    assert sorted(p.name for p in (out / "filtered" / "images").iterdir()) == sorted(f"{i}.png" for i in kept["id"])
    for row in kept.itertuples():
        assert row.file == f"images/{row.id}.png"
        with Image.open(out / "filtered" / row.file) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (row.width, row.height))
    cmyk = np.asarray(Image.open(out / "filtered" / "images" / f"{ids['cmyk']}.png"), dtype=float)
    assert np.abs(cmyk - np.asarray(cmyk_source, dtype=float)).mean() < 12  # colours survive CMYK -> RGB
    rgba = np.asarray(Image.open(out / "filtered" / "images" / f"{ids['rgba']}.png"))
    assert (rgba[:30] == 255).all() and not (rgba[30:] == 255).all()


def test_sixteen_bit_gray_is_scaled_not_clipped_when_grayscale_is_kept(planted, tmp_path):
    raw_dir, _, ids, _, _ = planted
    run_filter(raw_dir, tmp_path, drop_grayscale=False)
    rejected = pd.read_csv(tmp_path / "filtered" / "rejected.csv")
    assert "grayscale" not in set(rejected["reason"])
    ramp = np.asarray(Image.open(tmp_path / "filtered" / "images" / f"{ids['gray16']}.png"))
    assert ramp.shape[2] == 3 and ramp[0, 0, 0] == 0 and ramp[-1, -1, 0] == 255
    assert 110 < ramp[55, 65, 0] < 145  # mid-ramp stays mid-gray


def test_near_duplicates_keep_the_largest_whatever_the_row_order(planted, tmp_path):
    raw_dir, _, ids, good_ids, _ = planted
    raw = pd.read_parquet(raw_dir / "metadata.parquet")
    reversed_raw = tmp_path / "raw"
    (reversed_raw).mkdir()
    (reversed_raw / "images").symlink_to(raw_dir / "images")
    raw.iloc[::-1].to_parquet(reversed_raw / "metadata.parquet", index=False)
    run_filter(reversed_raw, tmp_path)
    rejected = pd.read_csv(tmp_path / "filtered" / "rejected.csv", dtype=str)
    assert ids["near_duplicate"] in set(rejected["id"])
    assert good_ids[0] in set(pd.read_parquet(tmp_path / "filtered" / "metadata.parquet")["id"])


def test_split_follows_the_documented_hash_rule():
    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:16] for i in range(20000)]
    for image_id in ids[:50]:
        score = int(hashlib.sha256(("split:" + image_id).encode()).hexdigest()[:8], 16) / 2**32
        assert filter_stage.split_of(image_id, 0.1) == ("val" if score < 0.1 else "train")
    share = sum(filter_stage.split_of(i, 0.1) == "val" for i in ids) / len(ids)
    assert 0.09 < share < 0.11


def test_split_is_stable_when_images_are_added(tmp_path):
    raw = RawBuilder(tmp_path / "raw")
    for row in synthetic_rows(16, seed=21, broken=False):
        raw.add(row["bytes"], "png" if row["bytes"][:4] == b"\x89PNG" else "jpg", row["artist"])
    raw.save(raw.rows[:8])
    run_filter(raw.raw_dir, tmp_path / "small", val_fraction=0.5)
    small = pd.read_parquet(tmp_path / "small" / "filtered" / "metadata.parquet").set_index("id")["split"]
    raw.save()
    run_filter(raw.raw_dir, tmp_path / "large", val_fraction=0.5)
    large = pd.read_parquet(tmp_path / "large" / "filtered" / "metadata.parquet").set_index("id")["split"]
    assert len(small) == 8 and len(large) == 16
    assert large[small.index].to_dict() == small.to_dict()
    assert set(large) == {"train", "val"}


def test_artists_plot_shows_the_kept_images_per_artist_and_split(filtered):
    from helpers import assert_png_shows

    out, _ = filtered
    kept = pd.read_parquet(out / "filtered" / "metadata.parquet")
    fig = filter_stage.plot_artists(kept)
    fig.canvas.draw()  # categorical tick labels are set when drawn
    ax = fig.axes[0]
    train_bars, val_bars = ax.containers
    artists = [label.get_text() for label in ax.get_yticklabels()]
    counts = kept.groupby(["artist", "split"]).size()
    assert sorted(artists) == sorted(set(kept["artist"])) and len(artists) >= 2
    for artist, train, val in zip(artists, train_bars, val_bars, strict=True):
        assert train.get_width() == counts.get((artist, "train"), 0)
        assert val.get_width() == counts.get((artist, "val"), 0) and val.get_x() == train.get_width()
    totals = [t.get_width() + v.get_width() for t, v in zip(train_bars, val_bars)]
    assert totals == sorted(totals) and sum(totals) == len(kept)  # largest at the top
    assert f"({len(kept)} total" in ax.get_title()
    # the stage's PNG is this figure, rendered
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert (out / "plots" / "data_artists.png").read_bytes() == buffer.getvalue()
    assert_png_shows(out / "plots" / "data_artists.png", fig)


def test_nothing_left_after_filtering_is_an_error_without_outputs(planted, tmp_path):
    with pytest.raises(UserError, match="no image of .* survived filtering") as error:
        run_filter(planted[0], tmp_path, min_side=5000)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "filtered").exists() and not (tmp_path / "metrics").exists()
    assert not (tmp_path / "plots").exists()
    assert not list(tmp_path.glob(".filtered*")), "no temporary folder left behind"


def test_empty_val_split_is_an_error_suggesting_a_larger_fraction(planted, tmp_path):
    with pytest.raises(UserError, match="val split is empty.*raise filter.val_fraction"):
        run_filter(planted[0], tmp_path, val_fraction=1e-9)
    assert not (tmp_path / "filtered").exists()


@pytest.mark.parametrize("key, value", [("val_fraction", 0), ("min_side", -1), ("max_aspect", 0.5),
                                        ("drop_grayscale", "yes"), ("phash_threshold", 2.5)])
def test_bad_params_fail_before_reading_images(tmp_path, key, value):
    with pytest.raises(UserError, match=f"filter.{key}"):
        run_filter(tmp_path / "no-raw-needed", tmp_path, **{key: value})


def test_missing_raw_metadata_says_to_run_download(tmp_path):
    with pytest.raises(UserError, match="run the download stage"):
        run_filter(tmp_path / "raw", tmp_path)


def test_artists_plot_says_when_the_images_are_synthetic():
    from impressionist.filter import plot_artists

    table = pd.DataFrame({"artist": ["claude-monet", "edgar-degas"], "split": ["train", "val"],
                          "source": ["synthetic", "synthetic"]})
    assert "SYNTHETIC" in plot_artists(table).axes[0].get_title()
    table["source"] = "huggan/wikiart"
    assert "SYNTHETIC" not in plot_artists(table).axes[0].get_title()


def test_summary_line_says_where_the_rejected_files_are_named(planted, tmp_path, capsys):
    run_filter(planted[0], tmp_path)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("filter: kept ") and "rejected 1 missing_file" in line
    assert line.endswith(f"(each with its origin in the source: {tmp_path / 'filtered' / 'rejected.csv'})")
