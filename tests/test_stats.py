"""Confidence intervals and kernel distances: references, calibration by simulation, planted shifts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impressionist import stats
from impressionist.stats import Estimate, Resampling


def test_cmmd_equals_the_reference_formula_on_fixed_vectors():
    """google-research/cmmd distance.py, written out with loops: MMD² with a Gaussian RBF kernel
    (σ = 10) averaged over every entry of each kernel matrix (diagonal included), times 1000."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5))
    y = rng.normal(size=(9, 5)) + 0.5
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)

    def k(a, b):
        return np.exp(-np.sum((a - b) ** 2) / (2 * 10.0 ** 2))

    def mean_kernel(a, b):
        return sum(k(u, v) for u in a for v in b) / (len(a) * len(b))

    reference = 1000 * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y))
    assert stats.cmmd(torch.tensor(x), torch.tensor(y)) == pytest.approx(reference, rel=1e-10)
    assert stats.cmmd(torch.tensor(x), torch.tensor(x)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_equals_torchmetrics_with_one_subset_of_everything():
    """Over the full sets, KID is torchmetrics' KID with one subset holding every image."""
    from torchmetrics.image.kid import KernelInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 6

        def forward(self, x):
            return x

    rng = np.random.default_rng(1)
    real = torch.tensor(rng.normal(size=(10, 6)))
    fake = torch.tensor(rng.normal(size=(10, 6)) + 0.3)
    metric = KernelInceptionDistance(feature=Identity(), subsets=1, subset_size=10)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = float(metric.compute()[0])
    assert stats.kid(real, fake) == pytest.approx(expected, rel=1e-9)


def test_weighted_mmd_with_zero_one_counts_is_the_estimator_on_the_subset():
    rng = np.random.default_rng(2)
    real, fake = torch.tensor(rng.normal(size=(8, 4))), torch.tensor(rng.normal(size=(6, 4)))
    w_real = np.array([[1, 0, 1, 1, 0, 1, 1, 0]], dtype=float)
    w_fake = np.array([[0, 1, 1, 1, 1, 0]], dtype=float)
    for distance, plain in ((stats.KID, stats.kid), (stats.CMMD, stats.cmmd)):
        sets = stats.KernelSets.of(distance.kernel, real, fake)
        weighted = distance.scale * stats.weighted_mmd2(sets, w_real, w_fake, distance.unbiased)[0]
        subset = plain(real[w_real[0] > 0], fake[w_fake[0] > 0])
        assert weighted == pytest.approx(subset, rel=1e-10)


def test_cluster_bootstrap_draws_whole_clusters():
    counts = stats.bootstrap_counts(6, 200, np.random.default_rng(0), clusters=["a", "a", "b", "b", "c", "c"])
    assert counts.shape == (200, 6)
    assert np.array_equal(counts[:, 0], counts[:, 1]) and np.array_equal(counts[:, 4], counts[:, 5])
    assert (counts.sum(axis=1) == 6).all()  # three clusters of two drawn three times
    plain = stats.bootstrap_counts(6, 200, np.random.default_rng(0))
    assert not np.array_equal(plain[:, 0], plain[:, 1])


def test_seeds_of_one_subject_count_as_one_draw():
    """Two seeds of a subject that score the same carry no more information than one: the cluster
    bootstrap's interval equals the one of the subjects' means, where an image-level one is narrower."""
    per_subject = np.random.default_rng(4).normal(size=25)
    images = np.repeat(per_subject, 2)
    clustered = stats.mean_estimate(images, clusters=np.repeat(np.arange(25), 2), seed=1)
    assert (clustered.ci_low, clustered.ci_high) == pytest.approx(
        (lambda e: (e.ci_low, e.ci_high))(stats.mean_estimate(per_subject, seed=1)), rel=1e-12)
    assert clustered.n == 50
    naive = stats.mean_estimate(images, seed=1)
    assert naive.ci_high - naive.ci_low < 0.85 * (clustered.ci_high - clustered.ci_low)


def test_mean_estimate_is_seeded_and_narrows_with_n():
    rng = np.random.default_rng(3)
    small, large = rng.normal(size=20), rng.normal(size=2000)
    a, b = stats.mean_estimate(small, seed=5), stats.mean_estimate(small, seed=5)
    assert a == b and a.ci_low < a.value < a.ci_high and a.n == 20
    assert stats.mean_estimate(small, seed=6) != a
    wide, narrow = a.ci_high - a.ci_low, (lambda e: e.ci_high - e.ci_low)(stats.mean_estimate(large))
    assert narrow < wide / 5  # about sqrt(100) = 10 times narrower
    assert stats.mean_estimate([2.0, 2.0, 2.0]) == Estimate(2.0, 2.0, 2.0, 3)


def test_difference_of_independent_adds_errors_in_quadrature():
    old, new = Estimate(1.0, 0.8, 1.2, 100), Estimate(1.5, 1.35, 1.65, 100)
    diff = stats.difference_of_independent(old, new)
    half = 1.959964 * np.hypot(0.2 / 1.959964, 0.15 / 1.959964)
    assert diff.value == pytest.approx(0.5)
    assert (diff.ci_low, diff.ci_high) == pytest.approx((0.5 - half, 0.5 + half), rel=1e-5)
    assert diff.excludes_zero() and not stats.difference_of_independent(old, Estimate(1.1, 0.9, 1.3, 100)).excludes_zero()


# ---------------------------------------------------------------- calibration by simulation


def unpaired_mean_difference(before: np.ndarray, after: np.ndarray, clusters, resamples: int, seed: int) -> Estimate:
    """What a resampler that forgets the pairing computes: each side's mean bootstrapped on its own
    draws (independent subjects for base and LoRA), and the CI of the replicates' differences."""
    rng_before, rng_after = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
    reps = []
    for x, rng in ((before, rng_before), (after, rng_after)):
        counts = stats.bootstrap_counts(len(x), resamples, rng, clusters)
        reps.append(counts @ x / counts.sum(axis=1))
    return stats.replicate_difference(float(np.mean(after - before)), reps[0], reps[1], len(x))


def simulated_evaluation(seed: int, shift: float = 0.0, n_subjects: int = 30, seeds: int = 2, n_real: int = 40,
                         dim: int = 8, resamples: int = 400, subject_sd: float = 1.0,
                         paired: bool = True) -> dict[str, Estimate]:
    """Base and LoRA generators that are the same distribution (``shift`` 0) or differ by ``shift``.

    Like the real evaluation set: each image comes from a subject (a shared component, of standard
    deviation ``subject_sd``) and a seed (its own noise); base and LoRA images of one (subject, seed)
    share the subject and the seed's noise, plus generator-specific noise (sd 0.5). Per-image scores
    and features are drawn the same way; the real paintings follow the base images' distribution.
    Returns the deltas (LoRA − base) of a per-image score, KID and CMMD with their CIs: paired as
    the evaluation computes them, or (``paired=False``) resampled with base and LoRA drawn apart;
    and, under ``base_<name>``, the base set's own estimates.
    """
    rng = np.random.default_rng(seed)
    subject = np.repeat(rng.normal(size=(n_subjects, dim)) * subject_sd, seeds, axis=0)
    noise = rng.normal(size=subject.shape)
    clusters = np.repeat(np.arange(n_subjects), seeds)

    def generator(offset):
        return subject + noise + 0.5 * rng.normal(size=subject.shape) + offset

    base, lora = generator(0.0), generator(shift)
    real = rng.normal(size=(n_real, dim)) * np.sqrt(subject_sd ** 2 + 1.25)
    score_base, score_lora = base[:, 0], lora[:, 0]  # a per-image score: one coordinate of the image
    if paired:
        out = {"score": stats.paired_difference(score_base, score_lora, clusters, resamples=resamples, seed=seed)}
        resamplings = [Resampling.draw(n_real, clusters, resamples, seed)] * 2
    else:
        out = {"score": unpaired_mean_difference(score_base, score_lora, clusters, resamples, seed)}
        resamplings = [Resampling.draw(n_real, clusters, resamples, seed * 2 + k) for k in (1, 2)]
    out["base_score"] = stats.mean_estimate(score_base, clusters, resamples=resamples, seed=seed)
    real_t = torch.tensor(real)
    for name, distance in (("kid", stats.KID), ("cmmd", stats.CMMD)):
        (b, rb), (l, rl) = [(e[0], r[0]) for e, r in (
            stats.set_distance_estimates(distance, real_t, [torch.tensor(fake)], resampling)
            for fake, resampling in ((base, resamplings[0]), (lora, resamplings[1])))]
        out[name], out[f"base_{name}"] = stats.replicate_difference(l.value - b.value, rb, rl, l.n), b
    return out


def test_identical_generators_give_cis_that_cover_zero_at_least_90_percent_of_the_time():
    runs = [simulated_evaluation(seed) for seed in range(40)]
    for name in ("score", "kid", "cmmd"):
        covered = sum(not run[name].excludes_zero() for run in runs)
        assert covered >= 36, f"{name}: the 95% CI covered 0 in only {covered} of 40 simulations"


def test_a_planted_shift_is_detected():
    runs = [simulated_evaluation(seed, shift=1.0) for seed in range(10)]
    for name in ("score", "kid", "cmmd"):
        detected = sum(run[name].ci_low > 0 for run in runs)
        assert detected >= 9, f"{name}: a shift of 1.0 (2/3 of the images' sd) was detected in only {detected} of 10 simulations"


def width(estimate: Estimate) -> float:
    return estimate.ci_high - estimate.ci_low


def pairing_checks(paired: bool) -> dict[str, int]:
    """Per statistic, in how many of 10 simulations pairing visibly did its work. Every image of a
    subject shares a strong subject effect (sd 3) that base and LoRA images of one (subject, seed)
    also share: a paired delta cancels it, so with identical generators its CI is far narrower than
    the base set's own CI (here: under half; independent resampling makes it ~1.4 times wider), and
    a shift of 0.5 (a sixth of the subject sd) is detected by the per-image score."""
    same = [simulated_evaluation(seed, subject_sd=3.0, paired=paired) for seed in range(10)]
    shifted = [simulated_evaluation(seed, shift=0.5, subject_sd=3.0, paired=paired) for seed in range(10)]
    checks = {name: sum(width(run[name]) < 0.5 * width(run[f"base_{name}"]) for run in same)
              for name in ("score", "kid", "cmmd")}
    checks["score_shift"] = sum(run["score"].ci_low > 0 for run in shifted)
    return checks


def test_paired_deltas_cancel_the_effect_base_and_lora_share():
    checks = pairing_checks(paired=True)
    assert all(count >= 9 for count in checks.values()), checks


def test_the_pairing_test_fails_when_deltas_are_resampled_unpaired():
    """The check above tests pairing: base and LoRA resampled apart (the bug) fail every part of it."""
    checks = pairing_checks(paired=False)
    assert all(count <= 2 for count in checks.values()), checks


# ---------------------------------------------------------------- degenerate replicates, no NaN


def test_degenerate_replicates_are_redrawn_and_counted():
    # Two paintings: half of all replicates draw one painting twice (2**(1-2) = 50%).
    counts, redrawn = stats.nondegenerate_counts(2, 1000, np.random.default_rng(0))
    assert ((counts > 0).sum(axis=1) == 2).all() and (counts.sum(axis=1) == 2).all()
    assert 400 < redrawn < 1600  # about 1000 = 500 + 250 + 125 + ...
    again, redrawn_again = stats.nondegenerate_counts(2, 1000, np.random.default_rng(0))
    assert np.array_equal(counts, again) and redrawn == redrawn_again  # seeded
    # clusters: a replicate of one subject with two seeds holds two images, so it stands
    _, none = stats.nondegenerate_counts(4, 500, np.random.default_rng(1), clusters=["a", "a", "b", "b"])
    assert none == 0
    with pytest.raises(ValueError, match="1 item"):
        stats.nondegenerate_counts(1, 10, np.random.default_rng(0))


def test_a_replicate_of_one_item_is_an_error_not_nan():
    rng = np.random.default_rng(3)
    real, fake = torch.tensor(rng.normal(size=(3, 4))), torch.tensor(rng.normal(size=(4, 4)))
    sets = stats.KernelSets.of(stats.KID.kernel, real, fake)
    with pytest.raises(ValueError, match="single item"):
        stats.weighted_mmd2(sets, np.array([[3.0, 0, 0]]), np.ones((1, 4)), unbiased=True)
    # CMMD (the V-statistic) has no such division
    assert np.isfinite(stats.weighted_mmd2(sets, np.array([[3.0, 0, 0]]), np.ones((1, 4)), unbiased=False)).all()


def test_a_nan_interval_never_covers_zero():
    nan = Estimate(float("nan"), float("nan"), float("nan"), 16)
    assert not nan.finite() and Estimate(0.0, -1.0, 1.0, 16).finite()
    with pytest.raises(ValueError, match="not judged"):
        nan.excludes_zero()
    from impressionist.report import NOT_JUDGED, word_for
    assert word_for("lora.kid", nan) == NOT_JUDGED
    assert word_for("lora.kid", Estimate(0.1, float("nan"), 0.2, 16)) == NOT_JUDGED


def test_every_evaluate_seed_0_to_59_gives_finite_intervals_at_the_demo_size():
    """The demo's size: 8 subjects x 2 seeds per model, MIN_REAL paintings; every bootstrap seed of
    0-59 (``evaluate.seed``) must give finite KID and CMMD intervals, redrawing where it must."""
    rng = np.random.default_rng(0)
    real = torch.tensor(rng.normal(size=(stats.MIN_REAL, 6)))
    fakes = [torch.tensor(rng.normal(size=(16, 6)) + shift) for shift in (0.0, 0.3)]
    clusters = np.repeat(np.arange(8), 2)
    redrawn = []
    for seed in range(60):
        resampling = Resampling.draw(stats.MIN_REAL, clusters, stats.RESAMPLES, seed)
        redrawn.append(resampling.redrawn)
        for distance in (stats.KID, stats.CMMD):
            estimates, (rb, rl) = stats.set_distance_estimates(distance, real, fakes, resampling)
            delta = stats.replicate_difference(estimates[1].value - estimates[0].value, rb, rl, 16)
            assert all(e.finite() for e in (*estimates, delta)), (seed, distance.name)
            delta.excludes_zero()
    # at 5 paintings about 2000 * 5**-4 = 3.2 replicates per run are degenerate: the path is exercised
    assert 0 < np.mean(redrawn) < 10 and min(redrawn) >= 0


def test_min_real_keeps_redraws_below_a_tenth_of_each_tail():
    """Why MIN_REAL = 5: the share of degenerate real replicates, n**(1-n), measured by drawing."""
    share = {n: stats.nondegenerate_counts(n, 20000, np.random.default_rng(n))[1] / 20000 for n in (3, 4, 5)}
    tail = (1 - stats.CONFIDENCE) / 2
    assert share[5] < tail / 10 < share[4]
    p = {n: n ** (1.0 - n) for n in share}  # redraws of redraws too: p + p² + ... = p / (1 - p)
    assert share[3] == pytest.approx(p[3] / (1 - p[3]), rel=0.1)
    assert share[5] == pytest.approx(p[5] / (1 - p[5]), rel=0.5)
