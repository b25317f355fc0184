"""Read ``params.yaml``: each stage reads its own section (plus the shared ``model`` section).

Each section is one frozen dataclass, a :class:`ParamsSection`, in this package, which imports no torch
or diffusers (``params.data``: download, filter, describe, caption, encode; ``params.model``: model,
compute, replicates; ``params.training``: lora, train; ``params.inference`` and ``params.evaluation``:
sample, evaluate; ``params.shipping``: export, publish, space; ``params.app``: app). ``params.stages``
says which sections each stage reads, so a stage's command checks them before its heavy imports.

A section's fields name every setting and hold each default once (``operational`` marks those that
shape no output); ``XParams.check(params)`` is the one way to read a section: it rejects unknown and
missing keys and runs the class's ``__post_init__`` checks, so a wrong param stops the stage with one
clear line before any heavy work. params.yaml stays the single place users edit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, TypeVar

import yaml

from ..errors import UserError, first_line

DEFAULT_PARAMS = Path("params.yaml")
# The dtype names model.dtype, describe.dtype and export.dtype accept (models.DTYPES maps them to torch).
DTYPE_NAMES = ("bfloat16", "float16", "float32")


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


def require_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"params.yaml: {name}={value!r} must be true or false")
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


SectionT = TypeVar("SectionT", bound="ParamsSection")
SHAPES_OUTPUT = "shapes_output"  # field metadata: False for a setting that changes how a stage runs only


def operational(**field_args: Any) -> Any:
    """A settings field (``dataclasses.field`` arguments: ``default=``, ``default_factory=`` or none)
    whose value changes how a stage runs (logging, workers, checkpoints, kernels) but not what it
    computes: such settings stay out of cache fingerprints and run hashes, so changing one reuses a
    cache or resumes a checkpoint. :meth:`ParamsSection.operational_settings` lists them."""
    return dataclasses.field(metadata={SHAPES_OUTPUT: False}, **field_args)


@dataclasses.dataclass(frozen=True)
class ParamsSection:
    """One section of params.yaml, typed. Subclasses set ``SECTION`` (the dotted path of the
    mapping, e.g. ``"train"`` or ``"train.validation"``), declare one field per setting (a default
    where the setting may be left out) and check values in ``__post_init__``. A field typed as
    another ParamsSection is a nested mapping (``train.validation``). ``OPTIONAL`` sections may be
    left out of params.yaml (every setting then has its default); ``MISSING_HINTS`` says, per
    required setting, what to write when it is missing."""

    SECTION: ClassVar[str] = ""
    OPTIONAL: ClassVar[bool] = False
    MISSING_HINTS: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def check(cls: type[SectionT], params: Mapping[str, Any]) -> SectionT:
        """The section of the whole ``params`` mapping, validated (one UserError line if not)."""
        values: Any = params
        for name in cls.SECTION.split("."):
            if cls.OPTIONAL and isinstance(values, Mapping) and values.get(name) is None:
                return cls.of({})
            if not isinstance(values, Mapping) or not isinstance(values.get(name), Mapping):
                raise UserError(f"params.yaml has no '{cls.SECTION}' section")
            values = values[name]
        return cls.of(values)

    @classmethod
    def of(cls: type[SectionT], values: Mapping[str, Any]) -> SectionT:
        """Validate the mapping of this section alone (``check`` finds it in the whole params)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise UserError(f"params.yaml: {', '.join(repr(f'{cls.SECTION}.{k}') for k in unknown)} "
                            f"{'is not a setting' if len(unknown) == 1 else 'are not settings'} of "
                            f"'{cls.SECTION}' (its settings: {', '.join(fields)})")
        missing = [name for name, f in fields.items() if name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            hints = "".join(f"; {cls.MISSING_HINTS[name]}" for name in missing if name in cls.MISSING_HINTS)
            raise UserError(f"params.yaml: {', '.join(repr(f'{cls.SECTION}.{k}') for k in missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} missing{hints}")
        types = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            kind = types.get(name)
            if isinstance(kind, type) and issubclass(kind, ParamsSection):
                value = {} if value is None else value  # `validation:` left empty = its defaults
                if not isinstance(value, Mapping):
                    raise UserError(f"params.yaml: '{kind.SECTION}' must be a mapping of settings")
                value = kind.of(value)
            kwargs[name] = value
        return cls(**kwargs)

    def _set(self, name: str, value: Any) -> None:
        """Store a normalised value from ``__post_init__`` (the instance is frozen afterwards)."""
        object.__setattr__(self, name, value)

    @classmethod
    def operational_settings(cls) -> frozenset[str]:
        """The settings declared with :func:`operational`: they shape no output."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get(SHAPES_OUTPUT) is False)

    def as_dict(self) -> dict[str, Any]:
        """Every setting, defaults included, as plain data (JSON records, fingerprints)."""
        return dataclasses.asdict(self)
