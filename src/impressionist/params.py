"""Read ``params.yaml``: each stage reads its own section (plus the shared ``model`` section).

Values are validated where they are read, so a wrong param stops the stage with one clear line
before any heavy work.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import UserError, first_line

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"params file {path} not found; run from the repository root")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"params file {path} is not valid YAML: {first_line(err)}") from err
    if not isinstance(data, dict):
        raise UserError(f"params file {path} must hold a mapping of sections")
    return data


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in params or not isinstance(params[name], dict):
        raise UserError(f"params.yaml has no '{name}' section")
    return params[name]


def require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise UserError(f"params.yaml: '{where}.{key}' is missing")
    return cfg[key]


def require_keys(cfg: dict[str, Any], keys: Iterable[str], where: str) -> None:
    """Check up front that every key without a sensible default is present (one line if not)."""
    missing = [f"'{where}.{key}'" for key in keys if key not in cfg]
    if missing:
        raise UserError(f"params.yaml: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")


def require_choice(value: Any, choices: Iterable[str], name: str) -> str:
    choices = list(choices)
    if value not in choices:
        raise UserError(f"params.yaml: {name}={value!r} is not one of {', '.join(map(str, choices))}")
    return value


def require_positive(value: Any, name: str, *, allow_zero: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"params.yaml: {name}={value!r} must be a number {bound}")
    return value


def require_int(value: Any, name: str, *, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"params.yaml: {name}={value!r} must be an integer >= {minimum}")
    return value


def require_multiple(value: Any, multiple: int, name: str, why: str = "") -> int:
    """A positive integer that is a multiple of ``multiple`` (image sides: FLUX packs 2x2 patches of
    latents from an 8x-downsampling VAE, so pixel sides must be multiples of 16)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % multiple:
        raise UserError(f"params.yaml: {name}={value!r} must be a positive multiple of {multiple}"
                        + (f" ({why})" if why else ""))
    return value


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable values (used to key caches and checkpoints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
