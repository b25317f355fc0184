"""``python -m impressionist <stage>`` (every dvc.yaml command) refuses a bad param before torch loads.

The params package imports no heavy library, and the stage entry checks the sections a stage reads
(``params.stages.STAGE_SECTIONS``) before it imports the stage module. The tests run the entry in a
subprocess whose import system refuses torch, diffusers and the other heavy libraries: a refusal that
came from the stage module itself would die on that import instead of printing the one line.
"""

from __future__ import annotations

import ast
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from impressionist import cli
from impressionist.params.stages import OPTION_SECTIONS, STAGE_SECTIONS, check_stage, sections_read

HEAVY = ("torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "open_clip", "pandas",
         "numpy", "PIL", "datasets", "dvc", "huggingface_hub", "safetensors")
BLOCKER = f"""
import importlib.abc, runpy, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError("heavy import before the params were checked: " + name)
sys.meta_path.insert(0, Refuse())
"""


def run_light(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def run_entry(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_light(f"sys.argv = ['impressionist', *{args!r}]\nrunpy.run_module('impressionist', run_name='__main__')",
                     cwd)


def test_the_params_package_imports_no_heavy_library(tmp_path):
    result = run_light("import pkgutil, importlib, impressionist.params as p\n"
                       "for m in pkgutil.walk_packages(p.__path__, 'impressionist.params.'):\n"
                       "    importlib.import_module(m.name)\n"
                       "print('imported', len(list(pkgutil.walk_packages(p.__path__))))", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported ")


def section_of(params: dict, dotted: str) -> dict:
    """The mapping of section ``dotted`` (an optional section left out is added, empty)."""
    node = params
    for part in dotted.split("."):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    return node


CASES = [(stage, (), section.SECTION) for stage, sections in STAGE_SECTIONS.items() for section in sections] + [
    (stage, (option,), section.SECTION) for (stage, option), sections in OPTION_SECTIONS.items() for section in sections]


@pytest.mark.parametrize("stage, options, section", CASES, ids=[" ".join([s, *o, n]) for s, o, n in CASES])
def test_each_stage_refuses_a_bad_setting_of_each_of_its_sections_before_any_heavy_import(
        demo_params, tmp_path, stage, options, section):
    bad = copy.deepcopy(demo_params)
    section_of(bad, section)["bogus_setting"] = 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = run_entry([stage, *options, "--params", "bad.yaml"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert f"'{section}.bogus_setting' is not a setting" in lines[0]


def test_a_bad_value_is_refused_by_the_entry_and_by_the_stage_module_alike(demo_params, tmp_path):
    """The early check is the stage's own check, not a second set of rules: the same line either way."""
    bad = copy.deepcopy(demo_params)
    bad["lora"]["rank"] = -1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    early = run_entry(["train", "--params", "bad.yaml"], tmp_path)
    late = subprocess.run([sys.executable, "-m", "impressionist.train", "--params", "bad.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert early.returncode == late.returncode == 2, (early.stderr, late.stderr)
    assert early.stderr == late.stderr
    assert "lora.rank=-1 must be a positive integer" in early.stderr


def test_the_early_check_accepts_the_demo_and_the_recipe(demo_params):
    """Both pass every stage's early check, with and without its options (with the test below, that each
    listed section is one the stage reads, this keeps the early check from refusing a run the stage takes)."""
    recipe = yaml.safe_load((REPO / "params.yaml").read_text())
    runs = [(stage, ()) for stage in STAGE_SECTIONS] + [(stage, (option,)) for stage, option in OPTION_SECTIONS]
    for stage, options in runs:
        check_stage(stage, demo_params, options)
        check_stage(stage, recipe, options)


def checked_in_file(path: Path) -> set[str]:
    """The sections (class names) a file checks: each ``XParams.check(...)`` call."""
    tree = ast.parse(path.read_text())
    return {node.func.value.id for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "check"
            and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("Params")}


def checked_in_module(module: str) -> set[str]:
    """The sections a stage module checks itself."""
    return checked_in_file((REPO / "src" / Path(*module.split("."))).with_suffix(".py"))


def checked_in_closure(module: str) -> set[str]:
    """The sections checked anywhere the stage module's code reaches (its import closure)."""
    from test_dvc_deps import SRC, import_closure

    return set().union(*(checked_in_file(SRC / name) for name in import_closure(module)))


@pytest.mark.parametrize("stage", sorted(STAGE_SECTIONS))
def test_the_early_check_covers_every_section_the_stage_module_checks(stage):
    listed = {cls.__name__ for cls in STAGE_SECTIONS[stage]}
    missing = checked_in_module(cli.COMMANDS[stage]) - listed
    assert not missing, f"params/stages.py: add {sorted(missing)} to STAGE_SECTIONS[{stage!r}]"


@pytest.mark.parametrize("stage, options", [(s, ()) for s in sorted(STAGE_SECTIONS)] + [(s, (o,)) for s, o in OPTION_SECTIONS])
def test_the_early_check_lists_only_sections_the_stage_reads(stage, options):
    """A section the stage never checks must not be checked early: that would refuse a run the stage
    itself accepts (e.g. a `replicates` section that evaluate does not read)."""
    listed = {cls.__name__ for cls in sections_read(stage, options)}
    unread = listed - checked_in_closure(cli.COMMANDS[stage])
    assert not unread, f"params/stages.py lists {sorted(unread)} for {stage} {' '.join(options)}, which it never checks"


def test_an_option_changes_the_sections_checked(demo_params, tmp_path):
    """`sample --replicates` reads `replicates` only: a bad `sample` section is the plain run's problem."""
    bad = copy.deepcopy(demo_params)
    bad["sample"]["bogus_setting"] = 1
    bad["replicates"] = {"count": 1}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    refused = run_entry(["sample", "--params", "bad.yaml"], tmp_path)
    assert refused.returncode == 2 and "'sample.bogus_setting' is not a setting" in refused.stderr
    with_option = run_entry(["sample", "--replicates", "--params", "bad.yaml"], tmp_path)
    # past the early check: the stage module is imported, which the blocked torch stops
    assert with_option.returncode == 1 and "heavy import before the params were checked: " in with_option.stderr


def test_every_dvc_stage_runs_through_the_checking_entry():
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        words = stage["cmd"].split()
        assert words[:3] == ["python", "-m", "impressionist"], f"stage {name}: {stage['cmd']}"
        assert words[3] in STAGE_SECTIONS, f"stage {name}: `{words[3]}` has no early params check"
