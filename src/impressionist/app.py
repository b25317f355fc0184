"""The Gradio demo: one prompt, the base model and the LoRA side by side with the same seed.

``app.py`` at the repository root (the Hugging Face Spaces convention) is ``build_demo(load_settings())``.
Settings come from the ``app`` section of params.yaml (plus ``model``, ``sample.prompts`` and
``caption.trigger``), and every one of them can be overridden by an environment variable
``IMPRESSIONIST_<KEY>`` (``IMPRESSIONIST_BASE_MODEL``, ``IMPRESSIONIST_LORA``, ...), so the same
file runs the tiny builtin model on a laptop and FLUX.1-dev with the published LoRA on a GPU Space.

One pipeline holds the LoRA as a named adapter; the base image is drawn with the adapter disabled
and the LoRA image with it enabled at the requested scale (or, with ``app.lora_mode: fused``, merged
into the weights while it is drawn). The steps, LoRA mode, transformer quantization, offload and
compilation are :mod:`impressionist.inference`'s settings, shared with the sample stages. Two pipelines would hold two copies of
the 12B-parameter transformer (and of the text encoders) for the same result. Because switching
the adapter changes shared state, one lock serialises generation; the queue's concurrency limit
(``app.concurrency_limit``, 1 by default: one GPU) decides how many requests wait for it at once.

:class:`Generator` is usable without any UI: ``Generator(settings)(prompt, seed=...)`` returns the
two PIL images, or raises :class:`~impressionist.errors.UserError` for out-of-bounds input.

On a ZeroGPU Space (the ``spaces`` package importable) the generation function is wrapped in
``spaces.GPU(duration=app.gpu_duration)``: a GPU is attached for each call, for at most that long.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError, first_line
from .inference import baked, build_pipeline, check, lora_applied, lora_removed
from .layout import LORA_WEIGHTS
from .params import DEFAULT_PARAMS, load_params
from .params.app import MULTIPLE, AppParams
from .params.inference import InferenceSettings
from .params.model import ModelParams
from .prompts import with_trigger

ENV_PREFIX = "IMPRESSIONIST_"
# A bare Space has no params.yaml: it runs the recipe's base model.
RECIPE_BASE_MODEL = "black-forest-labs/FLUX.1-dev"


@dataclass(frozen=True)
class AppSettings:
    """What the app runs with: ``app`` settings resolved against the model, caption and sample params."""

    base_model: str
    revision: str | None
    lora: str
    dtype: str
    device: str
    trigger: str
    examples: list[str]
    default_steps: int
    default_guidance: float
    default_size: int
    max_steps: int
    max_resolution: int
    min_resolution: int
    max_prompt_chars: int
    max_guidance: float
    max_lora_scale: float
    concurrency_limit: int
    max_queue_size: int
    inference: InferenceSettings
    gpu_duration: int


def _from_env(key: str, default: Any, environ: Mapping[str, str]) -> Any:
    name = ENV_PREFIX + key.upper()
    if name not in environ:
        return default
    raw = environ[name]
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} must be a {type(default).__name__}") from None
    return raw


def app_params(params: Mapping[str, Any], environ: Mapping[str, str]) -> AppParams:
    """The ``app`` section, each setting overridden by ``IMPRESSIONIST_<KEY>``, then checked: the
    overrides go into the mapping first, so a variable is typed as the value it replaces."""
    given = {f.name: f.default for f in fields(AppParams)} | dict(params.get("app") or {})
    return AppParams.of({key: _from_env(key, value, environ) for key, value in given.items()})


def load_settings(params: dict[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> AppSettings:
    """Settings from params (``IMPRESSIONIST_PARAMS`` or ./params.yaml, if present) and the environment."""
    import torch

    environ = os.environ if environ is None else environ
    if params is None:
        path = Path(environ.get(ENV_PREFIX + "PARAMS", str(DEFAULT_PARAMS)))
        params = load_params(path) if path.is_file() else {}
    cfg = app_params(params, environ)
    model = ModelParams.check(params) if params.get("model") else ModelParams(pretrained=RECIPE_BASE_MODEL)
    # caption and sample are read key by key: a Space's params.yaml holds only the keys the app uses
    # (space.APP_SECTIONS), too few for CaptionParams and SampleParams, and a bare Space has none.
    sample = params.get("sample") or {}
    base_model = cfg.base_model or model.pretrained
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.dtype or (model.dtype if device == "cuda" else "float32")
    trigger = str(_from_env("trigger", (params.get("caption") or {}).get("trigger", ""), environ))
    prompts = [with_trigger(trigger, p) for p in sample.get("prompts") or []]
    size = int(sample.get("resolution", cfg.max_resolution))
    size = min(max(size, cfg.min_resolution), cfg.max_resolution) // MULTIPLE * MULTIPLE
    return AppSettings(
        base_model=str(base_model),
        revision=model.revision if base_model == model.pretrained else None,
        lora=str(cfg.lora), dtype=str(dtype), device=device, trigger=trigger, examples=prompts,
        default_steps=min(int(sample.get("steps", 28)), cfg.max_steps),
        default_guidance=min(float(sample.get("guidance_scale", 3.5)), float(cfg.max_guidance)),
        default_size=max(size, MULTIPLE),
        max_steps=cfg.max_steps, max_resolution=cfg.max_resolution, min_resolution=cfg.min_resolution,
        max_prompt_chars=cfg.max_prompt_chars, concurrency_limit=cfg.concurrency_limit,
        max_queue_size=cfg.max_queue_size, max_guidance=float(cfg.max_guidance),
        max_lora_scale=float(cfg.max_lora_scale), inference=cfg, gpu_duration=cfg.gpu_duration,
    )


def check_request(settings: AppSettings, prompt: str, seed: Any, steps: Any, guidance: Any,
                  lora_scale: Any, width: Any, height: Any) -> dict[str, Any]:
    """Validated generation arguments, or a UserError that says which input and which bounds."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise UserError("the prompt is empty; describe a picture, e.g. "
                        f"'{settings.examples[0] if settings.examples else 'a harbor at sunset'}'")
    if len(prompt) > settings.max_prompt_chars:
        raise UserError(f"the prompt has {len(prompt)} characters; the limit is {settings.max_prompt_chars}")

    def whole(value, name, low, high):
        # NaN and inf first: int() of them raises ValueError / OverflowError, not a message.
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or int(value) != value):
            raise UserError(f"{name} must be a whole number, got {value!r}")
        if not low <= value <= high:
            raise UserError(f"{name} must be between {low} and {high}, got {int(value)}")
        return int(value)

    def number(value, name, low, high):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise UserError(f"{name} must be between {low:g} and {high:g}, got {value!r}")
        return float(value)

    sizes = {}
    for name, value in (("width", width), ("height", height)):
        sizes[name] = whole(value, name, settings.min_resolution, settings.max_resolution)
        if sizes[name] % MULTIPLE:
            raise UserError(f"{name} must be a multiple of {MULTIPLE}, got {sizes[name]}")
    return dict(prompt=prompt, seed=whole(seed, "seed", 0, 2**32 - 1),
                steps=whole(steps, "steps", 1, settings.max_steps),
                guidance=number(guidance, "guidance", 0.0, settings.max_guidance),
                lora_scale=number(lora_scale, "LoRA scale", 0.0, settings.max_lora_scale), **sizes)


class Generator:
    """The base model with the LoRA as a switchable adapter; call it for (base, LoRA) images."""

    def __init__(self, settings: AppSettings):
        import torch

        from .models import DTYPES, resolve_pretrained, without_third_party_noise

        self.settings = settings
        if settings.dtype not in DTYPES:
            raise UserError(f"dtype {settings.dtype!r} is not one of {', '.join(DTYPES)}")
        check(settings.inference, torch.device(settings.device), "app", DTYPES[settings.dtype])
        if baked(settings.inference):
            raise UserError(f"app.lora_mode=fused with app.quantization={settings.inference.quantization}: a LoRA "
                            "merged into quantized weights cannot be switched off for the base image; use "
                            "app.lora_mode: adapter")
        lora = Path(settings.lora)
        local = lora.exists()
        if not local and (settings.lora.count("/") != 1 or settings.lora.startswith((".", "/"))):
            raise UserError(f"no LoRA at {settings.lora}; run `dvc repro train`, or set "
                            f"{ENV_PREFIX}LORA to a LoRA folder or a Hub repo id")
        if local and not (lora / LORA_WEIGHTS).is_file():
            raise UserError(f"{lora} has no {LORA_WEIGHTS}; run `dvc repro train` first")
        folder = resolve_pretrained(settings.base_model, settings.revision)
        try:
            with without_third_party_noise():
                self.pipe = build_pipeline(folder, DTYPES[settings.dtype], torch.device(settings.device),
                                           settings.inference, lora=settings.lora, weight_name=LORA_WEIGHTS)
        except (OSError, ValueError, RuntimeError) as err:
            # OSError: no such file or Hub repo, unreadable safetensors, Hub HTTP errors (HfHubHTTPError
            # is one); RuntimeError from load_state_dict: layers of another base model's shape.
            if isinstance(err, RuntimeError) and "state_dict" not in str(err):
                raise  # e.g. out of GPU memory: not a problem with the LoRA
            raise UserError(f"cannot load the LoRA {settings.lora} into {settings.base_model} "
                            f"({first_line(err, 160)}); set {ENV_PREFIX}LORA (or app.lora in params.yaml) "
                            f"to a folder holding {LORA_WEIGHTS} trained on this base model, or the Hub repo id "
                            "of one") from err
        self._lock = threading.Lock()

    def __call__(self, prompt: str, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, lora_scale: float = 1.0, width: int | None = None,
                 height: int | None = None):
        import torch

        from .models import without_third_party_noise

        s = self.settings
        args = check_request(s, prompt, seed, s.default_steps if steps is None else steps,
                             s.default_guidance if guidance is None else guidance, lora_scale,
                             width or s.default_size, height or s.default_size)

        @without_third_party_noise()
        def draw():
            return self.pipe(args["prompt"], height=args["height"], width=args["width"],
                             num_inference_steps=args["steps"], guidance_scale=args["guidance"],
                             # The same CPU generator seed for both images: same starting noise.
                             generator=torch.Generator("cpu").manual_seed(args["seed"])).images[0]

        with self._lock, torch.no_grad():
            with lora_removed(self.pipe, s.inference):
                base = draw()
            with lora_applied(self.pipe, s.inference, args["lora_scale"]):
                lora = draw()
        return base, lora


def on_zerogpu(fn, duration: int):
    """``fn`` wrapped in ``spaces.GPU(duration=...)`` when the ZeroGPU package is importable, else ``fn``."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)


def build_demo(settings: AppSettings, generator: Generator | None = None):
    """The ``gr.Blocks`` app, its queue set up; ``generator`` defaults to one built from ``settings``."""
    import gradio as gr

    generator = generator or Generator(settings)

    def generate(prompt, seed, steps, guidance, lora_scale, width, height):
        try:
            return generator(prompt, seed, steps, guidance, lora_scale, width, height)
        except UserError as err:
            raise gr.Error(str(err)) from err

    generate = on_zerogpu(generate, settings.gpu_duration)

    s = settings
    with gr.Blocks(title="impressionist: FLUX.1 + Impressionism LoRA") as demo:
        trigger = f" Start prompts with the trigger word **`{s.trigger}`**." if s.trigger else ""
        gr.Markdown(f"## impressionist — base model vs LoRA\nBase model `{s.base_model}`, LoRA "
                    f"`{s.lora}`. Both images use the same seed.{trigger}")
        with gr.Row():
            prompt = gr.Textbox(label="prompt", lines=2, max_length=s.max_prompt_chars,
                                value=s.examples[0] if s.examples else "", elem_id="prompt", scale=4)
            run = gr.Button("Generate", variant="primary", elem_id="generate", scale=1)
        with gr.Row():
            # No precision=0: Gradio would round the value itself and fail on NaN with a bare
            # ValueError; check_request refuses non-whole seeds (NaN included) with a message.
            seed = gr.Number(label="seed", value=0, minimum=0, maximum=2**32 - 1)
            steps = gr.Slider(1, s.max_steps, value=s.default_steps, step=1, label="steps")
            guidance = gr.Slider(0.0, s.max_guidance, value=s.default_guidance, step=0.1, label="guidance")
            lora_scale = gr.Slider(0.0, s.max_lora_scale, value=1.0, step=0.05, label="LoRA scale")
        with gr.Row():
            width = gr.Slider(s.min_resolution, s.max_resolution, value=s.default_size, step=MULTIPLE,
                              label="width")
            height = gr.Slider(s.min_resolution, s.max_resolution, value=s.default_size, step=MULTIPLE,
                               label="height")
        with gr.Row():
            base_image = gr.Image(label="base model", type="pil", format="png", elem_id="base-image")
            lora_image = gr.Image(label="with LoRA", type="pil", format="png", elem_id="lora-image")
        if s.examples:
            gr.Examples(examples=[[p] for p in s.examples], inputs=[prompt], label="example prompts")
        inputs = [prompt, seed, steps, guidance, lora_scale, width, height]
        run.click(generate, inputs, [base_image, lora_image], api_name="generate")
        prompt.submit(generate, inputs, [base_image, lora_image], api_visibility="private")
    demo.queue(default_concurrency_limit=s.concurrency_limit, max_size=s.max_queue_size)
    return demo


def describe(settings: AppSettings) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(settings).items() if k not in ("examples", "inference")) + \
        f", {settings.inference.describe()}"
