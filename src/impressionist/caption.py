"""Stage `caption`: one training caption per filtered image.

A caption comes from ``caption.template`` (fields ``{trigger}``, ``{artist}``, ``{genre}``,
``{style}``, ``{description}``), filled with names made readable so that it reads as English, and
``{description}`` with the describe stage's cleaned content description of that image:
"impr3ssionism, a painting by Claude Monet: haystacks in a field under a pink sky". An image whose
description is empty gets its genre phrase there instead ("a landscape"), counted as a fallback.
A sidecar file ``data/raw/images/<id>.txt`` (the kohya convention: same stem as the image)
overrides the template for that image, verbatim: the way to edit a description by hand.

Captions are counted in T5 tokens (FLUX's second text encoder, ``tokenizer_2`` of the base model)
against ``caption.max_sequence_length``; longer ones would be truncated when encoded, which the
stage reports as a warning and records in the ``truncated`` column. CLIP (``tokenizer``) keeps only
77 tokens: ``clip_tokens`` and ``clip_truncated`` record that too. ``metrics/captions.json`` holds
the captions' statistics (distinct captions, token-length quantiles, the most frequent content
words) and ``plots/caption_lengths.png`` their length distribution.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from .errors import UserError, atomic_dir, atomic_write_text, stage_main
from .layout import (CAPTION_LENGTHS_PLOT, CAPTION_METRICS, CAPTIONS, CAPTIONS_DIR, DESCRIPTIONS,
                     FILTERED_DIR, IMAGES_SUBDIR, RAW_DIR)
from .params import DEFAULT_PARAMS, load_params
from .params.data import CaptionParams, template_fields
from .params.model import ModelParams
from .plotting import new_figure, save_figure
from .tables import read_filtered, read_table
from .tokens import CLIP_MAX_TOKENS, load_clip_tokenizer, load_t5_tokenizer
from .tokens import count_tokens as count_t5_tokens
from .wikiart import UNKNOWN_ARTIST

FILTERED_COLUMNS = ("id", "split", "artist", "genre", "style")  # what captions are made from
# Names whose hyphens are part of the name itself, or whose capitals are not word-initial; the
# slug alone cannot say which hyphen separates words.
ARTIST_DISPLAY_NAMES = {
    "pierre-auguste-renoir": "Pierre-Auguste Renoir",
    "henri-de-toulouse-lautrec": "Henri de Toulouse-Lautrec",
    "sir-lawrence-alma-tadema": "Sir Lawrence Alma-Tadema",
    "kuzma-petrov-vodkin": "Kuzma Petrov-Vodkin",
    "nikolay-bogdanov-belsky": "Nikolay Bogdanov-Belsky",
    "henri-fantin-latour": "Henri Fantin-Latour",
    "james-mcneill-whistler": "James McNeill Whistler",
    "m.c.-escher": "M. C. Escher",
}
# Lower-case name particles ("Vincent van Gogh", "Leonardo da Vinci", "Lucas Cranach the Elder").
NAME_PARTICLES = {"da", "de", "del", "della", "der", "di", "du", "la", "le", "van", "von", "the"}

# Phrases that read well after "a painting of ..." (the default template).
GENRE_PHRASES = {
    "abstract_painting": "an abstract composition",
    "cityscape": "a cityscape",
    "genre_painting": "a scene of everyday life",
    "illustration": "an illustrated scene",
    "landscape": "a landscape",
    "nude_painting": "a nude figure",
    "portrait": "a portrait sitter",
    "religious_painting": "a religious scene",
    "sketch_and_study": "a study sketch",
    "still_life": "a still life",
    "Unknown Genre": "an unknown subject",
}
STYLE_DISPLAY_NAMES = {
    "Post_Impressionism": "Post-Impressionism",
    "Naive_Art_Primitivism": "Naive Art (Primitivism)",
    "Mannerism_Late_Renaissance": "Mannerism (Late Renaissance)",
    "Ukiyo_e": "Ukiyo-e",
    "Action_painting": "Action Painting",
}


def fix_mojibake(text: str) -> str:
    """Undo UTF-8 read as Latin-1, as in WikiArt's "joaqu\u00e3\u00adn-sorolla" -> "joaquín-sorolla".

    That slug was also lower-cased after the mis-decoding, which turned the lead byte "Ã" (0xC3)
    into "ã" (0xE3); it is restored before a continuation byte (0x80-0xBF) so the UTF-8 decodes.
    """
    candidate = re.sub("\u00e3(?=[\u0080-\u00bf])", "\u00c3", text)
    try:
        return candidate.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def readable_artist(name: str) -> str:
    """ "claude-monet" -> "Claude Monet"; "Unknown Artist" -> "an unknown artist"."""
    if name == UNKNOWN_ARTIST:
        return "an unknown artist"
    if name in ARTIST_DISPLAY_NAMES:
        return ARTIST_DISPLAY_NAMES[name]
    words = [w for w in fix_mojibake(name).split("-") if w]
    readable = []
    for index, word in enumerate(words):
        if index > 0 and word in NAME_PARTICLES:
            readable.append(word)
        else:
            # "m.c." -> "M.C.": capitalise after each dot as well as at the start.
            readable.append(".".join(part[:1].upper() + part[1:] for part in word.split(".")))
    return " ".join(readable)


def readable_genre(name: str) -> str:
    """ "landscape" -> "a landscape"; "genre_painting" -> "a scene of everyday life"."""
    if name in GENRE_PHRASES:
        return GENRE_PHRASES[name]
    return name.replace("_", " ")


def readable_style(name: str) -> str:
    """ "Impressionism" -> "Impressionism"; "Post_Impressionism" -> "Post-Impressionism"."""
    return STYLE_DISPLAY_NAMES.get(name, name.replace("_", " "))


def template_caption(template: str, trigger: str, artist: str, genre: str, style: str,
                     description: str = "") -> str:
    """Fill the template with readable names (class names as stored in the metadata); an empty
    ``description`` is replaced by the genre phrase."""
    return template.format(trigger=trigger, artist=readable_artist(artist), genre=readable_genre(genre),
                           style=readable_style(style), description=description or readable_genre(genre))


def read_sidecar(raw_images_dir: Path, image_id: str) -> str | None:
    """The caption in ``<id>.txt`` next to the raw image, whitespace collapsed; None if absent or empty."""
    path = raw_images_dir / f"{image_id}.txt"
    if not path.is_file():
        return None
    text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
    return text or None


def read_descriptions(path: Path, template: str) -> dict[str, str]:
    """id -> cleaned description, when the template uses ``{description}``; {} otherwise, and when
    describe is disabled (its table is empty): ``{description}`` then gets the genre phrase."""
    if "description" not in template_fields(template):
        return {}
    if path.is_file() and pd.read_parquet(path, columns=["id"]).empty:
        print("caption: describe.enabled is false: {description} gets each image's genre phrase (the template "
              "alone, as without the describe stage)")
        return {}
    table = read_table(path, ("id", "description"), "describe")
    return dict(zip(table["id"], table["description"].fillna("")))


def run(params: Mapping[str, Any], filtered_dir: Path | str = FILTERED_DIR, raw_dir: Path | str = RAW_DIR,
        captions_dir: Path | str = CAPTIONS_DIR, *, descriptions_path: Path | str = DESCRIPTIONS,
        metrics_path: Path | str = CAPTION_METRICS, plot_path: Path | str = CAPTION_LENGTHS_PLOT,
        tokenizer=None, clip_tokenizer=None) -> pd.DataFrame:
    """Write ``captions_dir/captions.parquet`` for the images in ``filtered_dir``; returns the table.

    ``tokenizer`` / ``clip_tokenizer`` default to the base model's T5 and CLIP tokenizers.
    """
    cfg, model = CaptionParams.check(params), ModelParams.check(params)
    trigger, template, max_tokens = cfg.trigger, cfg.template, cfg.max_sequence_length
    filtered_dir, raw_dir = Path(filtered_dir), Path(raw_dir)
    table = read_filtered(filtered_dir, FILTERED_COLUMNS)
    descriptions = read_descriptions(Path(descriptions_path), template)
    if descriptions:
        missing = [i for i in table["id"] if i not in descriptions]
        if missing:
            raise UserError(f"image {missing[0]} has no description ({len(missing)} such); re-run the describe "
                            "stage (`dvc repro describe`)")
    if tokenizer is None:
        tokenizer = load_t5_tokenizer(model)
    if clip_tokenizer is None:
        clip_tokenizer = load_clip_tokenizer(model)

    captions, sources, template_only = [], [], []
    for row in table.itertuples():
        described = descriptions.get(row.id, "")
        template_only.append(template_caption(template, trigger, row.artist, row.genre, row.style))
        sidecar = read_sidecar(raw_dir / IMAGES_SUBDIR, row.id)
        if sidecar is not None:
            captions.append(sidecar)
            sources.append("sidecar")
        else:
            captions.append(template_caption(template, trigger, row.artist, row.genre, row.style, described))
            sources.append("template" if not descriptions else "description" if described else "genre_fallback")
    tokens = count_t5_tokens(captions, tokenizer)
    clip_tokens = count_t5_tokens(captions, clip_tokenizer)
    result = pd.DataFrame({
        "id": table["id"], "split": table["split"], "caption": captions, "caption_source": sources,
        "t5_tokens": tokens, "truncated": [n > max_tokens for n in tokens],
        "clip_tokens": clip_tokens, "clip_truncated": [n > CLIP_MAX_TOKENS for n in clip_tokens],
    })

    with atomic_dir(captions_dir) as out:
        result.to_parquet(out / CAPTIONS.name, index=False)
    stats = caption_statistics(result, template_only, trigger, template)
    atomic_write_text(Path(metrics_path), json.dumps(stats, indent=1) + "\n")
    save_figure(plot_lengths(result, max_tokens), plot_path)

    n_sidecar, n_fallback = sources.count("sidecar"), sources.count("genre_fallback")
    print(f"caption: {len(result)} captions ({len(result) - n_sidecar} from the template, {n_sidecar} from sidecar "
          f"files, {n_fallback} with an empty description replaced by the genre); {stats['distinct_captions']} "
          f"distinct ({stats['distinct_template_only']} from the template without descriptions); T5 tokens min "
          f"{min(tokens)}, max {max(tokens)} of max_sequence_length {max_tokens}")
    n_truncated = int(result["truncated"].sum())
    if n_truncated:
        print(f"warning: {n_truncated} caption(s) exceed caption.max_sequence_length={max_tokens} T5 tokens "
              f"(longest {max(tokens)}) and will be truncated when encoded; shorten them or raise the limit",
              file=sys.stderr)
    n_clip = int(result["clip_truncated"].sum())
    if n_clip:
        print(f"caption: {n_clip} caption(s) are longer than CLIP's {CLIP_MAX_TOKENS} tokens: CLIP (the pooled "
              "embedding) sees their start only, T5 the whole caption", file=sys.stderr)
    if trigger:
        missing_trigger = sum(1 for c, s in zip(captions, sources) if s == "sidecar" and trigger not in c)
        if missing_trigger:
            print(f"warning: {missing_trigger} sidecar caption(s) do not contain the trigger {trigger!r}; the LoRA "
                  "learns the trigger only from captions that have it", file=sys.stderr)
    return result


# Words left out of the content-word counts: function words, and the template's own.
STOPWORDS = set("""a an the of and or in on at by to with from for is are was were be been it its this that
these those as into over under near his her their there here which who whom while one two some""".split())
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def caption_statistics(result: pd.DataFrame, template_only: list[str], trigger: str, template: str = "",
                       top: int = 20) -> dict[str, Any]:
    """What metrics/captions.json holds: counts over all ``n`` images, token-length quantiles, the
    share cut by each encoder, and the ``top`` most frequent content words (the trigger and the
    template's own words excluded)."""
    n = len(result)
    fixed = set(re.findall(r"[a-z0-9][a-z0-9'-]+", re.sub(r"\{[^}]*\}", " ", template.lower())))
    fixed |= STOPWORDS | {trigger.lower()}
    words = Counter(w for caption in result["caption"] for w in re.findall(r"[a-z0-9][a-z0-9'-]+", caption.lower())
                    if w not in fixed)
    stats: dict[str, Any] = {
        "images": n,
        "distinct_captions": int(result["caption"].nunique()),
        "distinct_template_only": len(set(template_only)),
        "sources": {k: int(v) for k, v in result["caption_source"].value_counts().sort_index().items()},
    }
    for column, label in (("t5_tokens", "t5"), ("clip_tokens", "clip")):
        stats[f"{label}_tokens"] = {f"p{round(q * 100)}": float(result[column].quantile(q)) for q in QUANTILES}
        stats[f"{label}_tokens"]["mean"] = round(float(result[column].mean()), 2)
        stats[f"{label}_tokens"]["n"] = n
    stats["share_truncated_t5"] = round(float(result["truncated"].mean()), 4)
    stats["share_truncated_clip"] = round(float(result["clip_truncated"].mean()), 4)
    stats["top_words"] = [[w, c] for w, c in sorted(words.items(), key=lambda wc: (-wc[1], wc[0]))[:top]]
    return stats


def plot_lengths(result: pd.DataFrame, max_tokens: int):
    """Histograms of the captions' T5 and CLIP lengths, each encoder's limit marked."""
    fig = new_figure(8, 3)
    for i, (column, limit, name) in enumerate((("t5_tokens", max_tokens, "T5"), ("clip_tokens", CLIP_MAX_TOKENS, "CLIP"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.hist(result[column], bins=min(30, max(5, result[column].nunique())), color="#1f77b4")
        ax.axvline(limit, color="black", linestyle="--", linewidth=1, label=f"limit {limit}")
        ax.set_title(f"{name} tokens per caption (n = {len(result)})", fontsize=9)
        ax.set_xlabel("tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write one training caption per filtered image.")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    run(load_params(args.params))


if __name__ == "__main__":
    main()
