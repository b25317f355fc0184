"""The data-preparation sections: ``download``, ``filter``, ``describe``, ``caption`` and ``encode``.
No torch."""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import UserError, first_line
from . import (DTYPE_NAMES, ParamsSection, operational, require_bool, require_choice, require_int,
               require_multiple, require_positive)

DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class DownloadParams(ParamsSection):
    """params.yaml ``download``: which rows of which source the download stage keeps."""

    SECTION: ClassVar[str] = "download"
    source: str
    style: str
    artists: list[str] = field(default_factory=list)  # empty: every artist
    max_images: int = 0                               # 0: every matching image
    seed: int = 0                                     # of the synthetic source
    revision: str = DEFAULT_REVISION                  # of a Hub source

    def __post_init__(self) -> None:
        self._set("source", str(self.source))
        if not isinstance(self.style, str) or not self.style:
            raise UserError("params.yaml: download.style must be a style name such as Impressionism")
        artists = self.artists or []
        if isinstance(artists, str):
            artists = [artists]
        if not isinstance(artists, list) or not all(isinstance(a, str) for a in artists):
            raise UserError("params.yaml: download.artists must be a list of artist names, e.g. [claude-monet]")
        self._set("artists", list(artists))
        max_images = require_positive(self.max_images, "download.max_images", allow_zero=True)
        if int(max_images) != max_images:
            raise UserError(f"params.yaml: download.max_images={max_images!r} must be a whole number")
        self._set("max_images", int(max_images))
        require_int(self.seed, "download.seed")
        revision = self.revision
        if not isinstance(revision, str) or not revision.strip():
            raise UserError(f"params.yaml: download.revision={revision!r} must be a branch, tag or commit of the "
                            f"Hub dataset (default: {DEFAULT_REVISION})")
        self._set("revision", revision.strip())
        if not self.source.strip():
            raise UserError("params.yaml: download.source is empty; set it to huggan/wikiart, a local parquet "
                            "file or folder, a folder of images, or 'synthetic'")

    def enough(self, kept: int) -> bool:
        """Whether ``kept`` images are all this download wants (never, with max_images 0)."""
        return bool(self.max_images) and kept >= self.max_images


@dataclass(frozen=True)
class FilterParams(ParamsSection):
    """params.yaml ``filter``: which raw images are kept, and the share of them held out for val."""

    SECTION: ClassVar[str] = "filter"
    min_side: float       # px, of the shorter side
    max_aspect: float     # long side / short side
    drop_grayscale: bool
    phash_threshold: int
    val_fraction: float

    def __post_init__(self) -> None:
        require_positive(self.min_side, "filter.min_side")
        max_aspect = require_positive(self.max_aspect, "filter.max_aspect")
        if max_aspect < 1:
            raise UserError(f"params.yaml: filter.max_aspect={max_aspect!r} must be >= 1 (long side / short side)")
        self._set("max_aspect", float(max_aspect))
        require_bool(self.drop_grayscale, "filter.drop_grayscale")
        threshold = require_positive(self.phash_threshold, "filter.phash_threshold", allow_zero=True)
        if int(threshold) != threshold or threshold > 64:
            raise UserError(f"params.yaml: filter.phash_threshold={threshold!r} must be a whole number of bits, 0-64")
        self._set("phash_threshold", int(threshold))
        val_fraction = self.val_fraction
        if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
            raise UserError(f"params.yaml: filter.val_fraction={val_fraction!r} must be between 0 and 1 (exclusive); "
                            "the evaluate stage needs val images")
        self._set("val_fraction", float(val_fraction))


@dataclass(frozen=True)
class DescribeParams(ParamsSection):
    """params.yaml ``describe``: the captioner, its prompt and decoding, the scrub list."""

    SECTION: ClassVar[str] = "describe"
    enabled: bool
    model: str
    revision: str | None
    prompt: str
    max_new_tokens: int
    batch_size: int
    dtype: str = "bfloat16"
    scrub: list[str] = field(default_factory=list)
    scrub_artists: bool = True

    def __post_init__(self) -> None:
        require_bool(self.enabled, "describe.enabled")
        require_bool(self.scrub_artists, "describe.scrub_artists")
        if not isinstance(self.model, str) or not self.model.strip():
            raise UserError("params.yaml: describe.model must be a Hub id, a local transformers folder or "
                            "builtin:tiny-vlm")
        if self.revision is not None and not isinstance(self.revision, str):
            self._set("revision", str(self.revision))
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise UserError("params.yaml: describe.prompt must be a non-empty string")
        require_int(self.max_new_tokens, "describe.max_new_tokens", minimum=1)
        require_int(self.batch_size, "describe.batch_size", minimum=1)
        require_choice(self.dtype, DTYPE_NAMES, "describe.dtype")
        if not isinstance(self.scrub, list) or not all(isinstance(w, str) and w.strip() for w in self.scrub):
            raise UserError(f"params.yaml: describe.scrub={self.scrub!r} must be a list of words or phrases")

    @property
    def prompt_fingerprint(self) -> str:
        return hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()[:12]


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


@dataclass(frozen=True)
class EncodeParams(ParamsSection):
    """params.yaml ``encode``: the resolutions and aspect buckets the latents are cached at."""

    SECTION: ClassVar[str] = "encode"
    resolution: int | list[int]  # one value or several: each image is cached at each
    bucket_min_aspect: float
    bucket_max_aspect: float
    batch_size: int
    shard_size: int
    flip: bool = False
    dataloader_workers: int = operational(default=0)

    def __post_init__(self) -> None:
        if not self.resolutions:
            raise UserError("params.yaml: encode.resolution=[] must name at least one resolution, e.g. 512")
        for value in self.resolutions:
            require_multiple(value, 16, "encode.resolution", "FLUX packs 2x2 latents of an 8x VAE")
        if len(set(self.resolutions)) != len(self.resolutions):
            raise UserError(f"params.yaml: encode.resolution={self.resolution!r} lists a resolution twice")
        require_int(self.batch_size, "encode.batch_size", minimum=1)
        require_int(self.shard_size, "encode.shard_size", minimum=1)
        require_int(self.dataloader_workers, "encode.dataloader_workers")
        low = require_positive(self.bucket_min_aspect, "encode.bucket_min_aspect")
        high = require_positive(self.bucket_max_aspect, "encode.bucket_max_aspect")
        if not low <= 1 <= high:
            raise UserError("params.yaml: encode.bucket_min_aspect must be in (0, 1] and bucket_max_aspect >= 1")

    @property
    def resolutions(self) -> list[int]:
        """``resolution`` as a list (kept as written in ``resolution``: the cache fingerprint covers it)."""
        return list(self.resolution) if isinstance(self.resolution, list) else [self.resolution]
