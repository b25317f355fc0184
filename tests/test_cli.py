"""The `impressionist` command: one subcommand per module a dvc.yaml stage runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from impressionist import cli

REPO = Path(__file__).resolve().parents[1]


def test_stages_are_the_commands_dvc_yaml_runs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    commands = {re.search(r"python -m impressionist ([\w-]+)", stage["cmd"]).group(1) for stage in stages.values()}
    assert set(cli.STAGES) == commands
    # each subcommand is named after its stage; `encode` runs both of its module's stages
    assert set(cli.STAGES) - {"encode"} <= set(stages)
    assert {n for n, s in stages.items() if "impressionist encode" in s["cmd"]} == {"encode_latents", "encode_text"}


@pytest.mark.parametrize("stage", sorted(cli.STAGES))
def test_each_stage_subcommand_runs_its_module(stage, monkeypatch):
    """`impressionist <stage> --params x` hands the rest of the line to that stage module's main."""
    called = []

    class Module:
        @staticmethod
        def main(rest):
            called.append(rest)

    monkeypatch.setattr(cli.importlib, "import_module", lambda name: called.append(name) or Module)
    monkeypatch.setattr(cli, "check_stage_args", lambda name, rest: called.append(("checked", name, rest)))
    cli.main([stage, "--params", "other.yaml"])
    # the params are checked first, then the module (and its heavy imports) is loaded
    assert called == [("checked", stage, ["--params", "other.yaml"]), cli.STAGES[stage], ["--params", "other.yaml"]]
