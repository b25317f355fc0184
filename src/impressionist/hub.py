"""Small Hugging Face Hub helpers shared by the stages, the Colab notebook, publish and the model card."""

from __future__ import annotations

import os
from pathlib import Path

BUILTIN_PREFIX = "builtin:"  # locally built models (the demo's tiny networks), never on the Hub
OFFLINE_VALUES = ("1", "true", "yes", "on")  # what huggingface_hub reads as a set HF_HUB_OFFLINE


def is_hub_id(name: str) -> bool:
    """A Hub repo id ("namespace/name"), not a builtin model or an existing local path."""
    return (bool(name) and not name.startswith(BUILTIN_PREFIX) and not Path(name).expanduser().exists()
            and name.count("/") == 1)


def hub_offline() -> bool:
    """Whether Hub calls are switched off: HF_HUB_OFFLINE now, or as huggingface_hub read it at import."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in OFFLINE_VALUES:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))
