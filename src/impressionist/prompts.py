"""The ``caption`` params (the trigger word, the caption template) and how the trigger joins a
prompt: one definition for captioning, encoding, sampling, the app and the model card."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import UserError, first_line
from .params import ParamsSection, require_int

TEMPLATE_FIELDS = ("trigger", "artist", "genre", "style", "description")


def template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise UserError(f"params.yaml: caption.template {template!r} is not a valid format string "
                        f"({first_line(err)})") from err


def validate_template(template: Any) -> str:
    if not isinstance(template, str) or not template.strip():
        raise UserError("params.yaml: caption.template must be a non-empty string such as "
                        "\"{trigger}, a painting by {artist}: {description}\"")
    unknown = [name for name in template_fields(template) if name not in TEMPLATE_FIELDS]
    if unknown:
        raise UserError(f"params.yaml: caption.template uses unknown field(s) {', '.join('{' + u + '}' for u in unknown)}; "
                        f"available: {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
    return template


@dataclass(frozen=True)
class CaptionParams(ParamsSection):
    """params.yaml ``caption``: how training captions are written, and the trigger every prompt
    starts with."""

    SECTION: ClassVar[str] = "caption"
    trigger: str
    template: str
    max_sequence_length: int

    def __post_init__(self) -> None:
        if not isinstance(self.trigger, str):
            raise UserError(f"params.yaml: caption.trigger={self.trigger!r} must be a string")
        validate_template(self.template)
        require_int(self.max_sequence_length, "caption.max_sequence_length", minimum=1)


def with_trigger(trigger: str, prompt: str) -> str:
    """``"<trigger>, <prompt>"``, the trigger first as the caption template places it; the prompt alone
    when there is no trigger."""
    return f"{trigger}, {prompt}" if trigger else prompt
