"""A Markdown report of a change for a pull request: metrics and params diff, sample grid, verdicts.

``python -m impressionist.report --base-rev origin/main --out report.md`` compares the workspace
(in CI: the pull request's head commit) with the base revision through DVC:

* ``dvc metrics diff --md <base-rev>`` and ``dvc params diff --md <base-rev>``, verbatim;
* one verdict line per directional metric of ``metrics/eval.json``, from
  ``dvc metrics diff --json --all <base-rev>``: lower is better for ``fid`` and ``kid_mean``, higher
  is better for ``clip_score`` and ``style_score`` (:data:`DIRECTIONS`); "better", "worse" or
  "unchanged" (or "new" / "removed" when one side has no value), by the numbers alone (no
  significance test; the report says so). ``kid_std``, counts, the LoRA
  scale and ``real.*`` (the validation paintings, a reference rather than a result) are
  informational: they are in the table, without a verdict;
* the sample grid ``plots/samples_grid.png``, as a relative image link, or as ``--image-url``
  (the CI workflow links the copy committed at the pull request's head).

Everything it reads is tracked by git (metrics and plots are ``cache: false`` outs), so it needs
no ``dvc pull``. It runs nothing of the pipeline and loads no model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .dvc_cli import run_dvc
from .errors import UserError, atomic_write_text, stage_main
from .layout import SAMPLE_GRID as GRID

EVAL_METRICS = "metrics/eval.json"
LOWER, HIGHER = "lower", "higher"
DIRECTIONS = {"fid": LOWER, "kid_mean": LOWER, "clip_score": HIGHER, "style_score": HIGHER}
# Sections of eval.json in reading order: the headline first, the reference never judged.
SECTION_ORDER = ("lora", "delta", "base")
HEADLINE_SECTIONS = ("lora", "delta")  # shown first; base and lora_scale_<s> are folded
INFORMATIONAL_SECTIONS = ("real",)
BETTER, WORSE, UNCHANGED, NEW, REMOVED = "better", "worse", "unchanged", "new", "removed"


# --------------------------------------------------------------------------------------------
# Verdicts (pure functions of the diff)
# --------------------------------------------------------------------------------------------


def direction(metric: str) -> str | None:
    """``"lower"`` / ``"higher"`` is better for a flattened eval.json name, None if informational."""
    section, _, leaf = metric.rpartition(".")
    if section in INFORMATIONAL_SECTIONS:
        return None
    return DIRECTIONS.get(leaf)


def verdict(metric: str, old: float | None, new: float | None) -> str:
    """better / worse / unchanged (or new / removed) for a directional metric."""
    way = direction(metric)
    if way is None:
        raise ValueError(f"{metric} has no better/worse direction")
    if old is None and new is None:
        return UNCHANGED
    if old is None:
        return NEW
    if new is None:
        return REMOVED
    if math.isclose(float(new), float(old), rel_tol=1e-9, abs_tol=1e-12):
        return UNCHANGED
    lower = float(new) < float(old)
    return BETTER if lower == (way == LOWER) else WORSE


@dataclass(frozen=True)
class Verdict:
    metric: str
    old: float | None
    new: float | None
    word: str

    def line(self) -> str:
        def show(value: float | None) -> str:
            return "–" if value is None else f"{value:.6g}"

        change = ""
        if self.old is not None and self.new is not None and self.word != UNCHANGED:
            change = f" ({float(self.new) - float(self.old):+.4g})"
        return (f"- `{self.metric}`: {show(self.old)} → {show(self.new)}{change} — **{self.word}** "
                f"({direction(self.metric)} is better)")


def _order(metric: str) -> tuple[int, str, int]:
    section, _, leaf = metric.rpartition(".")
    rank = SECTION_ORDER.index(section) if section in SECTION_ORDER else len(SECTION_ORDER)
    return rank, section, list(DIRECTIONS).index(leaf)


def verdicts(diff: Mapping[str, Any], path: str = EVAL_METRICS) -> list[Verdict]:
    """One verdict per directional metric of ``path`` in ``dvc metrics diff --json [--all]`` output."""
    entries = diff.get(path) or {}
    found = [Verdict(name, entry.get("old"), entry.get("new"), verdict(name, entry.get("old"), entry.get("new")))
             for name, entry in entries.items() if direction(name) is not None]
    return sorted(found, key=lambda v: _order(v.metric))


def summary(items: Sequence[Verdict]) -> str:
    counts = {word: sum(v.word == word for v in items) for word in (BETTER, WORSE, UNCHANGED, NEW, REMOVED)}
    return ", ".join(f"{n} {word}" for word, n in counts.items() if n)


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


def random_nets_note(root: Path) -> str | None:
    """The demo's feature nets and model are random: say so next to its verdicts."""
    try:
        params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    evaluate, model = params.get("evaluate") or {}, params.get("model") or {}
    builtin = [f"{key}={value}" for key, value in (
        ("model.pretrained", model.get("pretrained")), ("evaluate.fid_features", evaluate.get("fid_features")),
        ("evaluate.clip_model", evaluate.get("clip_model"))) if str(value or "").startswith("builtin:")]
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


def build_report(base_rev: str, *, root: Path | str = ".", out_path: Path | str = "report.md",
                 grid: Path = GRID, image_url: str | None = None) -> str:
    """The report's Markdown text (nothing written)."""
    root = find_dvc_root(root)
    base_sha = resolve_rev(root, base_rev)
    head = _git(root, "rev-parse", "--short", "HEAD").stdout.strip() or "no commit"
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    head_label = f"workspace (HEAD `{head}`{', with uncommitted changes' if dirty else ''})"

    metrics_md = run_dvc(root, "metrics", "diff", "--md", base_rev)
    metrics_all = json.loads(run_dvc(root, "metrics", "diff", "--json", "--all", base_rev) or "{}")
    params_md = run_dvc(root, "params", "diff", "--md", base_rev)

    found = verdicts(metrics_all)
    lines = [f"## Impressionist LoRA: this change vs `{base_rev}`", "",
             f"Compared: `{base_rev}` (`{base_sha[:7]}`) → {head_label}.", ""]
    note = random_nets_note(root)
    if note:
        lines += [note, ""]
    lines += [f"### Verdicts ({EVAL_METRICS})", ""]
    if found:
        headline = [v for v in found if v.metric.rpartition(".")[0] in HEADLINE_SECTIONS]
        rest = [v for v in found if v not in headline]
        lines += [f"{summary(found)}.", ""] + [v.line() for v in headline]
        if rest:  # base model and each LoRA scale: folded, the headline stays short
            lines += ["", f"<details><summary>base model and each LoRA scale ({summary(rest)})</summary>", ""]
            lines += [v.line() for v in rest] + ["", "</details>"]
        lines += ["", "_Verdicts compare the numbers only, without a significance test (a KID change smaller "
                      "than `kid_std` is within noise). `kid_std`, image counts and `real.*` (the validation "
                      "paintings) are informational._"]
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
    parser.add_argument("--image-url", help="URL of the grid to link instead of a relative path (CI: the "
                                            "copy committed at the pull request's head)")
    return parser


@stage_main
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    text = build_report(args.base_rev, out_path=Path("report.md") if args.out == "-" else out,
                        grid=Path(args.grid), image_url=args.image_url)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(out, text)
        print(f"report: {out}")


if __name__ == "__main__":
    main()
