"""The ``caption`` params (the trigger word, the caption template) and how the trigger joins a
prompt: one definition for captioning, encoding, sampling, the app and the model card."""

from __future__ import annotations


def with_trigger(trigger: str, prompt: str) -> str:
    """``"<trigger>, <prompt>"``, the trigger first as the caption template places it; the prompt alone
    when there is no trigger."""
    return f"{trigger}, {prompt}" if trigger else prompt
