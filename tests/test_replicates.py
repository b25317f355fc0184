"""Training-seed replicates: seeds, the recipe intervals, and the PR report's calibration on simulations.

The simulations run the real code behind evaluate's recipe sections (``replicates.recipe_sections``)
and the real report verdicts (``report.verdicts`` with its ``Pairing`` and ``RecipePairing``) on
simulated per-image tables at the demo's scale (8 subjects × 2 seeds), numpy only: seconds.

The simulated score of an image of subject i, seed s, from training replicate r of a recipe is
``μ + a_i + t_r + e_ris``: a subject effect shared by every model, a training-seed effect shared by
every image of one LoRA, and image noise (which includes the subject × replicate interaction); the
base model's image is ``μ_base + a_i + e_is``, the same in both revisions.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from impressionist import report
from impressionist.errors import UserError
from impressionist.params.model import ReplicateParams
from impressionist.replicate_seeds import extra_replicates, replicate_params, replicate_seed
from impressionist.replicates import RecipePairing, recipe_change, recipe_mean, recipe_sections
from impressionist.stats import Estimate, mean_estimate, paired_difference

SUBJECTS, SEEDS = 8, 2  # the demo's evaluation set
SCALE = {"clip_score": 2.0, "style_score": 0.02}  # the spread of each per-image score
SET_LEVEL = {"kid": 0.05, "cmmd": 0.3}  # of each set-level distance between training seeds
SUBJECT_SD, TRAIN_SD, IMAGE_SD = 1.0, 0.5, 1.0  # in units of SCALE


def simulate_revision(rng, replicates: int, subject_effects, base_noise, lift: float = 0.0):
    """(flat eval.json values, eval_images table, eval_replicates table) of one revision."""
    ids = [f"id{i:03d}" for i in range(SUBJECTS)]
    base_rows, rep_rows = [], []
    for i in range(SUBJECTS):
        for s in range(SEEDS):
            row = {"lora_scale": 0.0, "prompt_id": ids[i], "seed": s, "subject": ids[i], "eval_set": "set-1"}
            row.update({m: SCALE[m] * (subject_effects[i] + base_noise[i, s]) for m in SCALE})
            base_rows.append(row)
    train = rng.normal(0, TRAIN_SD, replicates)
    noise = rng.normal(0, IMAGE_SD, (replicates, SUBJECTS, SEEDS))
    for r in range(replicates):
        for i in range(SUBJECTS):
            for s in range(SEEDS):
                row = {"replicate": r, "lora_scale": 1.0, "prompt_id": ids[i], "seed": s, "subject": ids[i],
                       "eval_set": "set-1"}
                row.update({m: SCALE[m] * (1.0 + lift + subject_effects[i] + train[r] + noise[r, i, s])
                            for m in SCALE})
                rep_rows.append(row)
    base, reps = pd.DataFrame(base_rows), pd.DataFrame(rep_rows)
    lora = reps[reps["replicate"] == 0].drop(columns="replicate")
    images = pd.concat([base, lora], ignore_index=True)
    clusters = list(base["prompt_id"])
    values: dict[str, object] = {"replicates.count": replicates}
    sections = {"base": {}, "lora": {"lora_scale": 1.0}, "delta": {}}
    for m in SCALE:
        sections["base"].update(mean_estimate(base[m], clusters, resamples=400).as_keys(m))
        sections["lora"].update(mean_estimate(lora[m], clusters, resamples=400).as_keys(m))
        sections["delta"].update(paired_difference(base[m], lora[m], clusters, resamples=400).as_keys(m))
    # set-level distances: each replicate's value moves with its training seed (lower is better, so a
    # lift lowers them); models/lora's bootstrap interval covers images and subjects only
    set_values, set_deltas, shared, shared_delta = {}, {}, {}, {}
    for m, sd in SET_LEVEL.items():
        per = 1.0 - lift * sd / TRAIN_SD + sd * (train / TRAIN_SD + rng.normal(0, 0.3, replicates))
        se = 0.3 * sd
        shared[m] = Estimate(float(per[0]), float(per[0] - 1.96 * se), float(per[0] + 1.96 * se), SUBJECTS * SEEDS)
        shared_delta[m] = Estimate(float(per[0] - 0.5), float(per[0] - 0.5 - 1.96 * se),
                                   float(per[0] - 0.5 + 1.96 * se), SUBJECTS * SEEDS)
        set_values[m], set_deltas[m] = list(per), list(per - 0.5)
        sections["base"].update(Estimate(0.5, 0.5 - 1.96 * se, 0.5 + 1.96 * se, SUBJECTS * SEEDS).as_keys(m))
        sections["lora"].update(shared[m].as_keys(m))
        sections["delta"].update(shared_delta[m].as_keys(m))
    if replicates >= 2:
        sections.update(recipe_sections(reps[reps["lora_scale"] == 1.0], base, set_values, set_deltas, shared,
                                        shared_delta))
    for section, keys in sections.items():
        values.update({f"{section}.{k}": v for k, v in keys.items()})
    return values, images, reps


def pair_of_revisions(rng, replicates: int, lift: float = 0.0):
    """The report's verdicts for two revisions of which only train.seed (and ``lift``) differ."""
    subject_effects = rng.normal(0, SUBJECT_SD, SUBJECTS)
    base_noise = rng.normal(0, IMAGE_SD, (SUBJECTS, SEEDS))  # the same base images on both sides
    old, old_images, old_reps = simulate_revision(rng, replicates, subject_effects, base_noise)
    new, new_images, new_reps = simulate_revision(rng, replicates, subject_effects, base_noise, lift)
    diff = {report.EVAL_METRICS: {k: {"old": old.get(k), "new": new.get(k)} for k in {**old, **new}}}
    pairing = report.Pairing(old_images, new_images, old, new)
    recipes = RecipePairing(old_reps, new_reps, old_images, new_images, old, new)
    return report.verdicts(diff, pairing, recipes=recipes), recipes


# ---------------------------------------------------------------- seeds and params


def test_replicate_seeds_are_train_seed_first_then_derived_and_distinct():
    seeds = [replicate_seed(42, k) for k in range(5)]
    assert seeds[0] == 42 and len(set(seeds)) == 5 and all(0 <= s < 2 ** 31 for s in seeds)
    assert replicate_seed(43, 1) != seeds[1] and replicate_seed(42, 1) == seeds[1]  # derived, stable
    params = {"train": {"seed": 42, "max_steps": 3}, "replicates": {"count": 3}}
    assert replicate_params(params, 2)["train"] == {"seed": seeds[2], "max_steps": 3}
    assert params["train"]["seed"] == 42  # not changed in place
    assert extra_replicates(params) == [1, 2]
    assert extra_replicates({"train": {"seed": 1}}) == []  # no section: R = 1
    with pytest.raises(UserError, match="replicates.count=0 must be an integer >= 1"):
        ReplicateParams.check({"replicates": {"count": 0}})


# ---------------------------------------------------------------- the intervals


def test_recipe_interval_covers_the_recipe_mean_with_a_training_seed_effect():
    """95% intervals keep 95% coverage (± binomial error) with a planted training-seed effect; a
    hierarchical bootstrap (replicates, then subjects) at R = 3 does not, which is why the t
    interval on replicate means was chosen."""
    rng = np.random.default_rng(1)
    runs, replicates, bootstrap = 400, 3, 300
    hits_t = hits_boot = hits_change = 0
    for _ in range(runs):
        a = rng.normal(0, SUBJECT_SD, SUBJECTS)
        y = a[None, :, None] + rng.normal(0, 1.0, replicates)[:, None, None] + \
            rng.normal(0, IMAGE_SD, (replicates, SUBJECTS, SEEDS))
        cells = y.mean(axis=2)
        est = recipe_mean(cells).estimate(0.95)
        hits_t += est.ci_low <= 0.0 <= est.ci_high
        rr = rng.integers(0, replicates, (bootstrap, replicates))
        ss = rng.integers(0, SUBJECTS, (bootstrap, SUBJECTS))
        boots = np.array([cells[rr[b]][:, ss[b]].mean() for b in range(bootstrap)])
        low, high = np.quantile(boots, [0.025, 0.975])
        hits_boot += low <= 0.0 <= high
        other = a[None, :, None] + 0.7 + rng.normal(0, 1.0, replicates)[:, None, None] + \
            rng.normal(0, IMAGE_SD, (replicates, SUBJECTS, SEEDS))
        change = recipe_change(cells, other.mean(axis=2)).estimate(0.95)
        hits_change += change.ci_low <= 0.7 <= change.ci_high
    error = 3 * np.sqrt(0.95 * 0.05 / runs)  # three binomial standard errors
    assert abs(hits_t / runs - 0.95) <= error, hits_t / runs
    assert abs(hits_change / runs - 0.95) <= error, hits_change / runs
    assert hits_boot / runs < 0.95 - error, hits_boot / runs


def test_recipe_intervals_need_two_replicates_and_finite_cells():
    with pytest.raises(ValueError, match="replicates >= 2"):
        recipe_mean(np.ones((1, 8)))
    with pytest.raises(ValueError, match="finite"):
        recipe_mean(np.full((3, 8), np.nan))


# ---------------------------------------------------------------- the report on simulated pairs


def judged(found) -> list:
    return [v for v in found if v.change is not None]


def test_only_train_seed_changed_with_three_replicates_is_no_change_in_95_percent_of_pairs():
    rng = np.random.default_rng(2)
    pairs, clean = 60, 0
    for _ in range(pairs):
        found, _ = pair_of_revisions(rng, replicates=3)
        words = {v.metric: v.word for v in found}
        assert {m.partition(".")[0] for m in words if words[m] == report.NOT_JUDGED} <= {"lora", "delta"}
        assert all(words[f"recipe.{m}"] in (report.NO_CHANGE, report.BETTER, report.WORSE) for m in SCALE)
        clean += all(v.word == report.NO_CHANGE for v in judged(found))
    assert clean / pairs >= 0.95, clean / pairs


def test_one_replicate_gives_no_recipe_verdict():
    rng = np.random.default_rng(3)
    for lift in (0.0, 5.0):  # not even for a large planted change
        found, _ = pair_of_revisions(rng, replicates=1, lift=lift)
        for v in found:
            section = v.metric.partition(".")[0]
            assert section not in ("recipe", "recipe_delta")
            if section in ("lora", "delta"):
                assert v.word == report.NOT_JUDGED and "training noise is unmeasured" in v.test
        assert all(v.metric.startswith("base.") for v in judged(found))


def test_a_planted_improvement_is_better_with_its_size_inside_the_ci_at_the_demo_scale():
    rng = np.random.default_rng(4)
    lift, runs, detected = 5.0, 20, 0  # 5 image-noise spreads, 10 training-seed spreads
    for _ in range(runs):
        found, recipes = pair_of_revisions(rng, replicates=3, lift=lift)
        verdict = {v.metric: v for v in found}
        for m in SCALE:
            v = verdict[f"recipe.{m}"]
            assert v.change.ci_low <= lift * SCALE[m] <= v.change.ci_high, v.line()
        detected += all(verdict[f"{s}.{m}"].word == report.BETTER for s in ("recipe", "recipe_delta")
                        for m in (*SCALE, *SET_LEVEL))
        assert all(verdict[f"base.{m}"].word == report.NO_CHANGE for m in SCALE)
    assert detected / runs >= 0.9, detected / runs
    assert "training replicates, paired over 8 subjects" in verdict["recipe.style_score"].test


def test_one_replicate_costs_nothing_in_the_replicate_stages(tmp_path, monkeypatch):
    """R = 1 (the real recipe's default): train --replicates and sample --replicates write their
    manifests and load no model, on a machine without the recipe's GPU."""
    import yaml
    from helpers import committed_params_text

    from impressionist import sample, train

    params = yaml.safe_load(committed_params_text())
    assert params["replicates"]["count"] == 1
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("R = 1 trained a model"))
    monkeypatch.setattr(sample, "load", lambda *a, **k: pytest.fail("R = 1 loaded a pipeline"))
    models = tmp_path / "models" / "replicates"
    assert train.run_replicates(params, out_dir=models) == {"count": 1, "seeds": [42]}
    sample.run_replicates(params, replicates_dir=models, base_dir=tmp_path / "none",
                          out_dir=tmp_path / "samples" / "replicates")
    assert sorted(p.name for p in (tmp_path / "samples" / "replicates").iterdir()) == ["replicates.json"]
    params["replicates"]["count"] = 2  # the models folder holds one LoRA only: one line, nothing written
    with pytest.raises(UserError, match="no replicates for replicates.count=2"):
        sample.run_replicates(params, replicates_dir=models, base_dir=tmp_path / "none",
                              out_dir=tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_non_finite_replicate_score_is_not_judged_not_a_crash(monkeypatch):
    """A NaN in one revision's per-image replicate table gives "not judged" for that recipe metric."""
    rng = np.random.default_rng(5)
    original = simulate_revision

    def with_nan(*args, **kwargs):
        metrics, images, reps = original(*args, **kwargs)
        reps = reps.copy()
        reps.loc[reps.index[0], "style_score"] = float("nan")
        return metrics, images, reps

    monkeypatch.setattr(sys.modules[__name__], "simulate_revision", with_nan)
    found, _ = pair_of_revisions(rng, replicates=3)
    verdict = {v.metric: v for v in found}
    assert verdict["recipe.style_score"].word == report.NOT_JUDGED, verdict["recipe.style_score"].line()
    assert "no recipe interval" in verdict["recipe.style_score"].test
    assert verdict["recipe.clip_score"].word != report.NOT_JUDGED  # the other metric is still judged
