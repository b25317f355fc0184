"""The evaluate stage: base model vs LoRA on the evaluation set, every number with its n and 95% CI.

Reads the evaluation set the sample stages drew (``samples/base/eval.csv``, ``samples/lora/eval.csv``:
the same subjects and seeds for the base model and at every LoRA scale) and the real paintings'
features (``data/reference``, the reference stage), checked to be those of the current validation
split of ``data/filtered`` (its table only; the images themselves are not read). Writes ``metrics/eval.json``, the per-image scores
``metrics/eval_images.csv``, the data plot ``plots/eval_vs_scale.csv`` and the pictures
``plots/eval_vs_scale.png`` and ``plots/eval_delta.png``.

Metrics of each generated set (the base model, and the LoRA at each scale):

* ``clip_score`` (per image, then averaged): ``100 * max(cos(image, subject), 0)`` with open_clip
  ``evaluate.clip_model``, against the **subject alone** ("a harbor at sunset": no trigger, no style
  words), so it measures whether the picture still shows what was asked, not the style;
* ``style_score`` (per image, then averaged): zero-shot probability of "Impressionism" among the 27
  WikiArt styles (``"an <style> painting"``) with the same CLIP; ``real.style_score`` is the same
  for the validation paintings, a reference;
* ``kid``: KID over the full sets against the validation paintings (:func:`impressionist.stats.kid`);
* ``cmmd``: CMMD (Jayasumana et al. 2024) on ``evaluate.cmmd_clip_model`` embeddings;
* ``fid``: torchmetrics' FrechetInceptionDistance, for familiarity only. FID is biased upwards at
  small n (it wants thousands of images), has no CI here and is never judged better or worse.

Uncertainty (:mod:`impressionist.stats`): means get a bootstrap 95% CI over subjects (all seeds of a
subject move together); KID and CMMD get one by resampling subjects and paintings; ``delta`` (LoRA
at the top scale minus base) is **paired**: the same resampled subjects and seeds on both sides.
``evaluate.bootstrap_resamples`` replicates, seeded by ``evaluate.seed``.

``eval.json`` holds flat, stable keys: per metric ``<m>``, ``<m>_ci_low``, ``<m>_ci_high``, ``<m>_n``
(images), in sections ``base``, ``lora`` (the largest scale, plus ``lora_scale``), ``lora_scale_<s>``
(each other scale), ``delta``; ``fid`` / ``fid_n`` in each generated set's section; ``n_real`` and
``real`` (style score of the paintings); ``bootstrap_redrawn``, how many KID/CMMD bootstrap
replicates were drawn again because one side held a single image (:mod:`impressionist.stats`). ``dvc metrics diff`` and ``dvc exp show`` read them directly.

Those intervals cover images and subjects: they are about *these* weights (each section's
``_covers``). With ``replicates.count`` = R >= 2 (``samples/replicates/<k>``, the other training
seeds' evaluation sets) the sections ``recipe`` (the top scale over the R LoRAs) and ``recipe_delta``
(recipe - base) also cover training seeds (:mod:`impressionist.replicates`: a t interval on replicate
and subject means); ``metrics/eval_replicates.csv`` holds every replicate's per-image LoRA scores and
``replicates.count`` is R.

With ``builtin:*`` feature networks (the demo) everything is random: the numbers only show the
pipeline works.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from . import data_parallel
from .errors import UserError, atomic_write_text, stage_main
from .image_features import EvaluateParams, Extractors, batch_count, load_reference, uses_random_nets
from .layout import (EVAL_IMAGES, EVAL_METRICS, EVAL_REPLICATES, EVAL_SET_TABLE, FILTERED_DIR, PLOTS_DIR,
                     REFERENCE_DIR, REPLICATES_MANIFEST, SAMPLES_DIR)
from .params import DEFAULT_PARAMS, load_params
from .params.evaluation import CONFIDENCE, FID_RELIABLE, PER_IMAGE
from .replicates import COVERS_WEIGHTS, REPLICATE_COLUMNS, recipe_sections
from .stats import (CMMD, KID, MIN_REAL, Estimate, KernelSets, Resampling, mean_estimate, paired_difference,
                    replicate_difference, set_distance_estimates)
from .tables import read_table, validation_split

SET_LEVEL = ("kid", "cmmd")
METRICS = PER_IMAGE + SET_LEVEL  # every one with a CI; FID comes apart
DISTANCES = {"kid": KID, "cmmd": CMMD}
EVAL_COLUMNS = ("file", "subject", "prompt_id", "seed", "lora_scale", "eval_set")
IMAGE_COLUMNS = ["lora_scale", "prompt_id", "seed", "subject", "clip_score", "style_score", "eval_set"]
MIN_IMAGES = 2  # per generated set: KID's unbiased MMD divides by n(n-1), FID needs a covariance
SAMPLE_HINT = "run the sample stages first (`dvc repro sample_base sample`)"
PLOT_DATA, SCALE_PLOT, DELTA_PLOT = "eval_vs_scale.csv", "eval_vs_scale.png", "eval_delta.png"  # in plots/


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def read_eval_table(folder: Path | str) -> pd.DataFrame:
    """``eval.csv`` of a samples folder, checked, with an absolute ``path`` column added."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} not found; {SAMPLE_HINT}")
    csv = folder / EVAL_SET_TABLE
    table = read_table(csv, EVAL_COLUMNS, "sample_base" if folder.name == "base" else "sample")
    scales = pd.to_numeric(table["lora_scale"], errors="coerce")
    if scales.isna().any():
        raise UserError(f"{csv}: column lora_scale holds non-numbers; re-run the sample stage")
    table = table.assign(lora_scale=scales.astype(float).round(6), prompt_id=table["prompt_id"].astype(str),
                         subject=table["subject"].fillna("").astype(str), eval_set=table["eval_set"].astype(str),
                         seed=table["seed"].astype(int))
    table["path"] = [folder / str(f) for f in table["file"]]
    absent = [str(f) for f, p in zip(table["file"], table["path"]) if not p.is_file()]
    if absent:
        raise UserError(f"{csv} lists {len(absent)} file(s) missing from {folder} (first: {absent[0]}); "
                        f"re-run the sample stage")
    return table


def evaluation_sets(samples_dir: Path | str) -> dict[float, pd.DataFrame]:
    """``{lora_scale: table}`` (0.0 = base), every table in the base table's (subject, seed) order.

    Refuses sets that cannot be paired: another evaluation set (fingerprint) or other (subject, seed)
    pairs in the LoRA folder than in the base folder, or fewer than two images.
    """
    samples_dir = Path(samples_dir)
    base = read_eval_table(samples_dir / "base")
    lora = read_eval_table(samples_dir / "lora")
    if set(base["eval_set"]) != set(lora["eval_set"]) or base["eval_set"].nunique() != 1:
        raise UserError(f"{samples_dir}/base and {samples_dir}/lora hold different evaluation sets "
                        f"(sample.eval_set changed in between); {SAMPLE_HINT}")
    order = list(zip(base["prompt_id"], base["seed"]))
    sets = {0.0: base}
    for scale, group in sorted(lora.groupby("lora_scale"), key=lambda kv: kv[0]):
        keyed = group.set_index(["prompt_id", "seed"])
        if len(group) != len(order) or set(keyed.index) != set(order):
            raise UserError(f"{samples_dir}/lora at lora_scale {scale:g} has other subjects or seeds than "
                            f"{samples_dir}/base; {SAMPLE_HINT}")
        sets[float(scale)] = keyed.loc[order].reset_index()
    if len(sets) < 2:
        raise UserError(f"{samples_dir}/lora has no LoRA evaluation images; {SAMPLE_HINT}")
    if len(base) < MIN_IMAGES:
        raise UserError(f"the evaluation set has {len(base)} image(s) per model; KID and CMMD need at least "
                        f"{MIN_IMAGES} — raise sample.eval_set.num_subjects or add sample.eval_set.seeds")
    return sets


def replicate_sets(samples_dir: Path | str, base: pd.DataFrame) -> dict[int, dict[float, pd.DataFrame]]:
    """``{k: {lora_scale: table}}`` of the training replicates k >= 1 (``samples/replicates/<k>``), each
    table in the base table's (subject, seed) order; {} when there are none (R = 1, or no folder)."""
    folder = Path(samples_dir) / "replicates"
    manifest = folder / REPLICATES_MANIFEST
    if not manifest.is_file():
        return {}
    count = int(json.loads(manifest.read_text())["count"])
    order = list(zip(base["prompt_id"], base["seed"]))
    found: dict[int, dict[float, pd.DataFrame]] = {}
    for k in range(1, count):
        table = read_eval_table(folder / str(k))
        if set(table["eval_set"]) != set(base["eval_set"]):
            raise UserError(f"{folder}/{k} holds another evaluation set than {samples_dir}/base; run "
                            "`dvc repro sample_replicates`")
        found[k] = {}
        for scale, group in sorted(table.groupby("lora_scale"), key=lambda kv: kv[0]):
            keyed = group.set_index(["prompt_id", "seed"])
            if len(group) != len(order) or set(keyed.index) != set(order):
                raise UserError(f"{folder}/{k} at lora_scale {scale:g} has other subjects or seeds than "
                                f"{samples_dir}/base; run `dvc repro sample_replicates`")
            found[k][float(scale)] = keyed.loc[order].reset_index()
    return found


def scale_key(scale: float) -> str:
    """Stable metrics key of a LoRA scale: ``lora_scale_0.5``, ``lora_scale_1.0``."""
    return f"lora_scale_{round(float(scale), 4)!r}"


# --------------------------------------------------------------------------------------------
# FID (torchmetrics, on features already extracted)
# --------------------------------------------------------------------------------------------


class _Extracted(torch.nn.Module):
    """The "feature network" torchmetrics is given: the features were already extracted."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # torchmetrics sizes its state from it (no dummy probe)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics' FrechetInceptionDistance of two feature sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    # rank 0 holds every feature: no gathering across the processes of a data-parallel run
    metric = FrechetInceptionDistance(feature=_Extracted(int(real.shape[1])), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def score(real: Mapping[str, torch.Tensor], fakes: Mapping[float, Mapping[str, torch.Tensor]],
          per_image: Mapping[float, Mapping[str, np.ndarray]], clusters: Sequence[object], *,
          resamples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE,
          resampling: Resampling | None = None) -> tuple[dict[float, dict[str, Estimate | float]], dict[str, Estimate]]:
    """Every metric of every generated set, and the paired deltas of the top scale against the base.

    ``real``/``fakes[scale]``: feature matrices ``fid`` and ``cmmd``; ``per_image[scale]``: the
    per-image scores; ``clusters``: each generated image's subject, in the same order for every set.
    ``resampling``: the KID/CMMD bootstrap counts (default: drawn here from ``resamples``, ``seed``).
    Returns ``({scale: {metric: Estimate, "fid": float}}, {metric: delta Estimate})``.
    """
    scales = sorted(fakes)
    top = scales[-1]
    kwargs = dict(resamples=resamples, seed=seed, confidence=confidence)
    resampling = resampling or Resampling.draw(int(real["fid"].shape[0]), clusters, resamples, seed)
    results: dict[float, dict[str, Any]] = {s: {} for s in scales}
    deltas: dict[str, Estimate] = {}
    for name in PER_IMAGE:
        for s in scales:
            results[s][name] = mean_estimate(per_image[s][name], clusters, **kwargs)
        deltas[name] = paired_difference(per_image[0.0][name], per_image[top][name], clusters, **kwargs)
    for name in SET_LEVEL:
        feature = "fid" if name == "kid" else "cmmd"  # KID reads the FID network's features
        estimates, replicates = set_distance_estimates(
            DISTANCES[name], real[feature], [fakes[s][feature] for s in scales], resampling, confidence)
        for s, estimate in zip(scales, estimates):
            results[s][name] = estimate
        base_index = scales.index(0.0)
        deltas[name] = replicate_difference(estimates[-1].value - estimates[base_index].value,
                                            replicates[base_index], replicates[-1], estimates[-1].n, confidence)
    for s in scales:
        results[s]["fid"] = fid(real["fid"], fakes[s]["fid"])
    return results, deltas


def metrics_json(results: Mapping[float, Mapping[str, Any]], deltas: Mapping[str, Estimate],
                 real_style: Estimate, n_real: int, bootstrap_redrawn: int = 0) -> dict[str, Any]:
    """eval.json: flat numeric keys per section (see the module docstring)."""

    def section_of(values: Mapping[str, Any]) -> dict[str, float | int]:
        out: dict[str, float | int] = {}
        for name in METRICS:
            out.update(values[name].as_keys(name))
        out["fid"], out["fid_n"] = float(values["fid"]), int(values["clip_score"].n)
        return out

    scales = sorted(results)
    top = scales[-1]
    metrics: dict[str, Any] = {"n_real": n_real, "bootstrap_redrawn": int(bootstrap_redrawn),
                               "real": real_style.as_keys("style_score"),
                               "base": section_of(results[0.0])}
    for s in scales[1:-1]:
        metrics[scale_key(s)] = section_of(results[s])
    metrics["lora"] = {**section_of(results[top]), "lora_scale": float(top)}
    metrics["delta"] = {}
    for name in METRICS:
        metrics["delta"].update(deltas[name].as_keys(name))
    for section in ("base", "lora", "delta", *(scale_key(s) for s in scales[1:-1])):
        metrics[section]["_covers"] = COVERS_WEIGHTS  # what its intervals cover: not training noise
    bad = [f"{k}.{m}" for k, v in metrics.items() if isinstance(v, dict) for m, x in v.items()
           if isinstance(x, float) and not math.isfinite(x)]
    if bad:
        raise UserError(f"evaluation produced non-finite values ({', '.join(bad[:4])}); too few or identical images?")
    return metrics


def per_image_table(sets: Mapping[float, pd.DataFrame], per_image: Mapping[float, Mapping[str, np.ndarray]]
                    ) -> pd.DataFrame:
    """The per-image scores, keyed by (lora_scale, prompt_id, seed): what pairs two commits."""
    frames = []
    for scale, table in sorted(sets.items()):
        frame = table[["prompt_id", "seed", "subject", "eval_set"]].copy()
        frame.insert(0, "lora_scale", float(scale))
        for name in PER_IMAGE:
            frame[name] = np.round(per_image[scale][name], 6)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)[IMAGE_COLUMNS]


def plot_table(results: Mapping[float, Mapping[str, Any]]) -> pd.DataFrame:
    """Long table for the DVC data plot: metric, lora_scale, value, ci_low, ci_high, n."""
    rows = [{"metric": name, "lora_scale": float(scale), "value": est.value, "ci_low": est.ci_low,
             "ci_high": est.ci_high, "n": est.n}
            for name in METRICS for scale, values in sorted(results.items()) for est in [values[name]]]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def run(params: Mapping[str, Any], samples_dir: Path | str = SAMPLES_DIR,
        reference_dir: Path | str = REFERENCE_DIR, metrics_path: Path | str = EVAL_METRICS,
        images_path: Path | str = EVAL_IMAGES, plots_dir: Path | str = PLOTS_DIR,
        filtered_dir: Path | str = FILTERED_DIR) -> dict[str, Any] | None:
    """Score the evaluation set; write the metrics, the per-image table and the plots; return the
    metrics (``None`` on the ranks other than 0 of a data-parallel run: they extract features only)."""
    from .plotting import plot_deltas, plot_metrics_vs_scale

    # Everything that can be checked cheaply is checked before any model is loaded.
    cfg = EvaluateParams.check(params)
    sets = evaluation_sets(samples_dir)
    real, n_real = load_reference(reference_dir, cfg, list(validation_split(filtered_dir)["id"]))
    if n_real < MIN_REAL:
        raise UserError(f"{reference_dir} holds {n_real} validation painting(s); KID and CMMD intervals need at "
                        f"least {MIN_REAL} — raise filter.val_fraction (or download.max_images) and re-run")

    extractors = Extractors.load(cfg)
    clusters = list(sets[0.0]["prompt_id"])
    fakes, per_image = {}, {}
    for scale, table in sets.items():
        features = extractors.features(list(table["path"]))
        if features is None:  # another rank's share is extracted; rank 0 scores
            continue
        fakes[scale] = features
        per_image[scale] = {
            "clip_score": extractors.clip.clip_scores(features["clip"], list(table["subject"])).numpy(),
            "style_score": extractors.clip.style_scores(features["clip"]).numpy(),
        }
    # Every rank takes part in each extraction (the shares are gathered), so the replicates' features
    # are extracted here too, before the ranks other than 0 leave.
    rep_sets = replicate_sets(samples_dir, sets[0.0])
    rep_features = {k: {scale: extractors.features(list(table["path"])) for scale, table in tables.items()}
                    for k, tables in rep_sets.items()}
    if not data_parallel.is_main():
        return None
    resamples, seed, confidence = cfg.bootstrap_resamples, cfg.seed, cfg.confidence
    resampling = Resampling.draw(n_real, clusters, resamples, seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        results, deltas = score(real, fakes, per_image, clusters, resamples=resamples, seed=seed,
                                confidence=confidence, resampling=resampling)
    real_style = mean_estimate(extractors.clip.style_scores(real["clip"]).numpy(), resamples=resamples,
                               seed=seed, confidence=confidence)
    metrics = metrics_json(results, deltas, real_style, n_real, resampling.redrawn)
    replicates = replicate_scores(sets, per_image, rep_sets, rep_features, real, extractors, results, deltas,
                                  confidence)
    metrics.update(replicates.pop("sections"))

    plots_dir = Path(plots_dir)
    note = " (random demo feature nets: numbers not meaningful)" if uses_random_nets(cfg) else ""
    n = results[0.0]["clip_score"].n
    level = f"{confidence:.0%} CI"
    plot_metrics_vs_scale(sorted(results), {name: [results[s][name] for s in sorted(results)] for name in METRICS},
                          plots_dir / SCALE_PLOT,
                          title=f"metrics vs LoRA scale, {level}, n={n} images per point, {n_real} paintings" + note)
    plot_deltas(deltas, plots_dir / DELTA_PLOT,
                title=f"LoRA ×{max(results):g} − base, paired, {level} (n={n})" + note)
    atomic_write_text(plots_dir / PLOT_DATA, plot_table(results).to_csv(index=False))
    atomic_write_text(images_path, per_image_table(sets, per_image).to_csv(index=False))
    atomic_write_text(Path(metrics_path).parent / EVAL_REPLICATES.name, replicates["table"].to_csv(index=False))
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    return metrics


def replicate_scores(sets, per_image, rep_sets, rep_features, real, extractors, results, deltas,
                     confidence: float) -> dict[str, Any]:
    """The replicates' per-image table (``table``: every replicate's LoRA images, 0 = models/lora) and
    eval.json's ``replicates`` section, plus ``recipe`` / ``recipe_delta`` when R >= 2 (``sections``)."""
    scales = sorted(sets)
    top = scales[-1]

    def rows(k: int, tables, scores) -> pd.DataFrame:
        frames = [per_image_table({s: tables[s]}, {s: scores[s]}).assign(replicate=k) for s in scales[1:]]
        return pd.concat(frames, ignore_index=True)

    frames = [rows(0, sets, per_image)]
    set_values = {name: [results[top][name].value] for name in SET_LEVEL}
    for k, tables in rep_sets.items():
        scores, fakes = {}, rep_features[k]
        for scale, table in tables.items():
            features = fakes[scale]
            scores[scale] = {"clip_score": extractors.clip.clip_scores(features["clip"], list(table["subject"])).numpy(),
                             "style_score": extractors.clip.style_scores(features["clip"]).numpy()}
        frames.append(rows(k, tables, scores))
        for name in SET_LEVEL:
            feature = "fid" if name == "kid" else "cmmd"
            set_values[name].append(DISTANCES[name].value(KernelSets.of(DISTANCES[name].kernel, real[feature],
                                                                        fakes[top][feature])))
    table = pd.concat(frames, ignore_index=True)[REPLICATE_COLUMNS]
    sections: dict[str, Any] = {"replicates": {"count": 1 + len(rep_sets)}}
    if rep_sets:
        images = table[table["lora_scale"] == float(top)]
        base = per_image_table({0.0: sets[0.0]}, {0.0: per_image[0.0]})
        set_deltas = {name: [v - results[0.0][name].value for v in set_values[name]] for name in SET_LEVEL}
        found = recipe_sections(images, base, set_values, set_deltas, {n: results[top][n] for n in SET_LEVEL},
                                {n: deltas[n] for n in SET_LEVEL}, confidence)
        found["recipe"]["lora_scale"] = float(top)
        sections.update(found)
    return {"table": table, "sections": sections}


def summary_lines(metrics: Mapping[str, Any], confidence: float = CONFIDENCE) -> list[str]:
    """The console summary: each metric base → LoRA with the paired delta, its CI, n and a verdict."""
    lora, base, delta = metrics["lora"], metrics["base"], metrics["delta"]
    lines = [f"evaluate: {base['clip_score_n']} images per model, {metrics['n_real']} validation paintings; "
             f"LoRA ×{lora['lora_scale']:g} vs base, paired {confidence:.0%} CIs:"]
    for name in METRICS:
        est = Estimate(delta[name], delta[f"{name}_ci_low"], delta[f"{name}_ci_high"], delta[f"{name}_n"])
        word = "significant" if est.excludes_zero() else "no significant change"
        lines.append(f"  {name}: {base[name]:.4g} -> {lora[name]:.4g}, delta {est.show()} — {word}")
    flag = f" (biased: n={base['fid_n']} < {FID_RELIABLE}; no CI, not judged)" if base["fid_n"] < FID_RELIABLE else ""
    lines.append(f"  fid: {base['fid']:.4g} -> {lora['fid']:.4g}{flag}")
    recipe = metrics.get("recipe_delta")
    if recipe is None:
        lines.append("  (these weights only: one training seed, training noise unmeasured; replicates.count >= 2 "
                     "measures it)")
        return lines
    lines.append(f"recipe over {recipe['replicates']} training seeds − base ({confidence:.0%} t intervals, "
                 f"covering {recipe['_covers']}):")
    for name in METRICS:
        est = Estimate(recipe[name], recipe[f"{name}_ci_low"], recipe[f"{name}_ci_high"], recipe[f"{name}_n"])
        word = "significant" if est.excludes_zero() else "no significant change"
        lines.append(f"  {name}: delta {est.show()} — {word}")
    return lines


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m impressionist evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (reads its `evaluate` section)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = EvaluateParams.check(params)  # the cheap checks, before any process is launched
    sets = evaluation_sets(SAMPLES_DIR)
    load_reference(REFERENCE_DIR, cfg, list(validation_split(FILTERED_DIR)["id"]))
    if data_parallel.launch("evaluate", "impressionist.evaluate", sys.argv[1:] if argv is None else argv,
                            params, torch.cuda.is_available(), [batch_count(len(t)) for t in sets.values()]):
        return
    metrics = run(params)
    if metrics is None:
        return
    print("\n".join(summary_lines(metrics, cfg.confidence)))
    if metrics["base"]["fid_n"] < FID_RELIABLE:
        print(f"note: FID from {metrics['base']['fid_n']} images per set is biased upwards (it wants "
              f"thousands); read KID and CMMD, which are unbiased / stable at this size, with their CIs",
              file=sys.stderr)


if __name__ == "__main__":
    main()
