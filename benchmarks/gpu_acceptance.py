"""GPU acceptance: every GPU path of the project at full FLUX.1-dev size on one H100/H200, in under
10 minutes, with random weights (nothing downloaded: the machine needs no Hub access).

    bash benchmarks/gpu_acceptance.sh             # run every step, write benchmarks/RESULTS.md
    bash benchmarks/gpu_acceptance.sh --dry-run   # the plan: each step, its command, its time (any machine)
    bash benchmarks/gpu_acceptance.sh --only inference,sample   # some steps again (their inputs must exist)

The steps run in order, each its own process (logs in ``<work>/logs``); the first that fails stops
the run, which exits non-zero naming it. Each step's table, and a summary of the steps with their
times, are appended to ``benchmarks/RESULTS.md`` under a heading that says they were measured on a
GPU (a failed run's tables too, marked so). Steps reuse the benchmark scripts' own profiles:
``bench_train_step.py --profile gpu`` (bf16 + gradient checkpointing at 512² and 1024², NF4 at
1024²: s/step, peak ``torch.cuda.max_memory_allocated``, MFU against the bf16 peak),
``bench_inference.py --profile gpu`` (bf16, fp8, NF4: s/image, s/step, peak memory, utilisation
against the bf16 FLOP count), ``bench_gpu_stages.py`` (encode, the sample stages' evaluation set,
the evaluation's feature extraction, through the stages' own code; ``sample-dp``: the sample_base
command on every visible GPU vs one, byte-identical images).

Adding a step (e.g. a data-parallel stage): append a :class:`Step` to :func:`plan`. A step that
runs a benchmark script names it and its arguments; the dry run checks those arguments against
the script's own parser (``build_parser()``), so a renamed option fails in CI, not on the GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "RESULTS.md"
TARGET_S = 600  # the whole run on one H100/H200
GPU_PROBE = ("import sys, torch\n"
             "if not torch.cuda.is_available(): sys.exit('error: no CUDA GPU is visible')\n"
             "p = torch.cuda.get_device_properties(0)\n"
             "print(f'{p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, '\n"
             "      f'torch {torch.__version__}, CUDA {torch.version.cuda}')\n")


@dataclass(frozen=True)
class Step:
    """One step: ``script`` (a file in benchmarks/, checked by its build_parser()) with ``args``,
    or ``code`` for ``python -c``; ``expected_s`` is its share of the 10 minutes (it is stopped at
    :meth:`timeout_s`); ``table`` names the Markdown file it writes through ``--out``."""

    name: str
    checks: str
    expected_s: int
    script: str | None = None
    args: tuple[str, ...] = ()
    code: str | None = None
    table: str | None = None

    def timeout_s(self) -> int:
        return max(60, 3 * self.expected_s)  # slack for a slower GPU or a cold disk cache

    def command(self) -> list[str]:
        if self.code is not None:
            return [sys.executable, "-c", self.code]
        return [sys.executable, str(BENCHMARKS / self.script), *self.args]


def plan(work: Path) -> list[Step]:
    """Every step, in order; each later one may use what an earlier one wrote under ``work``."""
    weights, tables, stages = work / "random", work / "tables", work / "stages"
    model, lora, features = str(weights / "model"), str(weights / "lora"), str(weights / "features")

    def out(name: str) -> tuple[str, str]:
        return "--out", str(tables / f"{name}.md")

    return [
        Step("gpu", "a CUDA GPU is visible: its name, compute capability and memory", 10, code=GPU_PROBE),
        Step("random-weights", "FLUX.1-dev's four networks (11.9B transformer, T5-XXL, CLIP-L, VAE) with random bf16 "
             "weights saved as a diffusers folder, a rank-16 all-linear-blocks LoRA, random Inception and ViT-L-14(-336) "
             "checkpoints", 70, "random_flux.py", (str(weights),)),
        Step("train-step", "the trainer's LoRA step at full size: bf16 + gradient checkpointing at 512² and 1024², NF4 "
             "at 1024² (the recipe's all-linear-blocks rank 16 + EMA): s/step, peak memory, MFU", 90, "bench_train_step.py",
             ("--profile", "gpu", "--resolutions", "512", "1024", "--cases", "512px+ckpt", "1024px+ckpt",
              "1024px+ckpt+nf4", "--targets", "all-linear-blocks", "--ema", "--steps", "5", "--warmup", "2", *out("train-step")),
             table="train-step"),
        Step("inference", "inference.build_pipeline at 1024², 20 steps, the LoRA as an adapter: bf16, fp8 (torchao) and "
             "NF4 (bitsandbytes): s/image, s/step, peak memory, utilisation", 150, "bench_inference.py",
             ("--profile", "gpu", "--base-model", model, "--lora", lora, "--clip-model", "ViT-L-14",
              "--clip-pretrained", str(weights / "features/ViT-L-14.pt"), "--cases", "reference,fp8,nf4",
              "--images", "3", "--steps", "20", *out("inference")), table="inference"),
        Step("encode", "the encode stage: 16 SYNTHETIC 1024² images at the recipe's [512, 768, 1024], T5 length 512",
             60, "bench_gpu_stages.py", ("encode", "--work", str(stages), "--model", model, "--images", "16",
                                         *out("encode")), table="encode"),
        Step("sample", "sample_base and sample (LoRA adapter): one 1024² show image and an 8-subject evaluation set "
             "at the recipe's 512², 20 steps", 80, "bench_gpu_stages.py",
             ("sample", "--work", str(stages), "--model", model, "--lora", lora, "--subjects", "8", *out("sample")),
             table="sample"),
        Step("sample-data-parallel", "the sample_base stage's own command on every visible GPU "
             "(compute.num_processes) vs 1: s/image of a 16-subject evaluation set, images byte-identical", 120,
             "bench_gpu_stages.py", ("sample-dp", "--work", str(stages), "--model", model, "--subjects", "16",
                                     "--processes", "auto", *out("sample-data-parallel")),
             table="sample-data-parallel"),
        Step("evaluate-features", "the evaluation's feature extraction (Inception, CLIP ViT-L-14, CMMD's ViT-L-14-336) "
             "over the drawn evaluation set", 20, "bench_gpu_stages.py",
             ("features", "--work", str(stages), "--features", features, *out("evaluate-features")),
             table="evaluate-features"),
    ]


def check_arguments(step: Step) -> None:
    """The step's arguments parse with its script's own parser (nothing runs)."""
    if step.script is None:
        compile(step.code, step.name, "exec")
        return
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    module = importlib.import_module(Path(step.script).stem)
    module.build_parser().parse_args(list(step.args))


def print_plan(steps: list[Step], work: Path) -> None:
    total = sum(s.expected_s for s in steps)
    print(f"GPU acceptance plan: {len(steps)} steps, about {total} s expected (target under {TARGET_S} s on one "
          f"H100/H200); work folder {work}; tables appended to {RESULTS.relative_to(REPO)}")
    for number, step in enumerate(steps, 1):
        print(f"{number}. {step.name} — expected {step.expected_s} s (stopped at {step.timeout_s()} s): {step.checks}")
        shown = step.command()
        print("   $ " + (" ".join(shown[:2]) + " <GPU probe>" if step.code else " ".join(shown)))


def run_step(step: Step, work: Path, env: dict[str, str]) -> tuple[int, float, Path]:
    log = work / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        try:
            code = subprocess.run(step.command(), cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=step.timeout_s()).returncode
        except subprocess.TimeoutExpired:
            handle.write(f"\nerror: stopped after {step.timeout_s()} s ({step.expected_s} s expected)\n")
            code = 124
    return code, time.perf_counter() - start, log


def results_section(steps: list[Step], outcomes: dict[str, tuple[str, float]], work: Path, gpu: str) -> str:
    failed = any(status != "ok" for status, _ in outcomes.values())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    lines = [f"## GPU acceptance run — {gpu}, {dt.date.today()} (measured on a GPU{'; FAILED, partial' if failed else ''})",
             "", f"`bash benchmarks/gpu_acceptance.sh` at commit {commit}: random weights at full FLUX.1-dev size. "
             "Every figure in this section was measured on this GPU (timings, `torch.cuda.max_memory_allocated`); "
             "compare the peaks with the estimate profile's tables above.", "",
             "| step | status | seconds | expected s | checks |", "|---|---|---|---|---|"]
    for step in steps:
        status, seconds = outcomes.get(step.name, ("not run", float("nan")))
        lines.append(f"| {step.name} | {status} | {seconds:.0f} | {step.expected_s} | {step.checks} |")
    lines.append(f"| total | | {sum(s for _, s in outcomes.values() if s == s):.0f} | "
                 f"{sum(s.expected_s for s in steps)} | target under {TARGET_S} s |")
    for step in steps:
        table = work / "tables" / f"{step.table}.md" if step.table else None
        if table is not None and table.is_file():
            lines += ["", table.read_text().strip()]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check every step's arguments")
    parser.add_argument("--only", help="comma-separated step names to run (default: all, in order)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "impressionist-gpu-acceptance",
                        help="where the random weights, the stages' outputs, tables and logs go")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file the tables are appended to")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    steps = plan(args.work)
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {s.name for s in steps})
        if unknown:
            sys.exit(f"error: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(s.name for s in steps)}")
        steps = [s for s in steps if s.name in names]
    if args.dry_run:
        print_plan(steps, args.work)
        for step in steps:
            check_arguments(step)
        print(f"dry run: the arguments of all {len(steps)} steps parse; nothing was run")
        return 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
               IMPRESSIONIST_CACHE=str(args.work / "cache"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    (args.work / "tables").mkdir(parents=True, exist_ok=True)
    for step in steps:  # a rerun's tables replace the last ones
        if step.table:
            (args.work / "tables" / f"{step.table}.md").unlink(missing_ok=True)
    outcomes: dict[str, tuple[str, float]] = {}
    gpu, failure = "unknown GPU", None
    for step in steps:
        print(f"gpu acceptance: {step.name} (expected {step.expected_s} s) ...", flush=True)
        code, seconds, log = run_step(step, args.work, env)
        outcomes[step.name] = ("ok" if code == 0 else f"FAILED (exit {code})", seconds)
        if step.name == "gpu" and code == 0:
            gpu = log.read_text().strip().splitlines()[-1]
        print(f"gpu acceptance: {step.name} {'ok' if code == 0 else 'FAILED'} in {seconds:.0f} s", flush=True)
        if code != 0:
            tail = "\n".join(log.read_text().strip().splitlines()[-15:])
            print(tail, file=sys.stderr)
            failure = f"error: gpu acceptance step {step.name!r} failed (exit {code}); its log: {log}"
            break
    if "gpu" not in outcomes:  # a partial rerun: name the GPU all the same
        probe = subprocess.run([sys.executable, "-c", GPU_PROBE], capture_output=True, text=True, env=env)
        gpu = probe.stdout.strip() or gpu
    with args.results.open("a") as handle:
        handle.write("\n" + results_section(steps, outcomes, args.work, gpu))
    total = sum(s for _, s in outcomes.values())
    if failure:
        print(failure, file=sys.stderr)
        return 1
    print(f"gpu acceptance: all {len(steps)} steps passed in {total:.0f} s (target under {TARGET_S} s); "
          f"tables appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
