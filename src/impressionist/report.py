"""A Markdown report of a change for a pull request: metrics and params diff, sample grid, verdicts.

``python -m impressionist.report --base-rev origin/main --out report.md`` compares the workspace
(in CI: the pull request's head commit) with the base revision through DVC:

* ``dvc metrics diff --md <base-rev>`` and ``dvc params diff --md <base-rev>``, verbatim;
* one verdict line per judged metric of ``metrics/eval.json`` (:data:`DIRECTIONS`: lower is better
  for ``kid`` and ``cmmd``, higher for ``clip_score`` and ``style_score``), in each section (``lora``,
  ``delta``, ``base``, ``lora_scale_<s>``). A verdict says **better** or **worse** only when the
  confidence interval of the change excludes zero, and otherwise **no significant change**:

  - per-image scores (CLIP, style) are **paired** image by image when both revisions scored the same
    evaluation set (``metrics/eval_images.csv``: the same ``eval_set`` fingerprint and the same
    (subject, seed) pairs): the mean change over pairs with a bootstrap CI over subjects;
  - set-level distances (KID, CMMD), and per-image scores whose sets differ, compare the two
    revisions' own intervals (the errors added in quadrature: conservative, since both share the
    real paintings); the report says when the evaluation sets differ;

  the weight-level sections (``lora``, ``delta``, ``lora_scale_<s>``: one trained LoRA per revision,
  training noise left out) are **not judged** unless ``--weight-level``; with R >= 2 training
  replicates in both revisions (``replicates.count``) the recipe sections ``recipe`` and
  ``recipe_delta`` are judged instead (:class:`impressionist.replicates.RecipePairing`: paired by
  subject over ``metrics/eval_replicates.csv``, t intervals including the replicates' variance), and
  with R = 1 the report says the numbers are about these weights and training noise is unmeasured;

  ``fid`` is shown but never judged (biased at these sizes, no CI); intervals, counts, the LoRA
  scale and ``real.*`` are informational;
* the sample grid ``plots/samples_grid.png``, as a relative image link, or as ``--image-url``.

Everything it reads is tracked by git (metrics, the per-image table and plots are ``cache: false``
outs), so it needs no ``dvc pull``. It runs nothing of the pipeline and loads no model (and no torch).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .dvc_cli import run_dvc
from .errors import UserError, atomic_write_text, stage_main
from .hub import BUILTIN_PREFIX
from .layout import EVAL_IMAGES, EVAL_REPLICATES
from .layout import EVAL_METRICS as EVAL_METRICS_PATH
from .layout import SAMPLE_GRID as GRID
from .params import DEFAULT_PARAMS
from .params.evaluation import CONFIDENCE, PER_IMAGE
from .replicates import RECIPE, RECIPE_DELTA, RecipePairing, read_replicate_table
from .stats import Estimate, bonferroni, difference_of_independent, mean_estimate

EVAL_METRICS = EVAL_METRICS_PATH.as_posix()
LOWER, HIGHER = "lower", "higher"
DIRECTIONS = {"kid": LOWER, "cmmd": LOWER, "clip_score": HIGHER, "style_score": HIGHER}
CI_SUFFIXES = ("_ci_low", "_ci_high", "_n")
# Sections of eval.json in reading order: the headline first, the reference never judged.
SECTION_ORDER = (RECIPE, RECIPE_DELTA, "lora", "delta", "base")
HEADLINE_SECTIONS = (RECIPE, RECIPE_DELTA, "lora", "delta")  # shown first; base and lora_scale_<s> are folded
RECIPE_SECTIONS = (RECIPE, RECIPE_DELTA)  # over R >= 2 training replicates: training noise measured
INFORMATIONAL_SECTIONS = ("real",)
BETTER, WORSE, NO_CHANGE, NEW, REMOVED, NOT_JUDGED = (
    "better", "worse", "no significant change", "new", "removed", "not judged")
WORDS = (BETTER, WORSE, NO_CHANGE, NEW, REMOVED, NOT_JUDGED)


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------


def weight_level(metric: str) -> bool:
    """A section about one trained LoRA's weights (``lora``, ``delta``, ``lora_scale_<s>``): its
    intervals leave out training noise, so a change there is not a recipe's."""
    section = metric.rpartition(".")[0]
    return section in ("lora", "delta") or section.startswith("lora_scale_")


WEIGHTS_ONLY = ("about these weights: training noise is unmeasured (replicates.count = 1); "
                "pass --weight-level for a weight-level verdict")
WEIGHTS_WITH_RECIPE = "one weight draw per revision; the recipe_* verdicts judge the recipe (--weight-level to judge it)"


def direction(metric: str) -> str | None:
    """``"lower"`` / ``"higher"`` is better for a flattened eval.json name, None if informational."""
    section, _, leaf = metric.rpartition(".")
    if section in INFORMATIONAL_SECTIONS:
        return None
    return DIRECTIONS.get(leaf)


def word_for(metric: str, change: Estimate) -> str:
    """better / worse when the change's CI excludes zero (in the metric's direction), else no change;
    not judged when the change or its interval is not finite."""
    way = direction(metric)
    if way is None:
        raise ValueError(f"{metric} has no better/worse direction")
    if not change.finite():  # a NaN interval neither covers nor excludes 0
        return NOT_JUDGED
    if not change.excludes_zero():
        return NO_CHANGE
    return BETTER if (change.value < 0) == (way == LOWER) else WORSE


@dataclass(frozen=True)
class Verdict:
    metric: str
    old: float | None
    new: float | None
    word: str
    change: Estimate | None = None
    test: str = ""

    def line(self) -> str:
        def show(value: float | None) -> str:
            return "–" if value is None else f"{value:.6g}"

        detail = ""
        if self.change is not None:
            c = self.change
            detail = f" (change {c.value:+.4g}, CI [{c.ci_low:+.4g}, {c.ci_high:+.4g}]; {self.test})"
        elif self.test:
            detail = f" ({self.test})"
        return (f"- `{self.metric}`: {show(self.old)} → {show(self.new)}{detail} — **{self.word}** "
                f"({direction(self.metric)} is better)")


def _order(metric: str) -> tuple[int, str, int]:
    section, _, leaf = metric.rpartition(".")
    rank = SECTION_ORDER.index(section) if section in SECTION_ORDER else len(SECTION_ORDER)
    return rank, section, list(DIRECTIONS).index(leaf)


def summary(items: Sequence[Verdict]) -> str:
    counts = {word: sum(v.word == word for v in items) for word in WORDS}
    return ", ".join(f"{n} {word}" for word, n in counts.items() if n)


def read_images_table(text: str | None):
    """``metrics/eval_images.csv`` text as a DataFrame, or None when the revision has none."""
    if not text:
        return None
    import pandas as pd

    try:
        table = pd.read_csv(io.StringIO(text))
    except Exception:  # a foreign or truncated file cannot be paired: fall back to the intervals
        return None
    needed = {"lora_scale", "prompt_id", "seed", "eval_set", *PER_IMAGE}
    return table if needed <= set(table.columns) and not table.empty else None


class Pairing:
    """Image-by-image pairing of two revisions' per-image scores, when their evaluation sets agree."""

    def __init__(self, old_table, new_table, old_metrics: Mapping[str, Any], new_metrics: Mapping[str, Any],
                 confidence: float = CONFIDENCE) -> None:
        self.old, self.new = old_table, new_table
        self.old_metrics, self.new_metrics = old_metrics, new_metrics
        self.confidence = confidence
        self.reason = ""
        if old_table is None or new_table is None:
            self.reason = "no per-image scores in one revision"
        elif set(old_table["eval_set"].astype(str)) != set(new_table["eval_set"].astype(str)):
            self.reason = "the evaluation sets differ (sample.eval_set)"

    @property
    def possible(self) -> bool:
        return not self.reason

    def _scale(self, metrics: Mapping[str, Any], section: str) -> float | None:
        if section == "base":
            return 0.0
        if section == "lora":
            value = metrics.get("lora.lora_scale")
            return None if value is None else float(value)
        if section.startswith("lora_scale_"):
            return float(section.removeprefix("lora_scale_"))
        return None

    def _values(self, table, metrics: Mapping[str, Any], section: str, name: str):
        """Per (subject, seed) values of ``name`` in ``section`` (delta: LoRA minus base), or None."""
        def at(scale):
            rows = table[table["lora_scale"].round(6) == round(scale, 6)]
            return None if rows.empty else rows.set_index(["prompt_id", "seed"])[name]

        if section == "delta":
            top, base = self._scale(metrics, "lora"), at(0.0)
            lora = None if top is None else at(top)
            return None if lora is None or base is None else (lora - base).dropna()
        scale = self._scale(metrics, section)
        return None if scale is None else at(scale)

    def change(self, section: str, name: str) -> tuple[Estimate | None, str]:
        """The paired mean change new − old with its CI, or (None, why not)."""
        if not self.possible:
            return None, self.reason
        old = self._values(self.old, self.old_metrics, section, name)
        new = self._values(self.new, self.new_metrics, section, name)
        if old is None or new is None or set(old.index) != set(new.index):
            return None, "the (subject, seed) pairs differ"
        new = new.loc[old.index]
        clusters = [key[0] for key in old.index]
        estimate = mean_estimate(new.to_numpy() - old.to_numpy(), clusters, confidence=self.confidence)
        return estimate, (f"paired bootstrap over {estimate.n} (subject, seed) pairs, "
                          f"{len(set(clusters))} subjects")


def _estimate(values: Mapping[str, Any], metric: str) -> Estimate | None:
    parts = [values.get(metric)] + [values.get(metric + suffix) for suffix in CI_SUFFIXES]
    if any(p is None for p in parts):
        return None
    return Estimate(float(parts[0]), float(parts[1]), float(parts[2]), int(parts[3]))


def verdicts(diff: Mapping[str, Any], pairing: Pairing | None = None, path: str = EVAL_METRICS,
             confidence: float = CONFIDENCE, recipes: RecipePairing | None = None,
             weight_level_verdicts: bool = False) -> list[Verdict]:
    """One verdict per judged metric of ``path`` in ``dvc metrics diff --json --all`` output.

    ``recipe`` / ``recipe_delta`` (both revisions with R >= 2 training replicates) are judged as
    recipes (``recipes``, else each revision's stored ``_se`` / ``_df``); the weight-level sections
    (:func:`weight_level`) are "not judged" unless ``weight_level_verdicts``: their intervals leave
    training noise out, so better/worse there would be about two weight draws, not the change."""
    entries = diff.get(path) or {}
    old = {name: e.get("old") for name, e in entries.items()}
    new = {name: e.get("new") for name, e in entries.items()}
    pairing = pairing or Pairing(None, None, old, new, confidence)
    recipes = recipes or RecipePairing(None, None, None, None, old, new)
    has_recipes = any(n.startswith(RECIPE + ".") and old.get(n) is not None and new.get(n) is not None
                      for n in entries)

    def judged_here(name: str) -> bool:
        return (direction(name) is not None and old.get(name) is not None and new.get(name) is not None
                and (weight_level_verdicts or not weight_level(name)))

    # Many verdicts at once: each interval is widened (Bonferroni) so that the chance of calling any
    # of them better or worse by noise alone stays at 1 - confidence.
    level = bonferroni(confidence, sum(judged_here(n) for n in entries))
    pairing.confidence = level
    found = []
    for name in entries:
        if direction(name) is None:
            continue
        before, after = old.get(name), new.get(name)
        if before is None or after is None:
            found.append(Verdict(name, before, after, NEW if before is None else REMOVED))
            continue
        section, _, leaf = name.rpartition(".")
        if not judged_here(name):
            found.append(Verdict(name, before, after, NOT_JUDGED,
                                 test=WEIGHTS_WITH_RECIPE if has_recipes else WEIGHTS_ONLY))
            continue
        if section in RECIPE_SECTIONS:
            change, why = recipes.change(section, leaf, level)
            if change is None:
                found.append(Verdict(name, before, after, NOT_JUDGED, test=why))
            else:
                found.append(Verdict(name, before, after, word_for(name, change), change, why))
            continue
        change, why = pairing.change(section, leaf) if leaf in PER_IMAGE else (None, "")
        test = why
        if change is None:
            old_est, new_est = _estimate(old, name), _estimate(new, name)
            if old_est is None or new_est is None:
                found.append(Verdict(name, before, after, NOT_JUDGED, test="no confidence interval in one revision"))
                continue
            change = difference_of_independent(old_est, new_est, level, stored=confidence)
            test = ("unpaired: the two revisions' intervals combined" + (f"; not paired: {why}" if why else ""))
        found.append(Verdict(name, before, after, word_for(name, change), change, test))
    return sorted(found, key=lambda v: _order(v.metric))


# --------------------------------------------------------------------------------------------
# git and DVC
# --------------------------------------------------------------------------------------------


def find_dvc_root(start: Path | str) -> Path:
    """The nearest folder at or above ``start`` holding ``.dvc/`` (as DVC itself finds it)."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise UserError(f"{start} is not inside a DVC repository (no .dvc folder above it); run the report "
                    "from a clone of the project")


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise UserError("git is not installed; the report compares git revisions") from err


def resolve_rev(root: Path, rev: str) -> str:
    """The full commit id of ``rev``; one clear line when git does not know it."""
    if _git(root, "rev-parse", "--git-dir").returncode:
        raise UserError(f"{root} is not a git repository; the report compares git revisions")
    found = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if found.returncode or not found.stdout.strip():
        raise UserError(f"base revision {rev!r} is not known to git here; fetch it first (`git fetch origin "
                        f"<branch>`; in GitHub Actions check out with fetch-depth: 0) and pass e.g. "
                        f"--base-rev origin/main")
    return found.stdout.strip()


def _table_or(markdown: str, empty: str) -> str:
    """DVC prints a header without rows when nothing changed; say so in words instead."""
    rows = [line for line in markdown.strip().splitlines() if line.strip()]
    return "\n".join(rows) if len(rows) > 2 else empty


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def report_confidence(root: Path) -> float:
    """``evaluate.confidence`` of the workspace's params (the level of every interval), else 0.95."""
    # Raw and tolerant (not EvaluateParams): no torch here, and an old revision's params may not check.
    try:
        params = yaml.safe_load((root / DEFAULT_PARAMS).read_text()) or {}
        value = (params.get("evaluate") or {}).get("confidence", CONFIDENCE)
    except (OSError, yaml.YAMLError, AttributeError):
        return CONFIDENCE
    return float(value) if isinstance(value, float) and 0.5 <= value < 1.0 else CONFIDENCE


def random_nets_note(root: Path) -> str | None:
    """The demo's feature nets and model are random: say so next to its verdicts."""
    try:
        params = yaml.safe_load((root / DEFAULT_PARAMS).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    # Raw and tolerant (not ModelParams): no torch here, and an old revision's params may not check.
    evaluate, model = params.get("evaluate") or {}, params.get("model") or {}
    builtin = [f"{key}={value}" for key, value in (
        ("model.pretrained", model.get("pretrained")), ("evaluate.fid_features", evaluate.get("fid_features")),
        ("evaluate.clip_model", evaluate.get("clip_model"))) if str(value or "").startswith(BUILTIN_PREFIX)]
    if not builtin:
        return None
    return (f"> **Note:** this revision uses random-weight demo networks ({', '.join(builtin)}): the "
            f"numbers show that the pipeline runs, not how good the paintings are.")


def grid_section(root: Path, grid: Path, out_path: Path, image_url: str | None) -> str:
    """The Markdown image of the grid: ``image_url`` if given (only for a committed grid, or the link
    would be broken), else a path relative to the report file ``out_path``."""
    path = root / grid
    if not path.is_file():
        return f"_No sample grid at `{grid.as_posix()}` in this revision; run `dvc repro sample`._"
    if image_url:
        link = image_url
        if _git(root, "cat-file", "-e", f"HEAD:{grid.as_posix()}").returncode:
            return (f"_`{grid.as_posix()}` is not committed at HEAD, so it cannot be linked; commit it "
                    f"(it is a `cache: false` plot, tracked by git)._")
    else:
        link = Path(os.path.relpath(path, out_path.resolve().parent)).as_posix()
    return f"![sample grid: rows = prompts (seed), columns = base model | LoRA scales]({link})"


def replicates_note(found: Sequence[Verdict], old: Mapping[str, Any], new: Mapping[str, Any],
                    weight_level_verdicts: bool) -> str:
    """What the verdicts are about: recipes (training noise measured) or these weights only."""
    counts = [int(m.get("replicates.count") or 1) for m in (old, new)]
    if any(v.metric.startswith(RECIPE + ".") and v.change is not None for v in found):
        text = (f"Recipes compared: {counts[0]} → {counts[1]} training replicates (`replicates.count`); the "
                f"`recipe*` intervals cover images, subjects and training seeds.")
    else:
        text = (f"**These verdicts are about these weights, not the recipe:** training noise is unmeasured "
                f"(`replicates.count` = {min(counts)} in one revision), and two seeds of one recipe differ. "
                f"No recipe verdict is given; set `replicates.count` ≥ 2 in both revisions to compare recipes.")
    if weight_level_verdicts:
        text += (" Weight-level verdicts were asked for (`--weight-level`): `lora`, `delta` and "
                 "`lora_scale_*` compare one trained LoRA per revision (intervals: images, subjects).")
    return f"> {text}"


def build_report(base_rev: str, *, root: Path | str = ".", out_path: Path | str = "report.md",
                 grid: Path = GRID, image_url: str | None = None, weight_level_verdicts: bool = False) -> str:
    """The report's Markdown text (nothing written)."""
    root = find_dvc_root(root)
    base_sha = resolve_rev(root, base_rev)
    head = _git(root, "rev-parse", "--short", "HEAD").stdout.strip() or "no commit"
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    head_label = f"workspace (HEAD `{head}`{', with uncommitted changes' if dirty else ''})"

    metrics_md = run_dvc(root, "metrics", "diff", "--md", base_rev)
    metrics_all = json.loads(run_dvc(root, "metrics", "diff", "--json", "--all", base_rev) or "{}")
    params_md = run_dvc(root, "params", "diff", "--md", base_rev)

    confidence = report_confidence(root)
    new_images = (root / EVAL_IMAGES).read_text() if (root / EVAL_IMAGES).is_file() else None
    old_images = _git(root, "show", f"{base_sha}:{EVAL_IMAGES.as_posix()}")
    entries = metrics_all.get(EVAL_METRICS) or {}
    pairing = Pairing(read_images_table(old_images.stdout if old_images.returncode == 0 else None),
                      read_images_table(new_images),
                      {k: e.get("old") for k, e in entries.items()}, {k: e.get("new") for k, e in entries.items()},
                      confidence)
    new_reps = (root / EVAL_REPLICATES).read_text() if (root / EVAL_REPLICATES).is_file() else None
    old_reps = _git(root, "show", f"{base_sha}:{EVAL_REPLICATES.as_posix()}")
    old_metrics = {k: e.get("old") for k, e in entries.items()}
    new_metrics = {k: e.get("new") for k, e in entries.items()}
    recipes = RecipePairing(read_replicate_table(old_reps.stdout if old_reps.returncode == 0 else None),
                            read_replicate_table(new_reps), pairing.old, pairing.new, old_metrics, new_metrics)
    found = verdicts(metrics_all, pairing, confidence=confidence, recipes=recipes,
                     weight_level_verdicts=weight_level_verdicts)
    lines = [f"## Impressionist LoRA: this change vs `{base_rev}`", "",
             f"Compared: `{base_rev}` (`{base_sha[:7]}`) → {head_label}.", ""]
    note = random_nets_note(root)
    if note:
        lines += [note, ""]
    lines += [f"### Verdicts ({EVAL_METRICS})", ""]
    if found:
        lines += [replicates_note(found, old_metrics, new_metrics, weight_level_verdicts), ""]
        headline = [v for v in found if v.metric.rpartition(".")[0] in HEADLINE_SECTIONS]
        rest = [v for v in found if v not in headline]
        lines += [f"{summary(found)}.", ""] + [v.line() for v in headline]
        if rest:  # base model and each LoRA scale: folded, the headline stays short
            lines += ["", f"<details><summary>base model and each LoRA scale ({summary(rest)})</summary>", ""]
            lines += [v.line() for v in rest] + ["", "</details>"]
        paired = ("per-image scores paired image by image across the two revisions"
                  if pairing.possible else f"per-image scores not paired: {pairing.reason}")
        level = bonferroni(confidence, sum(v.change is not None for v in found))
        covered = ("the `recipe*` intervals cover training seeds too, the others subjects, paintings and "
                   "per-image starting noise" if any(v.metric.startswith("recipe") and v.change is not None
                                                     for v in found)
                   else "intervals cover subjects, paintings and per-image starting noise, not training noise: "
                        "a verdict is about these weights")
        lines += ["", f"_A verdict is **better** or **worse** only when the confidence interval of the change "
                      f"excludes zero. The intervals are at {level:.2%} each, so that all "
                      f"{sum(v.change is not None for v in found)} verdicts together aim to call noise a change "
                      f"with at most {1 - confidence:.0%} chance (Bonferroni; {covered}) "
                      f"({paired}; KID and CMMD compare the two "
                      f"revisions' own intervals, conservatively). `fid` is biased at these sizes and not "
                      f"judged; intervals, counts and `real.*` (the validation paintings) are informational. "
                      f"See docs/evaluation.md._"]
    else:
        lines.append(f"_`{EVAL_METRICS}` has no scored metrics in either revision; run the pipeline "
                     f"(`dvc repro`) and commit `{EVAL_METRICS}`._")
    lines += ["", "### Metrics (`dvc metrics diff`)", "", _table_or(metrics_md, "_No metric changed._"),
              "", "### Params (`dvc params diff`)", "", _table_or(params_md, "_No param changed._"),
              "", "### Samples", "", grid_section(root, Path(grid), Path(out_path), image_url), ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m impressionist.report", description=__doc__.splitlines()[0])
    parser.add_argument("--base-rev", required=True, help="git revision to compare with, e.g. origin/main")
    parser.add_argument("--out", default="report.md", help="Markdown file to write ('-' for stdout)")
    parser.add_argument("--grid", default=str(GRID), help="sample grid PNG, relative to the repository root")
    parser.add_argument("--weight-level", action="store_true",
                        help="also judge lora, delta and lora_scale_* (one trained LoRA per revision: "
                             "about these weights, training noise left out)")
    parser.add_argument("--image-url", help="URL of the grid to link instead of a relative path (CI: the "
                                            "copy committed at the pull request's head)")
    return parser


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    text = build_report(args.base_rev, out_path=Path("report.md") if args.out == "-" else out,
                        grid=Path(args.grid), image_url=args.image_url,
                        weight_level_verdicts=args.weight_level)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(out, text)
        print(f"report: {out}")


if __name__ == "__main__":
    main()
