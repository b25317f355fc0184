"""The SYNTHETIC WikiArt stand-in: schema, determinism, and the planted defects."""

from __future__ import annotations

import hashlib
import io
import itertools

import datasets
import imagehash
import pyarrow.parquet as pq
import pytest
from PIL import Image

from impressionist.synthetic import BROKEN_KINDS, synthetic_rows, wikiart_features, write_synthetic_wikiart
from impressionist.wikiart import ARTISTS, GENRES, STYLES

N_GOOD = 20


@pytest.fixture(scope="module")
def rows():
    return synthetic_rows(N_GOOD, seed=3)


def test_class_lists_match_the_hub_dataset():
    assert len(ARTISTS) == 129 and len(set(ARTISTS)) == 129
    assert len(GENRES) == 11 and len(STYLES) == 27
    # Spot checks against the huggan/wikiart dataset card (index: name).
    assert ARTISTS[0] == "Unknown Artist"
    assert ARTISTS[4] == "claude-monet" and ARTISTS[17] == "pierre-auguste-renoir"
    assert ARTISTS[42] == "alfred-sisley" and ARTISTS[51] == "berthe-morisot"
    assert ARTISTS[49] == "joaqu\u00e3\u00adn-sorolla"  # mojibake with an invisible soft hyphen, as on the Hub
    assert ARTISTS[128] == "canaletto"
    assert STYLES[12] == "Impressionism" and GENRES[10] == "Unknown Genre"


def test_parquet_carries_the_hub_features_and_all_rows(tmp_path, rows):
    path = write_synthetic_wikiart(tmp_path / "s.parquet", N_GOOD, seed=3)
    features = datasets.Features.from_arrow_schema(pq.read_schema(path))
    assert features == wikiart_features()
    assert features["artist"].names == ARTISTS
    table = pq.read_table(path).to_pylist()
    assert len(table) == N_GOOD + len(BROKEN_KINDS)
    # Same bytes and labels as the in-memory rows: nothing is re-encoded on the way to parquet.
    for written, row in zip(table, rows):
        assert written["image"]["bytes"] == row["bytes"]
        assert ARTISTS[written["artist"]] == row["artist"]
        assert STYLES[written["style"]] == row["style"]


def test_deterministic_in_the_seed(tmp_path):
    a = write_synthetic_wikiart(tmp_path / "a.parquet", 6, seed=1, broken=False)
    b = write_synthetic_wikiart(tmp_path / "b.parquet", 6, seed=1, broken=False)
    c = write_synthetic_wikiart(tmp_path / "c.parquet", 6, seed=2, broken=False)
    images = {p: [r["bytes"] for r in pq.read_table(p).column("image").to_pylist()] for p in (a, b, c)}
    assert images[a] == images[b]
    assert not set(images[a]) & set(images[c])
    assert len(pq.read_table(a)) == 6  # broken=False adds nothing


def test_good_rows_look_like_a_varied_impressionism_dataset(rows):
    good = [r for r in rows if r["kind"] == "good"]
    assert len(good) == N_GOOD
    styles = [r["style"] for r in good]
    assert styles.count("Impressionism") >= N_GOOD // 2
    assert set(styles) - {"Impressionism"}, "some other styles, so that download.style matters"
    sizes = set()
    for row in good:
        with Image.open(io.BytesIO(row["bytes"])) as image:
            image.load()
            short, long = sorted(image.size)
            assert 96 <= short and long <= 320 and long / short <= 2.0
            sizes.add(image.size)
    assert len(sizes) > N_GOOD // 2
    # Distinct paintings: no accidental near-duplicates for the filter to remove.
    hashes = [imagehash.phash(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in good]
    assert min(a - b for a, b in itertools.combinations(hashes, 2)) > 8
    assert len({hashlib.sha256(r["bytes"]).hexdigest() for r in good}) == N_GOOD


def test_planted_defects(rows):
    by_kind = {r["kind"]: r for r in rows if r["kind"] != "good"}
    assert set(by_kind) == set(BROKEN_KINDS)
    assert all(r["style"] == "Impressionism" for r in by_kind.values())

    with pytest.raises(OSError):
        with Image.open(io.BytesIO(by_kind["truncated"]["bytes"])) as image:
            image.load()
    assert Image.open(io.BytesIO(by_kind["tiny"]["bytes"])).size == (20, 16)
    assert Image.open(io.BytesIO(by_kind["grayscale"]["bytes"])).mode == "L"
    assert Image.open(io.BytesIO(by_kind["cmyk"]["bytes"])).mode == "CMYK"
    assert Image.open(io.BytesIO(by_kind["rgba_png"]["bytes"])).mode == "RGBA"
    width, height = Image.open(io.BytesIO(by_kind["panorama"]["bytes"])).size
    assert width / height > 2.5

    first = rows[0]
    assert first["kind"] == "good" and first["style"] == "Impressionism"
    duplicate = Image.open(io.BytesIO(by_kind["near_duplicate"]["bytes"]))
    original = Image.open(io.BytesIO(first["bytes"]))
    assert duplicate.width < original.width and duplicate.height < original.height
    assert by_kind["near_duplicate"]["bytes"] != first["bytes"]
    assert imagehash.phash(duplicate.convert("RGB")) - imagehash.phash(original.convert("RGB")) <= 4
    # The defects sit early, so a small max_images download still contains them all.
    assert max(i for i, r in enumerate(rows) if r["kind"] != "good") < 24
