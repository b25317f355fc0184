"""Uncertainty for the evaluation: bootstrap confidence intervals, and kernel two-sample distances.

Every number the evaluation publishes is an :class:`Estimate`: a value, a 95% confidence interval
and the number of images it rests on. Two kinds of statistic are resampled:

* per-image scores (CLIP score, style score) and paired per-image differences (LoRA - base at
  the same prompt and seed): the mean, with a **cluster bootstrap** over prompts. Images of one
  prompt at several seeds are not independent (they share a subject), so the prompts, not the
  images, are drawn with replacement; with one seed per prompt this is the ordinary bootstrap.
* set-level distances to the real paintings (KID, CMMD): kernel MMD² statistics, resampled by
  **weighting** the precomputed kernel matrices with bootstrap counts (:func:`bootstrap_counts`),
  so each replicate costs a few matrix products instead of a feature pass. The generated images are
  resampled by prompt cluster, the real paintings one by one, independently.

  A replicate that draws a single item for every slot of one side (the same real painting n times)
  has no pair of two different items, so the unbiased within-set mean divides 0 by 0. Such a
  replicate is **redrawn** (:func:`nondegenerate_counts`), and :class:`Resampling` counts the
  redraws (``bootstrap_redrawn`` in ``metrics/eval.json``). A real set draws a degenerate replicate
  with chance ``n**(1 - n)``: 50% at n = 2, 1.6% at 4, 0.16% at 5. From :data:`MIN_REAL` = 5 on, the
  redrawn share stays below a tenth of each 2.5% tail of the interval, so conditioning on
  non-degenerate replicates cannot move the interval's ends by more than that; below it the
  evaluation refuses to run.

A paired comparison (base vs LoRA, or a pull request vs main on the same evaluation set) reuses the
same resampled indices on both sides, so what the two sides share (the subject, the starting noise,
the real set) cancels out of the difference.

The percentile interval is used throughout; :func:`percentile_ci` is the one place that turns
replicates into an interval. Everything is seeded: the same inputs give the same interval. A
non-finite interval is never read as "covers 0": :meth:`Estimate.excludes_zero` refuses it, and
the PR report calls such a metric "not judged".

Kernels, as their papers define them:

* KID (Bińkowski et al. 2018, as torchmetrics' ``KernelInceptionDistance``): the unbiased MMD² with
  the cubic polynomial kernel ``k(x, y) = (x·y / d + 1)³`` on Inception features. Here it is taken
  over the full sets (the minimum-variance unbiased estimator); the paper's subsets of m images
  existed to bound memory, and their spread is not the estimator's uncertainty.
* CMMD (Jayasumana et al. 2024, "Rethinking FID", google-research/cmmd ``distance.py``): MMD² with
  the Gaussian RBF kernel, σ = 10, times 1000, on L2-normalised CLIP image embeddings; like the
  reference it averages each kernel matrix over all its entries, diagonal included.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .params.evaluation import CONFIDENCE, RESAMPLES

if TYPE_CHECKING:  # torch is imported where kernels are computed: the PR report runs without it
    import torch

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
# The fewest real paintings an interval of KID / CMMD is computed from (see the module docstring:
# at 5 a bootstrap replicate is degenerate with chance 5**-4 = 0.16%, at 4 with 1.6%).
MIN_REAL = 5
# A weighted unbiased within-set mean needs two different items in the replicate.
MIN_DISTINCT = 2


@dataclass(frozen=True)
class Estimate:
    """A value with its confidence interval and the count it rests on."""

    value: float
    ci_low: float
    ci_high: float
    n: int

    def finite(self) -> bool:
        return all(math.isfinite(x) for x in (self.value, self.ci_low, self.ci_high))

    def excludes_zero(self) -> bool:
        """The interval lies wholly above or below 0; a non-finite one is an error, never "covers 0"."""
        if not self.finite():
            raise ValueError(f"non-finite estimate {self.value} [{self.ci_low}, {self.ci_high}]: not judged")
        return self.ci_low > 0.0 or self.ci_high < 0.0

    def as_keys(self, name: str) -> dict[str, float | int]:
        """Flat, stable metric keys: ``name``, ``name_ci_low``, ``name_ci_high``, ``name_n``."""
        return {name: self.value, f"{name}_ci_low": self.ci_low, f"{name}_ci_high": self.ci_high,
                f"{name}_n": self.n}

    def show(self, digits: int = 4) -> str:
        """``0.1234 [0.1000, 0.1500] (n=16)``, the form every console line and table uses."""
        return (f"{self.value:.{digits}g} [{self.ci_low:.{digits}g}, {self.ci_high:.{digits}g}] "
                f"(n={self.n})")


def percentile_ci(replicates: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile bootstrap interval of ``replicates``."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(replicates, dtype=np.float64), [tail, 1.0 - tail])
    return float(low), float(high)


def cluster_ids(keys: Sequence[object]) -> np.ndarray:
    """Integer cluster ids (0..k-1, in order of first appearance) for a sequence of cluster keys."""
    index: dict[object, int] = {}
    return np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64)


def bootstrap_counts(n_items: int, resamples: int, rng: np.random.Generator,
                     clusters: Sequence[object] | None = None) -> np.ndarray:
    """``(resamples, n_items)`` counts: how often each item is drawn in each bootstrap replicate.

    With ``clusters`` (a key per item), whole clusters are drawn with replacement and each item
    counts as often as its cluster was drawn; otherwise items are drawn one by one.
    """
    ids = cluster_ids(clusters) if clusters is not None else np.arange(n_items)
    if len(ids) != n_items:
        raise ValueError("one cluster key per item is needed")
    n_clusters = int(ids.max()) + 1 if n_items else 0
    drawn = rng.integers(0, n_clusters, size=(resamples, n_clusters))
    per_cluster = np.stack([np.bincount(row, minlength=n_clusters) for row in drawn])
    return per_cluster[:, ids].astype(np.float64)


def nondegenerate_counts(n_items: int, resamples: int, rng: np.random.Generator,
                         clusters: Sequence[object] | None = None, min_distinct: int = MIN_DISTINCT,
                         max_rounds: int = 1000) -> tuple[np.ndarray, int]:
    """:func:`bootstrap_counts` whose every replicate holds at least ``min_distinct`` different items,
    and how many replicates had to be redrawn for it (redrawn again until they do, from ``rng``)."""
    if n_items < min_distinct:
        raise ValueError(f"{n_items} item(s): a replicate needs {min_distinct} different ones")
    counts = bootstrap_counts(n_items, resamples, rng, clusters)
    redrawn = 0
    for _ in range(max_rounds):
        bad = np.flatnonzero((counts > 0).sum(axis=1) < min_distinct)
        if not len(bad):
            return counts, redrawn
        redrawn += len(bad)
        counts[bad] = bootstrap_counts(n_items, len(bad), rng, clusters)
    raise ValueError(f"bootstrap replicates still degenerate after {max_rounds} redraws")


def mean_estimate(values: Sequence[float], clusters: Sequence[object] | None = None, *,
                  resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> Estimate:
    """The mean of ``values`` with a (cluster) bootstrap confidence interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("mean_estimate needs a non-empty 1-d sequence")
    counts = bootstrap_counts(len(x), resamples, np.random.default_rng(seed), clusters)
    totals = counts.sum(axis=1)
    keep = totals > 0  # a replicate cannot be empty, but guard the division anyway
    replicates = (counts[keep] @ x) / totals[keep]
    low, high = percentile_ci(replicates, confidence)
    return Estimate(float(x.mean()), low, high, len(x))


def paired_difference(before: Sequence[float], after: Sequence[float], clusters: Sequence[object] | None = None,
                      **kwargs) -> Estimate:
    """Mean of ``after - before`` over pairs (same prompt and seed), with a paired bootstrap CI."""
    a, b = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("paired samples must have the same length")
    return mean_estimate(b - a, clusters, **kwargs)


def difference_of_independent(old: Estimate, new: Estimate, confidence: float = CONFIDENCE,
                              stored: float = CONFIDENCE) -> Estimate:
    """``new - old`` for two estimates whose samples cannot be paired, by a normal approximation.

    Each interval (at level ``stored``) has its half-width read as ``z * standard error``, the errors
    are added in quadrature as if the two were independent, and the result has level ``confidence``.
    When the two share data (the same real paintings) they are positively correlated and the true
    interval is narrower: the result is conservative.
    """
    z_in = _z(stored)
    se = math.hypot((old.ci_high - old.ci_low) / (2 * z_in), (new.ci_high - new.ci_low) / (2 * z_in))
    delta, z = new.value - old.value, _z(confidence)
    return Estimate(delta, delta - z * se, delta + z * se, min(old.n, new.n))


def bonferroni(confidence: float, comparisons: int) -> float:
    """The per-comparison level that keeps the chance of any false "significant" among
    ``comparisons`` at ``1 - confidence`` or less (Bonferroni)."""
    return 1.0 - (1.0 - confidence) / max(1, comparisons)


def _z(confidence: float) -> float:
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


# --------------------------------------------------------------------------------------------
# Kernel two-sample statistics (KID, CMMD) and their weighted bootstrap
# --------------------------------------------------------------------------------------------


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KID's kernel ``(x·y / d + 1)³`` (torchmetrics' defaults: gamma = 1/d, coef 1, degree 3)."""
    return (x.double() @ y.double().T / x.shape[1] + 1.0) ** 3


def rbf_kernel(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA) -> torch.Tensor:
    """``exp(-|x - y|² / (2σ²))``, written as the CMMD reference does (norms minus twice the dot)."""
    x, y = x.double(), y.double()
    sq = (x * x).sum(1)[:, None] - 2.0 * x @ y.T + (y * y).sum(1)[None, :]
    return (-sq / (2.0 * sigma * sigma)).exp()


@dataclass(frozen=True)
class KernelSets:
    """The three kernel matrices of a real set R and a generated set G."""

    rr: np.ndarray
    gg: np.ndarray
    rg: np.ndarray

    @classmethod
    def of(cls, kernel, real: torch.Tensor, fake: torch.Tensor) -> "KernelSets":
        return cls(kernel(real, real).numpy(), kernel(fake, fake).numpy(), kernel(real, fake).numpy())


def _weighted_within(k: np.ndarray, w: np.ndarray, unbiased: bool) -> np.ndarray:
    """Per replicate: the weighted mean of k over pairs; unbiased drops pairs of an item with itself."""
    quad = ((w @ k) * w).sum(axis=1)  # w_b^T K w_b for every replicate b, through BLAS
    total = w.sum(axis=1)
    if not unbiased:
        return quad / total ** 2
    self_pairs = (w * w) @ np.diag(k)
    pairs = total ** 2 - (w * w).sum(axis=1)
    if (pairs <= 0).any():  # a replicate of a single item: redraw it (nondegenerate_counts)
        raise ValueError(f"{int((pairs <= 0).sum())} replicate(s) hold a single item: no pair to average")
    return (quad - self_pairs) / pairs


def weighted_mmd2(sets: KernelSets, w_real: np.ndarray, w_fake: np.ndarray, unbiased: bool) -> np.ndarray:
    """MMD² per replicate for count-weighted samples (rows of ``w_real``/``w_fake``).

    With all counts 1 this is the ordinary estimator: unbiased (KID: pairs of an image with itself
    left out of the within-set means) or the V-statistic (CMMD: every entry averaged). A bootstrap
    replicate that draws an image twice does not pair it with itself in the unbiased form either.
    """
    w_real, w_fake = np.atleast_2d(w_real), np.atleast_2d(w_fake)
    cross = ((w_real @ sets.rg) * w_fake).sum(axis=1) / (w_real.sum(1) * w_fake.sum(1))
    return (_weighted_within(sets.rr, w_real, unbiased) + _weighted_within(sets.gg, w_fake, unbiased)
            - 2.0 * cross)


@dataclass(frozen=True)
class SetDistance:
    """A kernel distance between a real set and generated sets: how to build and scale it."""

    name: str
    kernel: object
    unbiased: bool
    scale: float = 1.0

    def value(self, sets: KernelSets) -> float:
        ones_r, ones_g = np.ones((1, sets.rr.shape[0])), np.ones((1, sets.gg.shape[0]))
        return float(self.scale * weighted_mmd2(sets, ones_r, ones_g, self.unbiased)[0])


KID = SetDistance("kid", polynomial_kernel, unbiased=True)
CMMD = SetDistance("cmmd", rbf_kernel, unbiased=False, scale=CMMD_SCALE)


def kid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """KID over the full sets: the unbiased MMD² with the cubic polynomial kernel."""
    return KID.value(KernelSets.of(KID.kernel, real, fake))


def cmmd(real: torch.Tensor, fake: torch.Tensor) -> float:
    """CMMD of two sets of L2-normalised CLIP embeddings (google-research/cmmd's formula)."""
    return CMMD.value(KernelSets.of(CMMD.kernel, real, fake))


@dataclass(frozen=True)
class Resampling:
    """The bootstrap counts shared by every statistic of one evaluation (so deltas are paired)."""

    real: np.ndarray  # (resamples, n_real)
    fake: np.ndarray  # (resamples, n_fake): by prompt cluster, the same for base and every LoRA set
    redrawn: int = 0  # degenerate replicates (one item on a side) drawn again, both sides together

    @classmethod
    def draw(cls, n_real: int, fake_clusters: Sequence[object], resamples: int = RESAMPLES,
             seed: int = 0) -> "Resampling":
        rng = np.random.default_rng(seed)
        real, redrawn_real = nondegenerate_counts(n_real, resamples, rng)
        fake, redrawn_fake = nondegenerate_counts(len(fake_clusters), resamples, rng, fake_clusters)
        return cls(real, fake, redrawn_real + redrawn_fake)


def set_distance_estimates(distance: SetDistance, real: torch.Tensor, fakes: Sequence[torch.Tensor],
                           resampling: Resampling, confidence: float = CONFIDENCE
                           ) -> tuple[list[Estimate], list[np.ndarray]]:
    """Each generated set's distance to ``real`` with its CI, and the replicates (for paired deltas).

    Every generated set must list the same (prompt, seed) pairs in the same order: the same rows of
    ``resampling.fake`` then pick the same images from each, which is what pairs the deltas.
    """
    rr = distance.kernel(real, real).numpy()
    estimates, replicates = [], []
    for fake in fakes:
        sets = KernelSets(rr, distance.kernel(fake, fake).numpy(), distance.kernel(real, fake).numpy())
        reps = distance.scale * weighted_mmd2(sets, resampling.real, resampling.fake, distance.unbiased)
        if not np.isfinite(reps).all():
            raise ValueError(f"{distance.name}: {int((~np.isfinite(reps)).sum())} non-finite bootstrap replicate(s)")
        low, high = percentile_ci(reps, confidence)
        estimates.append(Estimate(distance.value(sets), low, high, int(fake.shape[0])))
        replicates.append(reps)
    return estimates, replicates


def replicate_difference(value: float, replicates_before: np.ndarray, replicates_after: np.ndarray,
                         n: int, confidence: float = CONFIDENCE) -> Estimate:
    """``value`` (after - before) with the percentile CI of the paired replicates' differences."""
    low, high = percentile_ci(replicates_after - replicates_before, confidence)
    return Estimate(value, low, high, n)
