"""Seconds from a stage's command to its `error:` line when params.yaml holds a bad value.

    python benchmarks/bench_param_refusal.py                     # every stage, 5 repeats
    python benchmarks/bench_param_refusal.py --repeats 3 --out benchmarks/RESULTS.md

For each stage of ``params.stages.STAGE_SECTIONS`` it writes a copy of the committed params.yaml with
one unknown setting in the stage's first section (``train``: ``lora.rank: -1`` instead) and times, in a
fresh interpreter each time (``--repeats`` times, in an empty folder, output discarded):

- **entry**: ``python -m impressionist <stage>``, dvc.yaml's command: the params sections are checked
  before the stage module is imported;
- **module**: ``python -m impressionist.<module>``, the stage module itself, which imports torch,
  diffusers and the rest before its own check.

Each row gives the median and the min–max of the wall time over the repeats (the spread covers the
machine's noise across runs of the same command, nothing else), and checks that both commands print the
same one `error:` line and exit with 2.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from results_file import command_line, publish

from impressionist.cli import COMMANDS
from impressionist.params.stages import STAGE_SECTIONS

REPO = Path(__file__).resolve().parents[1]
EXTRA_ARGS = {"generate": ["a field", "--out", "out.png"]}  # its required arguments


def bad_params(stage: str) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    bad = copy.deepcopy(params)
    if stage == "train":
        bad["lora"]["rank"] = -1
        return bad
    node = bad
    for part in STAGE_SECTIONS[stage][0].SECTION.split("."):
        node = node.setdefault(part, {})
    node["bogus_setting"] = 1
    return bad


def timed(command: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    return time.perf_counter() - started, result


def spread(seconds: list[float]) -> str:
    return f"{statistics.median(seconds):.2f} ({min(seconds):.2f}–{max(seconds):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stages", nargs="*", default=sorted(STAGE_SECTIONS))
    parser.add_argument("--out", help="append the table to this Markdown file")
    args = parser.parse_args()
    lines = [f"### Refusal of a bad param ({dt.date.today()}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores; `{command_line(__file__)}`)", "",
             f"Wall seconds, median (min–max) over {args.repeats} fresh interpreters per command.", "",
             "| stage | bad value | entry `python -m impressionist <stage>` | module `python -m impressionist.<module>` | same line |",
             "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        for stage in args.stages:
            (cwd / "bad.yaml").write_text(yaml.safe_dump(bad_params(stage)))
            entry, module, errors = [], [], set()
            for _ in range(args.repeats):
                for times, command in ((entry, [sys.executable, "-m", "impressionist", stage]),
                                       (module, [sys.executable, "-m", COMMANDS[stage]])):
                    seconds, result = timed([*command, *EXTRA_ARGS.get(stage, []), "--params", "bad.yaml"], cwd)
                    if result.returncode != 2 or not result.stderr.startswith("error: "):
                        raise SystemExit(f"{' '.join(command)}: exit {result.returncode}, not a refusal:\n"
                                         f"{result.stderr[-2000:]}")
                    times.append(seconds)
                    errors.add(result.stderr.strip())
            what = "lora.rank: -1" if stage == "train" else f"{STAGE_SECTIONS[stage][0].SECTION}.bogus_setting"
            lines.append(f"| {stage} | `{what}` | {spread(entry)} | {spread(module)} | {'yes' if len(errors) == 1 else 'NO'} |")
            print(lines[-1], flush=True)
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
