"""The vision-language model the ``describe`` stage captions with: where it comes from, checks made
before its weights load, and batched greedy generation.

``describe.model`` is a Hub id (resolved to its commit at ``describe.revision`` and loaded from that
snapshot, like the base model), a local transformers folder (named by the hash of its content), or
``builtin:tiny-vlm`` (the random-weight stand-in of :mod:`impressionist.tiny_vlm`, built locally).
Every kind loads through ``AutoProcessor`` + ``AutoModelForImageTextToText.from_pretrained``, so any
captioner transformers maps to an image-text-to-text class works (Florence-2, Qwen2.5-VL, Qwen3-VL,
Llava, SmolVLM, BLIP-2, PaliGemma, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DEMO_HINT, UserError, first_line
from .hub import BUILTIN_PREFIX, hub_offline
from .models import built_once, cache_root, folder_digest, hub_commit

BUILTIN_TINY_VLM = "builtin:tiny-vlm"
# What a Hub captioner needs: the model, its processor, tokenizer and chat template (no other weights).
VLM_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.py", "*.tiktoken"]


@dataclass(frozen=True)
class Captioner:
    """A resolved captioner: the local ``folder`` to load, the ``commit`` naming its content, and
    whether its weights are random (its text then says nothing about the images)."""

    name: str
    folder: str
    commit: str
    synthetic: bool


def resolve_captioner(name: str, revision: str | None) -> Captioner:
    """The folder and commit of ``describe.model`` (no weights loaded); one UserError line if it
    cannot be had offline or is not a transformers folder."""
    if name == BUILTIN_TINY_VLM:
        folder = _tiny_vlm_folder()
        return Captioner(name, str(folder), f"{BUILTIN_PREFIX}{folder.name}", True)
    if name.startswith(BUILTIN_PREFIX):
        raise UserError(f"describe.model={name!r}: the only builtin captioner is {BUILTIN_TINY_VLM}")
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"describe.model={name}: folder has no config.json (expected a transformers model "
                            "folder, as `save_pretrained` writes it)")
        return Captioner(name, str(local), folder_digest(local), False)
    try:
        commit = hub_commit(name, revision)
    except UserError as err:
        raise UserError(f"describe.model: {err}") from err
    return Captioner(name, _hub_snapshot(name, commit), commit, False)


def _hub_snapshot(repo_id: str, commit: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=commit, allow_patterns=VLM_PATTERNS, local_files_only=True)
    except Exception:
        pass
    hint = f"check the network (or copy the model into the Hugging Face cache), or set describe.enabled: false; {DEMO_HINT}"
    if hub_offline():
        raise UserError(f"describe.model {repo_id} at {commit} is not in the local Hugging Face cache and "
                        f"HF_HUB_OFFLINE is set; {hint}")
    try:
        return snapshot_download(repo_id, revision=commit, allow_patterns=VLM_PATTERNS)
    except Exception as err:  # gated, missing, connection refused, timeouts: all mean "cannot download"
        raise UserError(f"cannot download describe.model {repo_id} from the Hugging Face Hub "
                        f"({type(err).__name__}: {first_line(err, 120)}); {hint}") from err


def _tiny_vlm_folder() -> Path:
    from .tiny_vlm import BUILDER_VERSION, save_tiny_vlm

    return built_once(cache_root() / f"tiny-vlm-v{BUILDER_VERSION}", "config.json", save_tiny_vlm)


def check_takes_images(captioner: Captioner) -> str:
    """The model type, if transformers maps it to an image-text-to-text class; one line if not (read
    from config.json alone, before any weights load)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(captioner.folder, trust_remote_code=False)
    except Exception as err:
        raise UserError(f"describe.model={captioner.name}: cannot read its config ({first_line(err, 160)})") from err
    kind = config.model_type
    if kind not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise UserError(f"describe.model={captioner.name} is a {kind!r} model, which takes no image input "
                        "(transformers maps no AutoModelForImageTextToText class to it); name a vision-language "
                        "model such as Qwen/Qwen2.5-VL-7B-Instruct or microsoft/Florence-2-large")
    return kind


class Generator:
    """The processor and model of a captioner on ``device``: ``describe(images)`` is one batch of
    greedy (deterministic) descriptions."""

    def __init__(self, captioner: Captioner, prompt: str, max_new_tokens: int, dtype: torch.dtype,
                 device: torch.device):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(captioner.folder)
            self.model = AutoModelForImageTextToText.from_pretrained(captioner.folder, dtype=dtype).to(device).eval()
        except Exception as err:
            raise UserError(f"describe.model={captioner.name}: cannot load it with AutoProcessor / "
                            f"AutoModelForImageTextToText ({type(err).__name__}: {first_line(err, 160)})") from err
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # decoder-only models continue the prompt: pad before it
        self.text = self._prompt_text(prompt)
        self.max_new_tokens, self.device, self.dtype = max_new_tokens, device, dtype

    def _prompt_text(self, prompt: str) -> str:
        """The chat template's user turn (an image, then the prompt) where the processor has one;
        the prompt as it is otherwise (Florence-2's task tokens, e.g. ``<MORE_DETAILED_CAPTION>``)."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return prompt

    @torch.no_grad()
    def describe(self, images: list[Any]) -> list[str]:
        inputs = self.processor(images=images, text=[self.text] * len(images), return_tensors="pt", padding=True)
        inputs = {k: (v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        prompt_ids = inputs["input_ids"]
        if output.shape[1] >= prompt_ids.shape[1] and torch.equal(output[:, :prompt_ids.shape[1]], prompt_ids):
            output = output[:, prompt_ids.shape[1]:]  # decoder-only: the prompt comes back first
        texts = self.processor.batch_decode(output, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]
