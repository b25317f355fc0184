"""``impressionist <stage>`` runs one stage; ``impressionist demo`` runs the whole graph offline.

``python -m impressionist <stage>`` is the same command (dvc.yaml's): the stage's params sections are
checked before its module (and with it torch and diffusers) is imported, so a bad value is refused at once.

The demo is a DVC experiment of the unchanged ``dvc.yaml`` with the overrides in
``configs/demo.yaml`` (a tiny random-weight Flux-architecture model built locally, a SYNTHETIC
WikiArt-schema source and a tiny random-weight VLM for the descriptions), so ``dvc exp show`` lists it beside real runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, stage_main
from .layout import CHECKPOINT_ROOT
from .params.stages import check_stage_args

# Every module a dvc.yaml stage runs (sample_base is `sample --base`), in graph order.
STAGES = {
    "download": "impressionist.download", "filter": "impressionist.filter",
    "describe": "impressionist.describe", "caption": "impressionist.caption", "encode": "impressionist.encode",
    "train": "impressionist.train", "export": "impressionist.export",
    "sample": "impressionist.sample", "reference": "impressionist.reference", "evaluate": "impressionist.evaluate",
}
COMMANDS = {**STAGES, "publish": "impressionist.publish", "report": "impressionist.report",
            "pin-model": "impressionist.pin_model", "space": "impressionist.space",
            "clean-checkpoints": "impressionist.checkpoints", "generate": "impressionist.generate"}
DEMO_OVERRIDES = Path("configs/demo.yaml")


def demo_overrides(path: Path = DEMO_OVERRIDES) -> dict[str, Any]:
    if not Path(path).is_file():
        raise UserError(f"{path} not found; run `impressionist demo` from the repository root")
    return yaml.safe_load(Path(path).read_text())


def apply_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """What ``dvc exp run -S section.key=value`` does to params.yaml, for tests and dry runs."""
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise UserError(f"override {dotted}: params.yaml has no such key")
        node[leaf] = value
    return params


def hydra_value(value: Any) -> str:
    """Render a value in the Hydra override syntax that ``dvc exp run -S`` parses."""
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def demo_command(overrides: dict[str, Any], name: str | None) -> list[str]:
    command = ["dvc", "exp", "run"]
    if name:
        command += ["--name", name]
    for key, value in overrides.items():
        command += ["-S", f"{key}={hydra_value(value)}"]
    return command


def run_demo(name: str | None, dry_run: bool) -> int:
    overrides = demo_overrides()
    command = demo_command(overrides, name)
    print("demo: " + " ".join(command))
    print("demo: SYNTHETIC throughout: a random-weight tiny Flux, procedurally painted images, and descriptions "
          "from builtin:tiny-vlm, a random-weight VLM whose text is gibberish (synthetic_model in "
          "data/descriptions); the numbers only show that the pipeline runs")
    if dry_run:
        return 0
    if subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True).returncode:
        raise UserError("`dvc exp run` needs a git repository with at least one commit; run "
                        "`git init && git add -A && git commit -m init` first")
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    # Stage commands call `python`: make it the interpreter this command runs in.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    dvc = shutil.which("dvc", path=env["PATH"]) or "dvc"
    return subprocess.run([dvc, *command[1:]], env=env).returncode


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="impressionist", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the whole graph offline as a DVC experiment")
    demo.add_argument("--name", help="experiment name (default: DVC picks one)")
    demo.add_argument("--dry-run", action="store_true", help="print the dvc command only")
    for stage in STAGES:
        commands.add_parser(stage, help=f"run the {stage} stage", add_help=False)
    commands.add_parser("publish", add_help=False, help="upload the LoRA and model card to the Hub")
    commands.add_parser("space", add_help=False,
                        help="write the Gradio app as a Hugging Face Space folder (--dry-run) or deploy it")
    commands.add_parser("report", add_help=False,
                        help="write the pull-request report (metrics/params diff, grid, verdicts)")
    commands.add_parser("generate", add_help=False,
                        help="draw one image with the LoRA (the sample stage's inference settings)")
    commands.add_parser("pin-model", add_help=False,
                        help="write the commit model.revision names now into params.yaml")
    commands.add_parser("clean-checkpoints", add_help=False,
                        help=f"remove the training checkpoints of earlier runs ({CHECKPOINT_ROOT})")
    # Stage commands parse their own options (the rest); the demo has none beyond its own.
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        if rest:
            demo.error(f"unrecognized arguments: {' '.join(rest)}")
        sys.exit(run_demo(args.name, args.dry_run))
    check_stage_args(args.command, rest)  # before the stage's heavy imports
    importlib.import_module(COMMANDS[args.command]).main(rest)


if __name__ == "__main__":
    main()
