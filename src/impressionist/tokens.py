"""Token counts as FLUX's two text encoders see a caption: T5 (``tokenizer_2``, up to
``caption.max_sequence_length``) and CLIP (``tokenizer``, 77 tokens). One definition for the caption
and describe stages."""

from __future__ import annotations

from typing import Iterable

from .errors import DEMO_HINT, UserError, first_line
from .models import resolve_pretrained
from .params.model import ModelParams

CLIP_MAX_TOKENS = 77  # CLIP's context, <|startoftext|> and <|endoftext|> included: FLUX cuts the rest


def count_tokens(captions: Iterable[str], tokenizer) -> list[int]:
    """Token count of each caption as the encoder sees it (special tokens, e.g. T5's </s>, included)."""
    captions = list(captions)
    if not captions:
        return []
    encoded = tokenizer(captions, add_special_tokens=True, truncation=False)["input_ids"]
    return [len(ids) for ids in encoded]


def _load_tokenizer(model: ModelParams, subfolder: str, what: str):
    from transformers import AutoTokenizer

    pretrained, revision = model.pretrained, model.revision or None
    if pretrained.startswith("builtin:"):
        location, revision = resolve_pretrained(pretrained), None
    else:
        location = pretrained
    try:
        return AutoTokenizer.from_pretrained(str(location), subfolder=subfolder, revision=revision)
    except Exception as err:
        raise UserError(f"cannot load the {what} tokenizer ({subfolder}) of model.pretrained={pretrained} "
                        f"({first_line(err, 160)}); "
                        f"check the network and your Hugging Face token (the FLUX.1-dev licence must be accepted), "
                        f"or point model.pretrained at a local copy; {DEMO_HINT}") from err


def load_t5_tokenizer(model: ModelParams):
    """The T5 tokenizer of the base model (``tokenizer_2``); "builtin:" models resolve locally."""
    return _load_tokenizer(model, "tokenizer_2", "T5")


def load_clip_tokenizer(model: ModelParams):
    """The CLIP tokenizer of the base model (``tokenizer``)."""
    return _load_tokenizer(model, "tokenizer", "CLIP")
