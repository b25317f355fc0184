"""The Hub model card (README.md) for the LoRA: YAML metadata plus what a user needs to know.

Built with huggingface_hub's ``ModelCardData`` (base_model, licence, tags, the trigger word as
``instance_prompt``, a widget image) and a Markdown body: how to load the diffusers and the
kohya/ComfyUI files, the training params actually used (``models/lora/training_config.json``), the
evaluation table (``metrics/eval.json``) and a note on the data. It says plainly when the LoRA comes
from the offline demo (tiny random-weight model, synthetic images, random metric networks).
"""

from __future__ import annotations

from typing import Any

from .hub import BUILTIN_PREFIX, is_hub_id
from .params.data import CaptionParams, DownloadParams, EncodeParams
# The torch-free EvaluateParams: the card names the feature networks, it does not load them (the
# evaluate stage checked them against open_clip's registry when it ran).
from .params.evaluation import FID_RELIABLE, EvaluateParams, SampleParams
from .params.model import ModelParams
from .params.shipping import PublishParams
from .prompts import with_trigger

METRIC_COLUMNS = [("clip_score", "CLIP score (subject) ↑"), ("style_score", "style score ↑"),
                  ("kid", "KID ↓"), ("cmmd", "CMMD ↓")]


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _with_ci(values: dict[str, Any], key: str) -> str:
    """``value [low, high]``, or the bare value (or –) when the interval is missing."""
    if key not in values:
        return "–"
    low, high = values.get(f"{key}_ci_low"), values.get(f"{key}_ci_high")
    cell = _number(values[key])
    return cell if low is None or high is None else f"{cell} [{_number(low)}, {_number(high)}]"


def metrics_table(metrics: dict[str, Any]) -> str:
    """Rows: the base model, the LoRA at each evaluated scale, and the paired LoRA − base change;
    each cell a value with its 95% CI; then the image counts and FID, flagged when biased."""
    rows = [("base model", metrics["base"])] if "base" in metrics else []
    scales = sorted((float(k.removeprefix("lora_scale_")), v) for k, v in metrics.items()
                    if k.startswith("lora_scale_"))
    if "lora" in metrics:
        scales.append((float(metrics["lora"].get("lora_scale", 1.0)), metrics["lora"]))
    rows += [(f"LoRA × {scale:g}", values) for scale, values in sorted(scales, key=lambda kv: kv[0])]
    if "delta" in metrics:
        rows.append(("change (LoRA − base, paired)", metrics["delta"]))
    if "recipe" in metrics:  # replicates.count >= 2: the recipe over its training replicates
        count = metrics["recipe"].get("replicates", "?")
        rows.append((f"recipe: LoRA × {metrics['recipe'].get('lora_scale', 1.0):g}, mean of {count} training seeds",
                     metrics["recipe"]))
    if "recipe_delta" in metrics:
        rows.append(("recipe change (recipe − base)", metrics["recipe_delta"]))
    columns = METRIC_COLUMNS + [("fid", "FID (biased, see below)"), ("clip_score_n", "images")]
    header = "| | " + " | ".join(title for _, title in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for label, values in rows:
        cells = [_with_ci(values, key) for key, _ in METRIC_COLUMNS]
        cells += [_number(values.get("fid", "–")), _number(values.get("clip_score_n", "–"))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluation_note(metrics: dict[str, Any], confidence: float) -> str:
    """How to read the table: n, what the brackets are, which changes are real, FID's bias."""
    base = metrics.get("base", {})
    n, n_real = base.get("clip_score_n", "?"), metrics.get("n_real", "?")
    delta = metrics.get("delta", {})
    real = [name for name, _ in METRIC_COLUMNS
            if name in delta and (delta.get(f"{name}_ci_low", 0) > 0 or delta.get(f"{name}_ci_high", 0) < 0)]
    verdict = (f"The paired change is significant (its interval excludes 0) for: {', '.join(real)}."
               if real else "No paired change is significant: every interval of the change includes 0.")
    fid_n = base.get("fid_n", n)
    fid = (f" FID is from {fid_n} images per set and is biased upwards below ~{FID_RELIABLE} images: it is "
           f"given for familiarity only, without an interval." if isinstance(fid_n, int) and fid_n < FID_RELIABLE
           else "")
    return (f"{n} generated images per row (subjects × seeds, the same for every row) against {n_real} "
            f"held-out paintings; brackets are {confidence:.0%} bootstrap confidence intervals. {verdict}{fid} "
            f"{coverage_note(metrics)}")


def coverage_note(metrics: dict[str, Any]) -> str:
    """What the intervals cover: images and subjects, and training seeds only in the recipe rows."""
    count = (metrics.get("replicates") or {}).get("count", 1)
    if "recipe" in metrics:
        return (f"The base-model, LoRA and change rows are about this LoRA's weights: their intervals cover "
                f"images and subjects. The recipe rows average {count} LoRAs trained with different seeds "
                f"(`replicates.count`); their t intervals also cover training seeds.")
    return ("The intervals cover images and subjects, not training noise: this is one LoRA from one training "
            "seed, and another seed of the same recipe would score differently by an unmeasured amount "
            "(`replicates.count` ≥ 2 measures it).")


def training_table(training: dict[str, Any], resolution: Any) -> str:
    lora, train = training.get("lora", {}), training.get("train", {})
    batch = train.get("batch_size")
    accumulation = train.get("gradient_accumulation_steps", 1)
    rows = [
        ("base model", f"`{training.get('base_model')}`"),
        ("steps", training.get("steps", train.get("max_steps"))),
        ("LoRA rank / alpha", f"{lora.get('rank')} / {lora.get('alpha')}"),
        ("LoRA targets", f"`{lora.get('targets')}`"),
        ("learning rate", f"{train.get('learning_rate')} ({train.get('lr_scheduler')}, "
                          f"{train.get('lr_warmup_steps')} warm-up steps)"),
        ("optimizer", train.get("optimizer")),
        ("batch size", f"{batch} × {accumulation} accumulation steps"),
        ("resolution", resolution_text(resolution, train.get("resolution_mix"))),
        ("mixed precision", train.get("mixed_precision")),
        ("timestep sampling", train.get("timestep_sampling")),
        ("LoRA weights", weights_text(training)),
        ("guidance while training", train.get("guidance_scale")),
        ("caption dropout", train.get("caption_dropout")),
        ("seed", train.get("seed")),
    ]
    return "\n".join(["| param | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def resolution_text(resolution: Any, mix: Any) -> str:
    values = resolution if isinstance(resolution, list) else [resolution]
    shares = (", micro-batches by resolution " + ", ".join(f"{k}: {v}" for k, v in mix.items())) if mix else ""
    each = " each" if len(values) > 1 else ""
    return f"{', '.join(str(v) for v in values)} px (aspect buckets{each}{shares})"


def weights_text(training: dict[str, Any]) -> str:
    """Which weights the LoRA file holds (the trainer's training_config.json says)."""
    decay = training.get("train", {}).get("ema_decay", 0)
    if training.get("weights") == "ema":
        return (f"EMA of the trained weights (decay {decay}, updated after every optimizer step); the "
                f"last step's raw weights are kept beside it in the training output (`models/lora/raw/`)")
    return "the last optimizer step's weights (no EMA)"


def data_note(download: DownloadParams, data_metrics: dict[str, Any] | None) -> str:
    source = str(download.source)
    if source == "synthetic":
        return ("**This LoRA was trained on SYNTHETIC, procedurally painted images** in the WikiArt "
                "schema (the project's offline demo), not on paintings. It shows that the pipeline "
                "works and nothing about art.")
    count = f" {data_metrics['train']}" if data_metrics and "train" in data_metrics else ""
    artists = download.artists
    who = f" (artists: {', '.join(artists)})" if artists else ""
    origin = (f"[`{source}`](https://huggingface.co/datasets/{source})" if is_hub_id(source)
              else f"the local source `{source}`")
    research = "; the dataset is provided for research use" if is_hub_id(source) else ""
    return (f"Trained on{count} paintings of the WikiArt style *{download.style}*{who} from "
            f"{origin}, filtered for size, aspect, colour and near-duplicates. WikiArt images remain "
            f"subject to the terms of their rights holders{research}.")


def build_card(*, repo_id: str, params: dict[str, Any], training: dict[str, Any],
               metrics: dict[str, Any], publish: PublishParams, lora_file: str, kohya_file: str,
               grid_file: str, data_metrics: dict[str, Any] | None = None):
    """The ``huggingface_hub.ModelCard`` for the upload folder (files named relative to it)."""
    from huggingface_hub import ModelCard, ModelCardData

    trigger = CaptionParams.check(params).trigger
    base_model = str(training.get("base_model") or ModelParams.check(params).pretrained)
    download, sample = DownloadParams.check(params), SampleParams.check(params)
    evaluate, eval_set = EvaluateParams.check(params), sample.eval_set
    # the card's example: the first show prompt (a prompt set may hold validation captions only)
    prompt = next(iter(sample.prompts), "a harbor at sunset")
    full_prompt = with_trigger(trigger, prompt)
    demo = base_model.startswith(BUILTIN_PREFIX) or download.source == "synthetic"
    data = ModelCardData(
        base_model=base_model if is_hub_id(base_model) else None,
        library_name="diffusers", pipeline_tag="text-to-image",
        license=publish.license, license_name=publish.license_name, license_link=publish.license_link,
        tags=list(publish.tags or []),
        datasets=[download.source] if is_hub_id(str(download.source)) else None,
        instance_prompt=trigger or None,
        widget=[{"text": full_prompt, "output": {"url": grid_file}}],
    )
    name = repo_id.split("/")[-1]
    random_nets = any(str(getattr(evaluate, key)).startswith(BUILTIN_PREFIX)
                      for key in ("fid_features", "clip_model", "cmmd_clip_model"))
    metric_note = ("**These numbers come from random-weight feature networks (the offline demo) and "
                   "mean nothing about image quality.**" if random_nets else
                   f"FID/KID with {evaluate.fid_features} features, CLIP and style "
                   f"scores with open_clip {evaluate.clip_model} ({evaluate.clip_pretrained}), "
                   f"CMMD with {evaluate.cmmd_clip_model} ({evaluate.cmmd_clip_pretrained}); "
                   f"{metrics.get('n_real', '?')} validation paintings as the real set.")
    demo_warning = ("> **Offline demo artefact**: trained on the project's tiny random-weight "
                    "FLUX-architecture model and/or synthetic images. It is not a usable "
                    "FLUX.1-dev LoRA.\n\n" if demo else "")
    base_link = (f"[{base_model}](https://huggingface.co/{base_model})" if is_hub_id(base_model)
                 else f"`{base_model}`")
    body = f"""
# {name}

{demo_warning}A LoRA for {base_link} {"made by the offline demo of" if demo else "that paints in the manner of the French Impressionists, trained with"}
the `impressionist` DVC pipeline (rectified-flow objective, cached latents and text embeddings,
peft LoRA on the transformer).

![base model vs LoRA, same prompts and seeds]({grid_file})

*Left: the base model; right: with the LoRA at each evaluated scale; same prompts and seeds.*

## Trigger word

Start prompts with **`{trigger}`**, e.g. `{full_prompt}`.

## Use with 🧨 diffusers

```python
import torch
from diffusers import FluxPipeline

pipe = FluxPipeline.from_pretrained("{base_model}", dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{repo_id}", weight_name="{lora_file}")
image = pipe("{full_prompt}", num_inference_steps={sample.steps},
             guidance_scale={sample.guidance_scale},
             joint_attention_kwargs={{"scale": 1.0}}).images[0]  # scale = LoRA strength
```

## Use with ComfyUI, Forge or kohya's sd-scripts

`{kohya_file}` holds the same LoRA in the kohya layout (`lora_unet_*` keys with Black Forest Labs
module names, fused q/k/v, `.alpha` per layer). Put it in `ComfyUI/models/loras/` and load it with a
*LoraLoader* node on FLUX.1-dev; sd-scripts loads it with `--lora_weights` (strict) or merges it.

| client | `{lora_file}` | `{kohya_file}` |
|---|---|---|
| diffusers | every layer, trained strength | every block layer, trained strength (its kohya reader drops a final layer) |
| ComfyUI | every layer, trained strength (alpha/r is baked into the weights: ComfyUI ignores the metadata) | every layer, trained strength |
| kohya sd-scripts | not its format | every block layer (it builds none for a final layer) |

## Training

{training_table(training, EncodeParams.check(params).resolution)}

## Evaluation

{metrics_table(metrics)}

{evaluation_note(metrics, evaluate.confidence)}

{metric_note} The evaluation set: `"{trigger}, <subject>"` for {eval_set.num_subjects} subjects
(`{eval_set.subjects}`) × seeds {eval_set.seeds}, {eval_set.steps} steps,
guidance {eval_set.guidance_scale}, {eval_set.resolution} px; the CLIP score is measured
against the subject alone.

## Data

{data_note(download, data_metrics)}

## Licence

FLUX.1-dev is released under the FLUX.1 [dev] Non-Commercial License
([{publish.license_name}]({publish.license_link})); LoRAs trained on it are derivatives
and inherit its terms: no commercial use.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
