"""The sampling and evaluation sections (``sample`` with its ``eval_set``, ``evaluate``) and the metric
constants evaluate, report and the model card share. No torch: the checks that need open_clip's model
registry are in ``image_features``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Mapping

from ..errors import UserError
from . import ParamsSection, require_bool, require_choice, require_int, require_multiple, require_positive
from .inference import InferenceSettings

# The metrics with one value per image (columns of metrics/eval_images.csv); KID and CMMD are per set.
PER_IMAGE = ("clip_score", "style_score")


# FID's bias falls like 1/n; the literature (Chong & Forsyth 2020, Jayasumana et al. 2024) wants
# thousands of images before FIDs are comparable. Below this every display flags it as biased.
FID_RELIABLE = 2000


@dataclass(frozen=True)
class EvalSetParams(ParamsSection):
    """params.yaml ``sample.eval_set``: the evaluation set the sample stages draw and evaluate measures."""

    SECTION: ClassVar[str] = "sample.eval_set"
    subjects: str
    num_subjects: int
    seeds: list[int]
    steps: int
    resolution: int
    guidance_scale: float

    def __post_init__(self) -> None:
        require_int(self.num_subjects, "sample.eval_set.num_subjects", minimum=1)
        require_int(self.steps, "sample.eval_set.steps", minimum=1)
        require_multiple(self.resolution, 16, "sample.eval_set.resolution")
        require_positive(self.guidance_scale, "sample.eval_set.guidance_scale", allow_zero=True)
        seeds = self.seeds
        if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
            raise UserError("params.yaml: sample.eval_set.seeds must list distinct integer seeds, e.g. [0, 1, 2]")
        if not isinstance(self.subjects, str) or not self.subjects.strip():
            raise UserError("params.yaml: sample.eval_set.subjects must name a text file of subjects, one per line")


@dataclass(frozen=True)
class SampleParams(ParamsSection, InferenceSettings):
    """params.yaml ``sample``: the show set (prompts x seeds at each LoRA scale), how it is drawn, and
    the evaluation set. It lives beside the inference settings it extends, outside the sample stage,
    because the app, the Space and the model card read the section too."""

    SECTION: ClassVar[str] = "sample"
    MISSING_HINTS: ClassVar[Mapping[str, str]] = {
        "eval_set": "it defines the images the evaluate stage measures (subjects, num_subjects, seeds, "
                    "steps, resolution, guidance_scale)",
        "lora_scales": "list LoRA scales > 0, e.g. [0.5, 1.0]",
        "seeds": "list at least one integer seed, e.g. [0, 1]"}
    seeds: list[int]
    steps: int
    guidance_scale: float
    resolution: int
    lora_scales: list[float]
    max_sequence_length: int
    eval_set: EvalSetParams
    prompts: list[str] = field(default_factory=list)  # held-out subjects; the trigger is added to each
    val_captions: int = 0  # + the first N distinct validation captions (0 = none)
    vae_tiling: bool = False

    def __post_init__(self) -> None:
        items = [] if self.prompts is None else self.prompts
        if not isinstance(items, list) or not all(isinstance(p, str) and p.strip() for p in items):
            raise UserError("params.yaml: sample.prompts must be a list of non-empty prompts")
        self._set("prompts", [p.strip() for p in items])
        count = self.val_captions
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise UserError(f"params.yaml: sample.val_captions={count!r} must be an integer >= 0 "
                            "(0 = no validation captions in the prompt set)")
        if not self.prompts and count == 0:
            raise UserError("the prompt set is empty: params.yaml lists no sample.prompts and sample.val_captions "
                            "is 0; add held-out subjects to sample.prompts or set sample.val_captions > 0")
        require_multiple(self.resolution, 16, "sample.resolution")
        require_int(self.steps, "sample.steps", minimum=1)
        require_positive(self.guidance_scale, "sample.guidance_scale", allow_zero=True)
        require_int(self.max_sequence_length, "sample.max_sequence_length", minimum=1)
        seeds = self.seeds
        if not seeds or not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                 for s in seeds):
            raise UserError("params.yaml: sample.seeds must list at least one integer seed")
        scales = self.lora_scales
        if (not scales or not isinstance(scales, list)
                or any(not isinstance(s, (int, float)) or s <= 0 for s in scales)):
            raise UserError("params.yaml: sample.lora_scales must list LoRA scales > 0, e.g. [0.5, 1.0]")
        require_bool(self.vae_tiling, "sample.vae_tiling")
        super().__post_init__()  # lora_mode, quantization, offload, compile


TINY_FID = "builtin:tiny"


INCEPTION = "inception"


FID_FEATURE_CHOICES = (INCEPTION, TINY_FID)


INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


CONFIDENCE = 0.95


RESAMPLES = 2000


CLIP_KEYS = ("clip_model", "clip_pretrained")


CMMD_KEYS = ("cmmd_clip_model", "cmmd_clip_pretrained")


@dataclass(frozen=True)
class EvaluateParams(ParamsSection):
    """params.yaml ``evaluate``: the feature networks (the reference and evaluate stages must use the
    same ones) and the bootstrap behind every interval. Checked without torch; the stages read
    ``image_features.EvaluateParams``, which also looks the CLIP names up in open_clip's registry."""

    SECTION: ClassVar[str] = "evaluate"
    fid_features: str
    image_size: int
    clip_model: str
    clip_pretrained: str | None  # None is stored as ""
    cmmd_clip_model: str
    cmmd_clip_pretrained: str | None
    inception_weights: str | None = ""  # stored stripped, None as ""
    bootstrap_resamples: int = RESAMPLES
    confidence: float = CONFIDENCE
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_fid_features()
        require_int(self.image_size, "evaluate.image_size", minimum=1)
        for model_key, pretrained_key in (CLIP_KEYS, CMMD_KEYS):
            self._check_clip(model_key, pretrained_key)
        require_int(self.seed, "evaluate.seed")
        require_int(self.bootstrap_resamples, "evaluate.bootstrap_resamples", minimum=100)
        if not isinstance(self.confidence, float) or not 0.5 <= self.confidence < 1.0:
            raise UserError(f"params.yaml: evaluate.confidence={self.confidence!r} must be a number in "
                            "[0.5, 1), e.g. 0.95")

    def _check_fid_features(self) -> None:
        """One line for an unknown ``fid_features`` or an ``inception_weights`` file that does not exist."""
        require_choice(self.fid_features, FID_FEATURE_CHOICES, "evaluate.fid_features")
        weights = str(self.inception_weights or "").strip()
        if self.fid_features == INCEPTION and weights and not Path(weights).expanduser().is_file():
            raise UserError(
                f"evaluate.inception_weights={weights!r} does not exist; point it at a local copy of "
                f"{INCEPTION_WEIGHTS_FILE} (pytorch-fid's pt_inception-2015-12-05-6726825d.pth) or set it to \"\" "
                "to download it"
            )
        self._set("inception_weights", weights)

    def _check_clip(self, model_key: str, pretrained_key: str) -> None:
        for key in (model_key, pretrained_key):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise UserError(f"params.yaml: evaluate.{key}={value!r} must be a string")
        model_name = getattr(self, model_key)
        if not (model_name or "").strip():
            raise UserError(f"params.yaml: evaluate.{model_key} is empty")
        self._set(pretrained_key, getattr(self, pretrained_key) or "")
