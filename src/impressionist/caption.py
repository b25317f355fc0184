"""Stage `caption`: one training caption per filtered image.

A caption comes from ``caption.template`` (fields ``{trigger}``, ``{artist}``, ``{genre}``,
``{style}``), filled with names made readable so that the default template reads as English:
"impr3ssionism, an impressionist painting of a landscape by Claude Monet". A sidecar file
``data/raw/images/<id>.txt`` (the kohya convention: same stem as the image) overrides the
template for that image, verbatim.

Captions are counted in T5 tokens (FLUX's second text encoder, ``tokenizer_2`` of the base model)
against ``caption.max_sequence_length``; longer ones would be truncated when encoded, which the
stage reports as a warning and records in the ``truncated`` column.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from .errors import DEMO_HINT, UserError, atomic_dir, first_line, stage_main
from .layout import CAPTIONS, CAPTIONS_DIR, FILTERED_DIR, RAW_DIR
from .models import ModelParams, resolve_pretrained
from .params import load_params
from .prompts import CaptionParams
from .tables import METADATA_FILE, read_table
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


def template_caption(template: str, trigger: str, artist: str, genre: str, style: str) -> str:
    """Fill the template with readable names (class names as stored in the metadata)."""
    return template.format(trigger=trigger, artist=readable_artist(artist), genre=readable_genre(genre),
                           style=readable_style(style))


def read_sidecar(raw_images_dir: Path, image_id: str) -> str | None:
    """The caption in ``<id>.txt`` next to the raw image, whitespace collapsed; None if absent or empty."""
    path = raw_images_dir / f"{image_id}.txt"
    if not path.is_file():
        return None
    text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
    return text or None


def count_t5_tokens(captions: Iterable[str], tokenizer) -> list[int]:
    """Token count of each caption as FLUX's T5 encoder sees it (special tokens, i.e. </s>, included)."""
    captions = list(captions)
    if not captions:
        return []
    encoded = tokenizer(captions, add_special_tokens=True, truncation=False)["input_ids"]
    return [len(ids) for ids in encoded]


def load_t5_tokenizer(model: ModelParams):
    """The T5 tokenizer of the base model (``tokenizer_2``); "builtin:" models resolve locally."""
    from transformers import AutoTokenizer

    pretrained, revision = model.pretrained, model.revision or None
    if pretrained.startswith("builtin:"):
        location, revision = resolve_pretrained(pretrained), None
    else:
        location = pretrained
    try:
        return AutoTokenizer.from_pretrained(str(location), subfolder="tokenizer_2", revision=revision)
    except Exception as err:
        raise UserError(f"cannot load the T5 tokenizer (tokenizer_2) of model.pretrained={pretrained} "
                        f"({first_line(err, 160)}); "
                        f"check the network and your Hugging Face token (the FLUX.1-dev licence must be accepted), "
                        f"or point model.pretrained at a local copy; {DEMO_HINT}") from err


def read_filtered_metadata(filtered_dir: Path) -> pd.DataFrame:
    return read_table(filtered_dir / METADATA_FILE, FILTERED_COLUMNS, "filter")


def run(params: Mapping[str, Any], filtered_dir: Path | str = FILTERED_DIR, raw_dir: Path | str = RAW_DIR,
        captions_dir: Path | str = CAPTIONS_DIR, *, tokenizer=None) -> pd.DataFrame:
    """Write ``captions_dir/captions.parquet`` for the images in ``filtered_dir``; returns the table.

    ``tokenizer`` defaults to the base model's T5 tokenizer (see `load_t5_tokenizer`).
    """
    cfg, model = CaptionParams.check(params), ModelParams.check(params)
    trigger, template, max_tokens = cfg.trigger, cfg.template, cfg.max_sequence_length
    filtered_dir, raw_dir = Path(filtered_dir), Path(raw_dir)
    table = read_filtered_metadata(filtered_dir)
    if tokenizer is None:
        tokenizer = load_t5_tokenizer(model)

    captions, sources = [], []
    for row in table.itertuples():
        sidecar = read_sidecar(raw_dir / "images", row.id)
        if sidecar is not None:
            captions.append(sidecar)
            sources.append("sidecar")
        else:
            captions.append(template_caption(template, trigger, row.artist, row.genre, row.style))
            sources.append("template")
    tokens = count_t5_tokens(captions, tokenizer)
    result = pd.DataFrame({
        "id": table["id"], "split": table["split"], "caption": captions, "caption_source": sources,
        "t5_tokens": tokens, "truncated": [n > max_tokens for n in tokens],
    })

    with atomic_dir(captions_dir) as out:
        result.to_parquet(out / CAPTIONS.name, index=False)

    n_sidecar = sources.count("sidecar")
    print(f"caption: {len(result)} captions ({len(result) - n_sidecar} from the template, {n_sidecar} from sidecar "
          f"files); T5 tokens min {min(tokens)}, max {max(tokens)} of max_sequence_length {max_tokens}")
    n_truncated = int(result["truncated"].sum())
    if n_truncated:
        print(f"warning: {n_truncated} caption(s) exceed caption.max_sequence_length={max_tokens} T5 tokens "
              f"(longest {max(tokens)}) and will be truncated when encoded; shorten them or raise the limit",
              file=sys.stderr)
    if trigger:
        missing_trigger = sum(1 for c, s in zip(captions, sources) if s == "sidecar" and trigger not in c)
        if missing_trigger:
            print(f"warning: {missing_trigger} sidecar caption(s) do not contain the trigger {trigger!r}; the LoRA "
                  "learns the trigger only from captions that have it", file=sys.stderr)
    return result


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write one training caption per filtered image.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    run(load_params(args.params))


if __name__ == "__main__":
    main()
