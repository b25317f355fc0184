"""dvc.yaml's deps match the code: a stage re-runs whenever code it runs, or data it reads, changes.

Each stage's import closure inside the package is derived from the source alone (AST, nothing is
imported or run): the stage module is the one ``python -m impressionist <stage>`` of its cmd runs
(``cli.COMMANDS``; ``python -m impressionist.X`` names it directly), and every
``import impressionist.x``, ``from impressionist import x``, ``from impressionist.x import y`` and
relative ``from .x import y`` / ``from . import x`` is followed, including imports inside
functions (the late ones that keep heavy libraries out of start-up). dvc.yaml must list exactly
those ``src/impressionist/*.py`` files as the stage's deps, no fewer and no more. Its data deps are
checked against the ``layout.py`` paths the same closure imports (see READS below).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "impressionist"
SRC = REPO / "src" / PACKAGE

# Plumbing that every stage imports and that does not change what a stage computes; listing it
# would re-run the whole graph for a reworded error message. Each stays out of dvc.yaml.
# The sections (params/data.py, params/training.py, ...) are not plumbing: their defaults and
# choices (e.g. the LoRA target presets) shape what a stage computes, so each stage lists those it imports.
ALLOWED_UNLISTED = {
    "__init__.py",         # the package marker (version string, a logging level)
    "errors.py",           # the one-line `error:` wrapper and atomic writes
    "params/__init__.py",  # reading and validating params.yaml (DVC tracks the values themselves)
    "layout.py",           # output paths, which dvc.yaml names itself as deps and outs
}
# The stage entry (`python -m impressionist <stage>`: __main__.py, cli.py, params/stages.py) checks the
# stage's params sections early and imports the stage module; it computes nothing, so a stage's closure
# starts at the stage module and the entry is no dep.


def module_file(module: str) -> Path | None:
    """``impressionist.x`` -> src/impressionist/x.py (None for modules outside the package)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return SRC / "__init__.py"
    path = SRC.joinpath(*parts[1:])
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"


def imported_modules(path: Path) -> set[str]:
    """Dotted names of the package modules ``path`` imports anywhere (functions included)."""
    # a relative import resolves against the file's package: its folder (an __init__.py's own package)
    package = ".".join([PACKAGE, *path.relative_to(SRC).parent.parts])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from impressionist import x` / `from . import x` may name submodules
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if (file := module_file(name)) is not None and file.is_file()}


def import_chains(module: str) -> dict[str, list[str]]:
    """Each file (relative to src/impressionist) that ``module`` imports, directly or not, with the
    shortest chain of files that leads to it (the stage module's own file first)."""
    start = module_file(module).relative_to(SRC).as_posix()
    chains = {start: [start]}
    todo = [start]
    while todo:  # breadth first: the chains are shortest
        current = todo.pop(0)
        for name in sorted(imported_modules(SRC / current)):
            found = module_file(name).relative_to(SRC).as_posix()
            if found not in chains:
                chains[found] = chains[current] + [found]
                todo.append(found)
    return chains


def import_closure(module: str) -> set[str]:
    """File names (relative to src/impressionist) of ``module`` and everything it imports."""
    return set(import_chains(module))


def stage_module(cmd: str) -> str:
    """The module a stage's cmd runs: ``python -m impressionist <stage>`` or ``python -m impressionist.X``."""
    entry = re.search(rf"python -m {PACKAGE} ([\w-]+)", cmd)
    if entry:
        commands = entry_commands()
        assert entry.group(1) in commands, f"stage cmd {cmd!r}: `{entry.group(1)}` is not a command of cli.py"
        return commands[entry.group(1)]
    match = re.search(rf"python -m ({PACKAGE}(?:\.\w+)+)", cmd)
    assert match, f"stage cmd {cmd!r} does not run `python -m {PACKAGE} <stage>` or `python -m {PACKAGE}.<module>`"
    return match.group(1)


def entry_commands() -> dict[str, str]:
    """cli.py's COMMANDS (command -> module), read from its source like everything here."""
    tree = ast.parse((SRC / "cli.py").read_text())
    values: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            name = node.targets[0].id
            merged: dict[str, str] = {}
            for key, value in zip(node.value.keys, node.value.values):
                if key is None:  # **STAGES
                    merged.update(values[value.id])
                else:
                    merged[key.value] = value.value
            values[name] = merged
    return values["COMMANDS"]


def code_deps(stage: dict) -> set[str]:
    prefix = f"src/{PACKAGE}/"
    deps = [next(iter(d)) if isinstance(d, dict) else d for d in stage.get("deps", [])]
    return {d[len(prefix):] for d in deps if d.startswith(prefix)}


def stage_mismatches(dvc_yaml: dict) -> list[str]:
    """One line per missing or extra src file of each stage, saying what to change in dvc.yaml."""
    problems = []
    for name, stage in dvc_yaml["stages"].items():
        chains = import_chains(stage_module(stage["cmd"]))
        needed = set(chains) - ALLOWED_UNLISTED
        listed = code_deps(stage)
        paths = [next(iter(d)) if isinstance(d, dict) else d for d in stage.get("deps", [])]
        for twice in sorted({p for p in paths if paths.count(p) > 1}):
            problems.append(f"stage {name}: list `- {twice}` once in its deps in dvc.yaml")
        for missing in sorted(needed - listed):
            problems.append(f"stage {name}: add `- src/{PACKAGE}/{missing}` to its deps in dvc.yaml "
                            f"(imported: {' -> '.join(chains[missing])})")
        for extra in sorted(listed - needed):
            why = ("it is allow-listed plumbing, see ALLOWED_UNLISTED in tests/test_dvc_deps.py"
                   if extra in ALLOWED_UNLISTED else f"{stage_module(stage['cmd'])} never imports it")
            problems.append(f"stage {name}: remove `- src/{PACKAGE}/{extra}` from its deps in dvc.yaml ({why})")
    return problems


def test_every_stage_lists_exactly_the_package_files_it_imports():
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    problems = stage_mismatches(dvc_yaml)
    assert not problems, "dvc.yaml code deps do not match the imports:\n" + "\n".join(problems)


def test_closure_follows_every_import_form(tmp_path, monkeypatch):
    """The walker sees absolute, relative, submodule and function-level imports (and says so)."""
    package = tmp_path / "src" / PACKAGE
    package.mkdir(parents=True)
    files = {
        "__init__.py": "",
        "stage.py": "from .a import x\nimport impressionist.b\n\ndef late():\n    from impressionist import c\n",
        "a.py": "from . import d\nimport os\n",
        "b.py": "from impressionist.e import y\n",
        "c.py": "", "d.py": "", "e.py": "", "unused.py": "import impressionist.stage\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    monkeypatch.setattr(__import__(__name__), "SRC", package)
    assert import_closure(f"{PACKAGE}.stage") == {"__init__.py", "stage.py", "a.py", "b.py", "c.py", "d.py",
                                                  "e.py"}
    lines = stage_mismatches({"stages": {"s": {"cmd": f"python -m {PACKAGE}.stage --x", "deps": [
        f"src/{PACKAGE}/stage.py", f"src/{PACKAGE}/a.py", f"src/{PACKAGE}/b.py", f"src/{PACKAGE}/c.py",
        f"src/{PACKAGE}/e.py", f"src/{PACKAGE}/unused.py", f"src/{PACKAGE}/errors.py", "data/raw", f"src/{PACKAGE}/c.py"]}}})
    assert lines == [
        f"stage s: list `- src/{PACKAGE}/c.py` once in its deps in dvc.yaml",
        f"stage s: add `- src/{PACKAGE}/d.py` to its deps in dvc.yaml (imported: stage.py -> a.py -> d.py)",
        f"stage s: remove `- src/{PACKAGE}/errors.py` from its deps in dvc.yaml (it is allow-listed plumbing, see "
        "ALLOWED_UNLISTED in tests/test_dvc_deps.py)",
        f"stage s: remove `- src/{PACKAGE}/unused.py` from its deps in dvc.yaml ({PACKAGE}.stage never imports it)",
    ]


# --------------------------------------------------------------------------------------------
# Data deps: each stage's non-code deps cover the data its code reads
# --------------------------------------------------------------------------------------------
#
# What a stage's code can touch is derived from its import closure: every ``layout.py`` path
# constant (``from .layout import X``) of the files it imports. Whether it reads or writes that path
# is not in the source's syntax, so READS says which ones each stage reads, and the test checks the
# table against the code both ways: a constant the code uses must be read (then a dep of the stage
# in dvc.yaml must cover it), written (an out, metric or plot of the stage covers it) or explained in
# UNUSED_BY_STAGE; a READS entry the code never uses is stale. A data dep no READS entry accounts for
# is reported too (a stage that re-runs for nothing).

READS = {
    "download": set(),
    "filter": {"RAW_DIR"},
    "describe": {"FILTERED_DIR"},
    "caption": {"RAW_DIR", "FILTERED_DIR", "DESCRIPTIONS"},
    "encode_latents": {"FILTERED_DIR"},
    "encode_text": {"CAPTIONS"},
    "train": {"CACHE_DIR", "LATENT_CACHE_DIR", "TEXT_CACHE_DIR"},  # CACHE_DIR: the two caches' parent
    "train_replicates": {"CACHE_DIR", "LATENT_CACHE_DIR", "TEXT_CACHE_DIR"},
    "export": {"LORA_DIR"},
    "sample_base": {"CAPTIONS"},
    "sample": {"CAPTIONS", "LORA_DIR", "SAMPLES_DIR"},  # samples/base: the base images of the grid
    "sample_replicates": {"CAPTIONS", "REPLICATES_DIR", "SAMPLES_DIR"},  # samples/base: its eval set's fingerprint
    "reference": {"FILTERED_DIR"},
    "evaluate": {"SAMPLES_DIR", "REFERENCE_DIR", "FILTERED_DIR"},  # the val split's ids
}
# Constants a stage's closure imports that the stage itself neither reads nor writes, and why.
UNUSED_BY_STAGE = {
    ("train", "CHECKPOINT_ROOT"): "git- and DVC-ignored resumable state, outside the pipeline by design",
    ("describe", "CHECKPOINT_ROOT"): "its raw VLM rows (.describe-raw): resumable cache outside the out",
    ("sample_base", "LORA_DIR"): "`sample --base` draws without the LoRA",
    ("sample_base", "SAMPLE_GRID"): "only `sample` draws the grid",
    ("encode_latents", "CAPTIONS"): "read by `encode --text` (the encode_text stage) only",
    ("encode_latents", "TEXT_CACHE_DIR"): "written by `encode --text` only",
    ("encode_text", "FILTERED_DIR"): "read by `encode --latents` (the encode_latents stage) only",
    ("encode_text", "LATENT_CACHE_DIR"): "written by `encode --latents` only",
    ("train", "REPLICATES_DIR"): "written by `train --replicates` (the train_replicates stage)",
    ("train_replicates", "CHECKPOINT_ROOT"): "git- and DVC-ignored resumable state, outside the pipeline by design",
    ("train_replicates", "LORA_DIR"): "replicate 0 is the train stage's out",
    ("train_replicates", "LOSS_PLOT"): "the train stage's plot",
    ("train_replicates", "TRAIN_METRICS"): "the train stage's metrics",
    ("sample_base", "REPLICATES_DIR"): "read by `sample --replicates` only",
    ("sample_base", "SAMPLES_REPLICATES_DIR"): "written by `sample --replicates` only",
    ("sample", "REPLICATES_DIR"): "read by `sample --replicates` only",
    ("sample", "SAMPLES_REPLICATES_DIR"): "written by `sample --replicates` only",
    ("sample_replicates", "LORA_DIR"): "replicate 0 (models/lora) is sampled by the sample stage",
    ("sample_replicates", "SAMPLE_GRID"): "only `sample` draws the grid",
}
# Non-code deps that are files of the repository, not stage data.
REPO_FILES = {"configs/eval_subjects.txt"}


def layout_constants(path: Path) -> set[str]:
    """Names ``path`` imports from the layout module (``from .layout import A, B as C``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "layout":
            names |= {alias.name for alias in node.names}
    return names


def layout_paths() -> dict[str, str]:
    """layout.py's path constants (Path values; bare file names such as LORA_WEIGHTS are left out)."""
    found = {}
    for node in ast.parse((SRC / "layout.py").read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node.value
    paths: dict[str, str] = {}
    for name, value in found.items():  # Path("a/b") or OTHER / "c"
        if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "Path":
            paths[name] = value.args[0].value
        elif isinstance(value, ast.BinOp) and isinstance(value.left, ast.Name) and value.left.id in paths:
            paths[name] = f"{paths[value.left.id]}/{value.right.value}"
    return paths


def _covers(a: str, b: str) -> bool:
    """One path is the other or lies inside it."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _paths(entries) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for d in entries or []]


def data_dep_problems(dvc_yaml: dict, reads: dict[str, set[str]] = READS) -> list[str]:
    paths = layout_paths()
    problems = []
    for name, stage in dvc_yaml["stages"].items():
        closure = import_chains(stage_module(stage["cmd"]))
        used = {c for f in closure for c in layout_constants(SRC / f) if c in paths}
        deps = [d for d in _paths(stage.get("deps")) if not d.startswith("src/") and d not in REPO_FILES]
        outs = [o for key in ("outs", "metrics", "plots") for o in _paths(stage.get(key))]
        read = reads.get(name, set())
        for const in sorted(read - used):
            problems.append(f"stage {name}: READS lists {const} but its code never imports it "
                            "(update READS in tests/test_dvc_deps.py)")
        for const in sorted(used):
            path = paths[const]
            if const in read:
                if not any(_covers(path, d) for d in deps):
                    problems.append(f"stage {name}: its code reads {const} ({path}): add `- {path}` to its "
                                    "deps in dvc.yaml")
            elif not any(_covers(path, o) for o in outs) and (name, const) not in UNUSED_BY_STAGE:
                problems.append(f"stage {name}: its code uses {const} ({path}), neither a dep nor an out of "
                                "the stage: add it to READS and its deps, or to its outs")
        for dep in deps:
            if not any(_covers(paths[c], dep) for c in read):
                problems.append(f"stage {name}: dep `- {dep}` is read by none of its code (READS)")
    return problems


def test_every_stage_depends_on_the_data_its_code_reads():
    problems = data_dep_problems(yaml.safe_load((REPO / "dvc.yaml").read_text()))
    assert not problems, "dvc.yaml data deps do not match the code:\n" + "\n".join(problems)


def test_a_data_dep_removed_or_a_read_unlisted_is_reported():
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    reference = dvc_yaml["stages"]["reference"]
    reference["deps"] = [d for d in reference["deps"] if d != "data/filtered"]
    assert data_dep_problems(dvc_yaml) == [
        "stage reference: its code reads FILTERED_DIR (data/filtered): add `- data/filtered` to its deps in dvc.yaml"]
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    reads = {**READS, "evaluate": READS["evaluate"] - {"FILTERED_DIR"}}
    assert data_dep_problems(dvc_yaml, reads) == [
        "stage evaluate: its code uses FILTERED_DIR (data/filtered), neither a dep nor an out of the stage: "
        "add it to READS and its deps, or to its outs",
        "stage evaluate: dep `- data/filtered` is read by none of its code (READS)"]
