"""Stage `caption`: exact captions, sidecar override, T5 token counts, errors."""

from __future__ import annotations

import pandas as pd
import pytest
from transformers import T5TokenizerFast

from impressionist import caption, tokens
from impressionist.errors import UserError
from impressionist.params.model import ModelParams
from impressionist.wikiart import ARTISTS, GENRES, STYLES

TEMPLATE = "{trigger}, an impressionist painting of {genre} by {artist}"
CFG = {"trigger": "impr3ssionism", "template": TEMPLATE, "max_sequence_length": 512}

# (id, split, artist, genre, style) -> the caption the default template must give.
ROWS = [
    (("a1", "train", "claude-monet", "landscape", "Impressionism"),
     "impr3ssionism, an impressionist painting of a landscape by Claude Monet"),
    (("b2", "val", "pierre-auguste-renoir", "genre_painting", "Impressionism"),
     "impr3ssionism, an impressionist painting of a scene of everyday life by Pierre-Auguste Renoir"),
    (("c3", "train", "Unknown Artist", "Unknown Genre", "Impressionism"),
     "impr3ssionism, an impressionist painting of an unknown subject by an unknown artist"),
    (("d4", "train", "joaqu\u00e3\u00adn-sorolla", "portrait", "Impressionism"),
     "impr3ssionism, an impressionist painting of a portrait sitter by Joaquín Sorolla"),
    (("e5", "train", "edgar-degas", "sketch_and_study", "Impressionism"),
     "impr3ssionism, an impressionist painting of a study sketch by Edgar Degas"),
]
SIDECAR_ID = "e5"
SIDECAR_TEXT = "  impr3ssionism, dancers rehearsing\nin a bright studio by Edgar Degas \n"
SIDECAR_CAPTION = "impr3ssionism, dancers rehearsing in a bright studio by Edgar Degas"


def word_count_tokens(text: str) -> int:
    """What the test tokenizer below must count: one token per word, per comma, plus </s>."""
    return len(text.replace(",", " ,").split()) + 1


def word_tokenizer(texts) -> T5TokenizerFast:
    """A T5 (unigram) tokenizer, built without files, whose pieces are the whole words of ``texts``."""
    words = sorted({w for t in texts for w in t.replace(",", " ").split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0), (",", -1.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    vocab += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


TOKENIZER = word_tokenizer([c for _, c in ROWS] + [SIDECAR_CAPTION])


def params(**caption_changes) -> dict:
    """The params caption.run reads; the model is never loaded (the tests pass their tokenizer)."""
    return {"caption": {**CFG, **caption_changes}, "model": {"pretrained": "builtin:tiny-flux"}}


@pytest.fixture
def dirs(tmp_path):
    filtered, raw = tmp_path / "filtered", tmp_path / "raw"
    filtered.mkdir()
    (raw / "images").mkdir(parents=True)
    table = pd.DataFrame([r for r, _ in ROWS], columns=["id", "split", "artist", "genre", "style"])
    table["file"] = [f"images/{i}.png" for i in table["id"]]
    table.to_parquet(filtered / "metadata.parquet", index=False)
    return filtered, raw, tmp_path / "captions"


@pytest.mark.parametrize("slug, name", [
    ("claude-monet", "Claude Monet"),
    ("pierre-auguste-renoir", "Pierre-Auguste Renoir"),
    ("Unknown Artist", "an unknown artist"),
    ("vincent-van-gogh", "Vincent van Gogh"),
    ("leonardo-da-vinci", "Leonardo da Vinci"),
    ("lucas-cranach-the-elder", "Lucas Cranach the Elder"),
    ("henri-de-toulouse-lautrec", "Henri de Toulouse-Lautrec"),
    ("el-greco", "El Greco"),
    ("m.c.-escher", "M. C. Escher"),
    ("joaqu\u00e3\u00adn-sorolla", "Joaquín Sorolla"),
])
def test_readable_artist(slug, name):
    assert caption.readable_artist(slug) == name


def test_every_class_name_becomes_readable():
    for artist in ARTISTS:
        name = caption.readable_artist(artist)
        assert name and "\u00ad" not in name and "_" not in name
        assert name == "an unknown artist" or name[0].isupper()
    for genre in GENRES:
        phrase = caption.readable_genre(genre)
        assert "_" not in phrase and phrase.split()[0] in ("a", "an")
    assert caption.readable_genre("genre_painting") == "a scene of everyday life"
    assert caption.readable_genre("Unknown Genre") == "an unknown subject"
    assert all("_" not in caption.readable_style(s) for s in STYLES)
    assert caption.readable_style("Post_Impressionism") == "Post-Impressionism"


def test_captions_from_template_and_sidecar(dirs, capsys):
    filtered, raw, out = dirs
    (raw / "images" / f"{SIDECAR_ID}.txt").write_text(SIDECAR_TEXT)
    (raw / "images" / "a1.txt").write_text("   \n")  # empty sidecar: the template still applies
    result = caption.run(params(), filtered, raw, out, tokenizer=TOKENIZER)
    written = pd.read_parquet(out / "captions.parquet")
    pd.testing.assert_frame_equal(written, result)
    assert list(written.columns) == ["id", "split", "caption", "caption_source", "t5_tokens", "truncated",
                                     "clip_tokens", "clip_truncated"]
    expected = {row[0]: text for row, text in ROWS}
    expected[SIDECAR_ID] = SIDECAR_CAPTION
    assert dict(zip(written["id"], written["caption"])) == expected
    assert dict(zip(written["id"], written["caption_source"])) == {
        "a1": "template", "b2": "template", "c3": "template", "d4": "template", "e5": "sidecar"}
    assert dict(zip(written["id"], written["split"])) == {row[0]: row[1] for row, _ in ROWS}
    assert list(written["t5_tokens"]) == [word_count_tokens(expected[i]) for i in written["id"]]
    assert not written["truncated"].any()
    assert "warning" not in capsys.readouterr().err


def test_other_template_fields(dirs):
    filtered, raw, out = dirs
    tokenizer = word_tokenizer(["impr3ssionism: Impressionism a landscape"])
    result = caption.run(params(template="{trigger}: {style}, {genre}"), filtered, raw, out, tokenizer=tokenizer)
    assert result.loc[result["id"] == "a1", "caption"].item() == "impr3ssionism: Impressionism, a landscape"


def test_long_captions_are_flagged_and_warned_about(dirs, capsys):
    filtered, raw, out = dirs
    counts = {row[0]: word_count_tokens(text) for row, text in ROWS}
    limit = sorted(counts.values())[1]
    result = caption.run(params(max_sequence_length=limit), filtered, raw, out, tokenizer=TOKENIZER)
    assert dict(zip(result["id"], result["truncated"])) == {i: n > limit for i, n in counts.items()}
    err = capsys.readouterr().err
    n_long = sum(n > limit for n in counts.values())
    assert f"warning: {n_long} caption(s) exceed caption.max_sequence_length={limit}" in err


def test_count_t5_tokens_counts_the_end_of_sequence_token():
    assert caption.count_t5_tokens(["a landscape", "by Claude Monet"], TOKENIZER) == [3, 4]
    assert caption.count_t5_tokens([], TOKENIZER) == []


def test_tokenizer_comes_from_the_models_tokenizer_2(tmp_path, monkeypatch):
    model = tmp_path / "model"
    TOKENIZER.save_pretrained(model / "tokenizer_2")
    loaded = caption.load_t5_tokenizer(ModelParams(pretrained=str(model)))
    text = ROWS[0][1]
    assert caption.count_t5_tokens([text], loaded) == [word_count_tokens(text)]

    # builtin: models go through impressionist.models.resolve_pretrained (stubbed: no diffusers here).
    asked = []
    monkeypatch.setattr(tokens, "resolve_pretrained",
                        lambda name, revision=None: asked.append(name) or str(model))
    loaded = caption.load_t5_tokenizer(ModelParams(pretrained="builtin:tiny-flux"))
    assert asked == ["builtin:tiny-flux"]
    assert caption.count_t5_tokens([text], loaded) == [word_count_tokens(text)]


def test_unloadable_tokenizer_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as error:
        caption.load_t5_tokenizer(ModelParams(pretrained=str(tmp_path / "no-such-model")))
    message = str(error.value)
    assert "\n" not in message and "tokenizer_2" in message and "model.pretrained" in message


def test_unknown_template_field_fails_before_writing(dirs):
    filtered, raw, out = dirs
    with pytest.raises(UserError, match=r"unknown field\(s\) \{painter\}.*\{trigger\}, \{artist\}"):
        caption.run(params(template="{trigger} by {painter}"), filtered, raw, out, tokenizer=TOKENIZER)
    assert not out.exists()


@pytest.mark.parametrize("content, expected", [
    (None, "run the filter stage first"),
    (b"definitely not parquet", "not a readable parquet table"),
])
def test_missing_or_unreadable_metadata(dirs, content, expected):
    filtered, raw, out = dirs
    if content is None:
        (filtered / "metadata.parquet").unlink()
    else:
        (filtered / "metadata.parquet").write_bytes(content)
    with pytest.raises(UserError, match=expected):
        caption.run(params(), filtered, raw, out, tokenizer=TOKENIZER)
    assert not out.exists()
