"""Calibration of the PR report's verdicts through the real report code (report.verdicts, Pairing,
stats): simulated per-image score tables, numpy only, seconds.

Each image's score is subject effect + noise effect + model offset + residual. The noise effect is
what an image owes to its starting noise: with **independent** noise per (subject, seed) (what
sample.py draws) it is one value per image; with **shared** noise (every subject at seed s from the
same latent, the old design) it is one value per seed, common to every subject and model.
"""

from __future__ import annotations

import numpy as np

from impressionist import report
from impressionist.report import BETTER, NO_CHANGE, Pairing, verdicts
from impressionist.stats import mean_estimate, paired_difference

PATH = report.EVAL_METRICS
N_SUBJECTS, SUBJECT_SD, NOISE_SD, RESIDUAL_SD = 20, 0.5, 1.0, 0.3
RESAMPLES = 300


class World:
    """One population of subjects and starting noises; revisions draw their evaluation sets from it."""

    def __init__(self, seed: int, shared_noise: bool) -> None:
        self.rng = np.random.default_rng(seed)
        self.shared = shared_noise
        self.subject = self.rng.normal(0, SUBJECT_SD, N_SUBJECTS)
        self.noise: dict = {}

    def noise_of(self, i: int, s: int, metric: str) -> float:
        key = (metric, s) if self.shared else (metric, i, s)
        if key not in self.noise:
            self.noise[key] = self.rng.normal(0, NOISE_SD)
        return self.noise[key]

    def revision(self, seeds, lora_offset: float = 0.0, eval_set: str = "A"):
        """(per-image table, flat eval.json values) of one revision: base (scale 0) and LoRA (scale 1)."""
        rows = []
        for scale, offset in ((0.0, 0.0), (1.0, lora_offset)):
            for i in range(N_SUBJECTS):
                for s in seeds:
                    row = {"lora_scale": scale, "prompt_id": f"p{i}", "seed": s, "eval_set": eval_set}
                    for metric in report.PER_IMAGE:
                        row[metric] = (self.subject[i] + self.noise_of(i, s, metric) + offset
                                       + self.rng.normal(0, RESIDUAL_SD))
                    rows.append(row)
        import pandas as pd

        table = pd.DataFrame(rows)
        values = {"lora.lora_scale": 1.0}
        for metric in report.PER_IMAGE:
            base = table[table.lora_scale == 0.0]
            lora = table[table.lora_scale == 1.0]
            clusters = list(base.prompt_id)
            for section, est in (("base", mean_estimate(base[metric], clusters, resamples=RESAMPLES)),
                                 ("lora", mean_estimate(lora[metric], clusters, resamples=RESAMPLES)),
                                 ("delta", paired_difference(base[metric].to_numpy(), lora[metric].to_numpy(),
                                                             clusters, resamples=RESAMPLES))):
                values.update({f"{section}.{k}": v for k, v in est.as_keys(metric).items()})
        return table, values


def judge(old, new):
    (old_table, old_values), (new_table, new_values) = old, new
    diff = {PATH: {k: {"old": old_values[k], "new": new_values[k]} for k in old_values}}
    # weight-level verdicts: these simulations compare two evaluations of the same weights (R = 1)
    return verdicts(diff, Pairing(old_table, new_table, old_values, new_values), weight_level_verdicts=True)


def all_quiet_share(shared_noise: bool, pairs: int = 40) -> float:
    """Share of simulated PRs that change only sample.eval_set.seeds ([0, 1] -> [2, 3], same models)
    where every verdict is "no significant change"."""
    quiet = 0
    for k in range(pairs):
        world = World(k, shared_noise)
        found = judge(world.revision([0, 1], 0.0, "A"), world.revision([2, 3], 0.0, "B"))
        assert found and all(v.change is not None for v in found)
        quiet += all(v.word == NO_CHANGE for v in found)
    return quiet / pairs


def test_only_eval_seeds_changed_gives_no_change_in_95_percent_of_pairs():
    assert all_quiet_share(shared_noise=False) >= 0.95


def test_shared_noise_would_fail_the_same_check():
    """The old design: a seed effect common to every subject, which no interval over subjects sees."""
    assert all_quiet_share(shared_noise=True) < 0.8


def coverage(shared_noise: bool, sims: int = 200) -> float:
    """How often the 95% interval of a revision's mean score covers the population mean (0)."""
    covered = 0
    for k in range(sims):
        _, values = World(1000 + k, shared_noise).revision([0, 1, 2])
        covered += values["base.clip_score_ci_low"] <= 0.0 <= values["base.clip_score_ci_high"]
    return covered / sims


def test_intervals_cover_the_truth_95_percent_with_independent_noise_not_with_shared():
    sims = 200
    binomial = 3 * np.sqrt(0.95 * 0.05 / sims)  # three binomial standard errors: 0.046
    independent = coverage(False, sims)
    assert independent >= 0.95 - binomial, independent
    assert coverage(True, sims) < 0.95 - binomial  # shared seeds: intervals far too narrow


def test_a_planted_improvement_is_detected_with_its_size_inside_the_interval():
    planted, hits = 0.4, 0
    for k in range(10):
        world = World(2000 + k, shared_noise=False)
        old = world.revision([0, 1], 0.0, "A")
        world.rng = np.random.default_rng(5000 + k)  # the new LoRA's own residual noise
        new = world.revision([0, 1], planted, "A")  # same evaluation set: paired image by image
        found = {v.metric: v for v in judge(old, new)}
        v = found["lora.clip_score"]
        assert "paired" in v.test
        hits += v.word == BETTER and v.change.ci_low <= planted <= v.change.ci_high
        assert found["base.clip_score"].word == NO_CHANGE
    assert hits >= 9
