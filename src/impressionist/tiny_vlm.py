"""A tiny random-weight vision-language model (Llava architecture), built locally for offline runs.

The ``describe`` stage's stand-in for a real captioner, as ``tiny_flux`` is the base model's: a CLIP
vision tower, a projector and a one-layer Llama decoder, each a few kilobytes, with a word-level
tokenizer and a chat template, saved as an ordinary transformers folder so the demo and the tests
load it through the same ``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained`` code as
a real model. Its weights are random: its "descriptions" are gibberish strings of words from
:data:`WORDS`, which the describe stage labels as such (``synthetic_model`` in its table). A few
style words are in the vocabulary on purpose, so the scrub has something to remove.
"""

from __future__ import annotations

from pathlib import Path

import torch

BUILDER_VERSION = 2
SEED = 0
IMAGE_SIZE = 32
PATCH = 8
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
# Content words, and style words a real captioner also emits (the scrub list removes those).
WORDS = ("a", "the", "of", "with", "and", "in", "on", "boat", "harbour", "river", "tree", "trees", "field",
         "woman", "man", "child", "parasol", "haystack", "bridge", "garden", "flowers", "sky", "clouds",
         "sea", "house", "church", "road", "snow", "sunset", "water", "lilies", "hill", "dog", "horse",
         "table", "fruit", "vase", "dress", "hat", "red", "blue", "green", "yellow", "white", "dark",
         "impressionist", "brushstrokes", "painting", "oil", "canvas", "monet")
# Image first, then the prompt, as real chat templates place it.
CHAT_TEMPLATE = ("{% for message in messages %}{% for part in message['content'] %}"
                 "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}"
                 "{% endfor %}{% endfor %}")


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>",
                                        extra_special_tokens={"image_token": "<image>"})
    return tokenizer


def build_tiny_vlm():
    """The processor and the model, deterministically from :data:`SEED` (the caller's RNG untouched)."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = _tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlavaForConditionalGeneration(config).eval()
        # Random weights would end most answers at once on </s> or stutter one word, the same for
        # every image; spread the output layer so the gibberish runs on for a few words, and the
        # projector so that it depends on the image (still random, still gibberish).
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 2.0)
            for weight in (p for p in model.model.multi_modal_projector.parameters() if p.dim() == 2):
                weight.normal_(0.0, 4.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return processor, model


def save_tiny_vlm(folder: Path) -> None:
    processor, model = build_tiny_vlm()
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
