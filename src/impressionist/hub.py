"""Small Hugging Face Hub helpers shared by the stages, the Colab notebook, publish and the model card."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

CARD_FILE = "README.md"  # a Hub repo's card (model or Space): the Hub renders it as the repo's page
BUILTIN_PREFIX = "builtin:"  # locally built models (the demo's tiny networks), never on the Hub
OFFLINE_VALUES = ("1", "true", "yes", "on")  # what huggingface_hub reads as a set HF_HUB_OFFLINE
TOKEN_HINT = "set HF_TOKEN in the environment or run `hf auth login`"


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


def refuse_token_keys(values: Mapping[str, Any], section: str) -> None:
    """A params section must never hold a token: it would end up in git and DVC."""
    from .errors import UserError

    if any("token" in str(key).lower() for key in values):
        raise UserError("params.yaml: never put a Hugging Face token in params (it would end up in git "
                        f"and DVC); remove it from '{section}' and {TOKEN_HINT}")


def check_repo_id(value: Any, name: str) -> None:
    """A Hub repo id with a namespace (``your-name/impressionist-flux-lora``), or one line."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .errors import UserError, first_line

    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise UserError(f"{name}={value!r} is not a valid Hub repo id: {first_line(err)}") from err
    if value.count("/") != 1:
        raise UserError(f"{name}={value!r} needs a namespace: your-name/{value}")


def check_access(api, token: str) -> str:
    """The user name behind the token; one clear line if the Hub is unreachable or refuses it."""
    from huggingface_hub.errors import HfHubHTTPError

    from .errors import UserError

    if hub_offline():
        raise UserError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or use --dry-run "
                        "to write the upload folder only")
    try:
        return api.whoami(token=token)["name"]
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise UserError(f"the Hugging Face Hub refused the token (HTTP {status}); {TOKEN_HINT} "
                            "with a token that has write access") from err
        raise UserError(f"the Hugging Face Hub answered HTTP {status}; try again later") from err
    except Exception as err:  # DNS, refused connection, timeouts, offline mode: "cannot reach"
        raise UserError(f"cannot reach the Hugging Face Hub ({type(err).__name__}); check the network, "
                        "or use --dry-run to write the upload folder only") from err
