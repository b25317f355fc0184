"""Training-seed replicates: R LoRAs of one recipe, and intervals that include training noise.

A pull request asks whether a *recipe* got better, but one training run is one draw of the trainer:
two seeds of the same recipe differ. ``replicates.count`` = R trains R LoRAs of the recipe, the
first from ``train.seed`` (``models/lora``, the stage ``train``) and the others from seeds derived
from it (:mod:`impressionist.replicate_seeds`; ``models/replicates/<k>``, the stage
``train_replicates``), and samples each one's evaluation set (``samples/replicates/<k>``). R = 1
trains and samples nothing more. This module holds the statistics (evaluate and the PR report).

The statistics (numpy and scipy only: the PR report imports them without torch). Per-image scores
are first averaged over an image's eval seeds into cells ``Y[r, i]`` (replicate r, subject i); the
subjects are the same for every replicate. For the recipe mean ``Ȳ`` (and for a change between two
recipes on the same subjects, :func:`recipe_change`) the variance is the sum of

* the variance of the subject means over subjects, ``var_i(Ȳ_i·) / n`` (what a new set of
  subjects would change), and
* the variance of the replicate means over replicates, ``var_r(Ȳ_·r) / R`` (what new training
  seeds would change),

with Satterthwaite's degrees of freedom and a Student t interval. Under the crossed random-effects
model ``Y = μ + a_i + t_r + e`` the expectation of this sum is the variance of ``Ȳ`` plus
``σ²_e / (nR)`` (the residual counted in both terms): slightly conservative, never negative.

Why a t interval on replicate means rather than a hierarchical bootstrap (replicates, then
subjects): with the R = 2–5 replicates anyone can afford, a bootstrap over R values has R^R/R!
distinct resamples and its percentile interval is too narrow by a factor near sqrt((R-1)/R) before
its discreteness. Simulated at R = 3, n = 8 subjects × 2 seeds, with training-seed, subject and
image effects of equal size (1000 runs; ``tests/test_replicates.py`` keeps the t interval's half):
the hierarchical bootstrap's 95% interval covered 86%, the t interval 94.8%.

A set-level distance (KID, CMMD) is one number per replicate: its recipe value is the mean of the
replicates' values, its variance the main LoRA's bootstrap variance (images, subjects, paintings)
plus the replicates' variance over R (:func:`set_level_recipe`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .params.evaluation import CONFIDENCE, PER_IMAGE
from .stats import Estimate

# What each interval of metrics/eval.json covers (its ``_covers`` key).
COVERS_WEIGHTS = "images, subjects"
COVERS_RECIPE = "images, subjects, training seeds"
RECIPE, RECIPE_DELTA = "recipe", "recipe_delta"  # eval.json sections with R >= 2
MIN_REPLICATES = 2  # a between-replicate variance needs two


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipeEstimate:
    """A recipe-level value with its standard error and Satterthwaite degrees of freedom."""

    value: float
    se: float
    df: float
    n: int  # images (or cells) behind it

    def estimate(self, confidence: float = CONFIDENCE) -> Estimate:
        """The Student t interval at ``confidence``."""
        from scipy.stats import t

        if not (math.isfinite(self.value) and math.isfinite(self.se)):  # not judged, never a zero width
            return Estimate(self.value, math.nan, math.nan, self.n)
        half = float(t.ppf(0.5 + confidence / 2.0, self.df)) * self.se if self.se > 0 else 0.0
        return Estimate(self.value, self.value - half, self.value + half, self.n)

    def as_keys(self, name: str, confidence: float = CONFIDENCE) -> dict[str, float | int]:
        """``name``, its interval and n (as every eval.json metric), plus ``name_se`` and ``name_df``."""
        return {**self.estimate(confidence).as_keys(name), f"{name}_se": self.se, f"{name}_df": self.df}

    @classmethod
    def from_keys(cls, values: Mapping[str, Any], name: str) -> "RecipeEstimate | None":
        parts = [values.get(f"{name}{suffix}") for suffix in ("", "_se", "_df", "_n")]
        if any(p is None for p in parts):
            return None
        return cls(float(parts[0]), float(parts[1]), float(parts[2]), int(parts[3]))


def _satterthwaite(terms: Sequence[tuple[float, int]]) -> tuple[float, float]:
    """(total variance, degrees of freedom) of a sum of independent variance estimates (v, df)."""
    total = float(sum(v for v, _ in terms))
    denominator = sum(v * v / df for v, df in terms if df > 0 and v > 0)
    df = total * total / denominator if denominator > 0 else math.inf
    return total, df


def _check_cells(cells: np.ndarray, what: str) -> np.ndarray:
    y = np.asarray(cells, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] < MIN_REPLICATES or y.shape[1] < 2 or not np.isfinite(y).all():
        raise ValueError(f"{what}: a finite (replicates >= {MIN_REPLICATES}, subjects >= 2) matrix is needed, "
                         f"got shape {y.shape}")
    return y


def recipe_mean(cells: np.ndarray, n_images: int | None = None) -> RecipeEstimate:
    """The recipe mean of ``cells[r, i]`` (replicate r, subject i) with subject and replicate variance."""
    y = _check_cells(cells, "recipe_mean")
    replicates, subjects = y.shape
    v_subjects = float(np.var(y.mean(axis=0), ddof=1)) / subjects
    v_replicates = float(np.var(y.mean(axis=1), ddof=1)) / replicates
    total, df = _satterthwaite([(v_subjects, subjects - 1), (v_replicates, replicates - 1)])
    return RecipeEstimate(float(y.mean()), math.sqrt(total), df, n_images or y.size)


def recipe_change(old_cells: np.ndarray, new_cells: np.ndarray, n_images: int | None = None) -> RecipeEstimate:
    """New recipe minus old on the same subjects (columns in the same order): paired by subject,
    independent training runs on the two sides."""
    old, new = _check_cells(old_cells, "recipe_change (old)"), _check_cells(new_cells, "recipe_change (new)")
    if old.shape[1] != new.shape[1]:
        raise ValueError("recipe_change: the two recipes must be scored on the same subjects")
    subjects = old.shape[1]
    per_subject = new.mean(axis=0) - old.mean(axis=0)
    terms = [(float(np.var(per_subject, ddof=1)) / subjects, subjects - 1)]
    for side in (old, new):
        terms.append((float(np.var(side.mean(axis=1), ddof=1)) / side.shape[0], side.shape[0] - 1))
    total, df = _satterthwaite(terms)
    return RecipeEstimate(float(per_subject.mean()), math.sqrt(total), df,
                          n_images or min(old.size, new.size))


def set_level_recipe(values: Sequence[float], shared: Estimate, stored: float = CONFIDENCE) -> RecipeEstimate:
    """A set-level distance over R replicates: the mean of their values; variance = the main LoRA's
    bootstrap variance (``shared``, its interval at level ``stored`` read as ±z·se) + var(values)/R."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < MIN_REPLICATES or not np.isfinite(x).all():
        raise ValueError(f"set_level_recipe needs >= {MIN_REPLICATES} finite values")
    from scipy.stats import norm

    se_shared = (shared.ci_high - shared.ci_low) / (2.0 * float(norm.ppf(0.5 + stored / 2.0)))
    total, df = _satterthwaite([(se_shared ** 2, 0), (float(np.var(x, ddof=1)) / len(x), len(x) - 1)])
    return RecipeEstimate(float(x.mean()), math.sqrt(total), df, shared.n)


def set_level_change(old: RecipeEstimate, new: RecipeEstimate) -> RecipeEstimate:
    """``new - old`` of two recipe estimates from independent runs (errors in quadrature, Welch df)."""
    terms = [(old.se ** 2, old.df), (new.se ** 2, new.df)]
    total = old.se ** 2 + new.se ** 2
    denominator = sum(v * v / df for v, df in terms if math.isfinite(df) and df > 0 and v > 0)
    df = total * total / denominator if denominator > 0 else math.inf
    return RecipeEstimate(new.value - old.value, math.sqrt(total), df, min(old.n, new.n))


def cells(table, value: str, subjects: Sequence[str] | None = None) -> np.ndarray:
    """``(replicates, subjects)`` means of column ``value`` over each (replicate, prompt_id) cell of a
    long table (columns ``replicate``, ``prompt_id``, ``value``), subjects in ``subjects`` order."""
    # numpy's mean keeps a NaN score visible (pandas' would skip it): the cell check then refuses it
    wide = table.groupby(["replicate", "prompt_id"])[value].agg(lambda s: s.to_numpy().mean()).unstack("prompt_id")
    if subjects is not None:
        wide = wide.reindex(columns=list(subjects))
    return wide.sort_index().to_numpy(dtype=np.float64)


# --------------------------------------------------------------------------------------------
# eval.json's recipe sections and the PR report's recipe comparison
# --------------------------------------------------------------------------------------------

SET_LEVEL = ("kid", "cmmd")
# metrics/eval_replicates.csv: the LoRA images of every replicate (0 = models/lora), every scale.
REPLICATE_COLUMNS = ["replicate", "lora_scale", "prompt_id", "seed", "subject", "clip_score", "style_score",
                     "eval_set"]


def delta_table(images, base):
    """``images`` (one LoRA scale, a ``replicate`` column) with each per-image score minus the base
    model's at the same (prompt_id, seed)."""
    keyed = base[["prompt_id", "seed", *PER_IMAGE]].drop_duplicates(["prompt_id", "seed"])
    merged = images.merge(keyed, on=["prompt_id", "seed"], how="left", suffixes=("", "_base"))
    if merged[[f"{m}_base" for m in PER_IMAGE]].isna().any().any():
        raise ValueError("delta_table: an image has no base-model image at its (prompt_id, seed)")
    out = merged.copy()
    for name in PER_IMAGE:
        out[name] = merged[name] - merged[f"{name}_base"]
    return out[images.columns]


def recipe_sections(images, base, set_values: Mapping[str, Sequence[float]],
                    set_delta_values: Mapping[str, Sequence[float]], shared: Mapping[str, Estimate],
                    shared_delta: Mapping[str, Estimate], confidence: float = CONFIDENCE) -> dict[str, dict]:
    """eval.json's ``recipe`` (the LoRA at the top scale over R replicates) and ``recipe_delta``
    (recipe − base) sections, each metric with its interval, ``_se``, ``_df``, plus ``replicates`` (R)
    and ``_covers``.

    ``images``: the top scale's per-image scores of every replicate (``replicate``, ``prompt_id``,
    ``seed``, scores); ``base``: the base model's; ``set_values[m]`` / ``set_delta_values[m]``: each
    replicate's KID/CMMD and its change from the base; ``shared`` / ``shared_delta``: models/lora's
    bootstrap estimates of them (images, subjects, paintings).
    """
    subjects = sorted(set(images["prompt_id"]))
    count = images["replicate"].nunique()
    n = len(images) // count
    out: dict[str, dict] = {RECIPE: {}, RECIPE_DELTA: {}}
    for section, table in ((RECIPE, images), (RECIPE_DELTA, delta_table(images, base))):
        for name in PER_IMAGE:
            out[section].update(recipe_mean(cells(table, name, subjects), n).as_keys(name, confidence))
    for name in SET_LEVEL:
        out[RECIPE].update(set_level_recipe(set_values[name], shared[name], confidence).as_keys(name, confidence))
        out[RECIPE_DELTA].update(set_level_recipe(set_delta_values[name], shared_delta[name],
                                                  confidence).as_keys(name, confidence))
    for section in out.values():
        section.update({"replicates": int(count), "_covers": COVERS_RECIPE})
    return out


def read_replicate_table(text: str | None):
    """``metrics/eval_replicates.csv`` text as a DataFrame, or None when a revision has none."""
    if not text:
        return None
    import io

    import pandas as pd

    try:
        table = pd.read_csv(io.StringIO(text))
    except Exception:  # a foreign or truncated file: the report falls back to the stored intervals
        return None
    return table if set(REPLICATE_COLUMNS) <= set(table.columns) and not table.empty else None


class RecipePairing:
    """Two recipes' changes: per-image scores paired by subject across the two revisions' replicate
    tables (:func:`recipe_change`), set-level distances (and per-image scores that cannot be paired)
    from each revision's stored ``_se`` / ``_df`` (:func:`set_level_change`)."""

    def __init__(self, old_images, new_images, old_base, new_base, old_metrics: Mapping[str, Any],
                 new_metrics: Mapping[str, Any]) -> None:
        self.old, self.new = old_images, new_images
        self.old_base, self.new_base = old_base, new_base
        self.old_metrics, self.new_metrics = old_metrics, new_metrics
        self.reason = ""
        if any(t is None for t in (old_images, new_images, old_base, new_base)):
            self.reason = "no per-image replicate scores in one revision"
        elif set(old_images["eval_set"].astype(str)) != set(new_images["eval_set"].astype(str)):
            self.reason = "the evaluation sets differ (sample.eval_set)"

    def _table(self, images, base, metrics: Mapping[str, Any], section: str):
        scale = metrics.get(f"{RECIPE}.lora_scale", metrics.get("lora.lora_scale"))
        rows = images if scale is None else images[images["lora_scale"].round(6) == round(float(scale), 6)]
        rows = rows.assign(prompt_id=rows["prompt_id"].astype(str))
        if section == RECIPE_DELTA:
            base = base[base["lora_scale"].round(6) == 0.0].assign(prompt_id=base["prompt_id"].astype(str))
            rows = delta_table(rows, base)
        return rows

    def change(self, section: str, name: str, confidence: float) -> tuple[Estimate | None, str]:
        if name in PER_IMAGE and not self.reason:
            try:
                old = self._table(self.old, self.old_base, self.old_metrics, section)
                new = self._table(self.new, self.new_base, self.new_metrics, section)
            except ValueError as err:  # an image without its base image: no verdict, not a crash
                return None, f"no recipe interval: {err}"
            subjects = sorted(set(old["prompt_id"]))
            if subjects == sorted(set(new["prompt_id"])) and old["replicate"].nunique() >= MIN_REPLICATES \
                    and new["replicate"].nunique() >= MIN_REPLICATES:
                try:
                    found = recipe_change(cells(old, name, subjects), cells(new, name, subjects))
                except ValueError as err:  # a missing or non-finite cell: no verdict, not a crash
                    return None, f"no recipe interval: {err}"
                return found.estimate(confidence), (
                    f"recipes: {old['replicate'].nunique()} → {new['replicate'].nunique()} training replicates, "
                    f"paired over {len(subjects)} subjects, t interval (df {found.df:.1f})")
        old = RecipeEstimate.from_keys({k.rpartition('.')[2]: v for k, v in self.old_metrics.items()
                                        if k.startswith(section + ".")}, name)
        new = RecipeEstimate.from_keys({k.rpartition('.')[2]: v for k, v in self.new_metrics.items()
                                        if k.startswith(section + ".")}, name)
        if old is None or new is None:
            return None, "no recipe interval (_se, _df) in one revision"
        found = set_level_change(old, new)
        why = "" if name in SET_LEVEL else f"; not paired: {self.reason or 'the subjects differ'}"
        return found.estimate(confidence), (f"recipes: independent runs, errors combined, t interval "
                                            f"(df {found.df:.1f}){why}")
