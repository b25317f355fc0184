"""The shipping sections: ``export``, ``publish`` and ``space`` (the app's is in ``inference``). No torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from ..errors import UserError
from ..hub import check_repo_id, refuse_token_keys
from . import DTYPE_NAMES, ParamsSection, SectionT, require_bool, require_choice, require_positive


@dataclass(frozen=True)
class ExportParams(ParamsSection):
    """params.yaml ``export``: the kohya file's dtype, and whether to fuse the LoRA into the transformer."""

    SECTION: ClassVar[str] = "export"
    OPTIONAL: ClassVar[bool] = True
    fused: bool = False
    lora_scale: float = 1.0
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        require_bool(self.fused, "export.fused")
        require_choice(self.dtype, DTYPE_NAMES, "export.dtype")
        require_positive(self.lora_scale, "export.lora_scale")


class HubSection(ParamsSection):
    """A section naming Hub repos: a key holding a token is refused before anything else, since a token
    in params would end up in git and DVC."""

    @classmethod
    def of(cls: type[SectionT], values: Mapping[str, Any]) -> SectionT:
        refuse_token_keys(values, cls.SECTION)  # before the unknown-key check would name the token's key
        return super().of(values)


@dataclass(frozen=True)
class PublishParams(HubSection):
    """params.yaml ``publish``: where ``impressionist publish`` uploads, and the card's licence and tags.
    ``repo_id`` may be empty here: ``--repo-id`` gives it, and ``space`` only reads it."""

    SECTION: ClassVar[str] = "publish"
    OPTIONAL: ClassVar[bool] = True
    repo_id: str = ""
    private: bool = True
    tags: list[str] = field(default_factory=lambda: [
        "text-to-image", "diffusers", "lora", "flux", "template:sd-lora", "impressionism"])
    license: str = "other"
    license_name: str = "flux-1-dev-non-commercial-license"
    license_link: str = "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"
    commit_message: str = "Upload impressionist LoRA"

    def __post_init__(self) -> None:
        if self.repo_id:
            check_repo_id(self.repo_id, "publish.repo_id")
        require_bool(self.private, "publish.private")


@dataclass(frozen=True)
class SpaceParams(HubSection):
    """params.yaml ``space`` (every key optional; the command line overrides each)."""

    SECTION: ClassVar[str] = "space"
    OPTIONAL: ClassVar[bool] = True
    space_id: str = ""        # "" = write the folder only
    lora_repo: str = ""       # "" = publish.repo_id
    hardware: str = "zero-a10g"
    private: bool = True
    title: str = "Impressionist FLUX.1 LoRA"

    def __post_init__(self) -> None:
        from huggingface_hub import SpaceHardware

        for key in ("space_id", "lora_repo"):
            if getattr(self, key):
                check_repo_id(getattr(self, key), f"space.{key}")
        hardware = [h.value for h in SpaceHardware]
        if self.hardware not in hardware:
            raise UserError(f"space.hardware={self.hardware!r} is not a Space hardware; one of {', '.join(hardware)}")
        require_bool(self.private, "space.private")


