"""dvc.yaml's code deps match the imports: a stage re-runs whenever code it runs changes.

Each stage's import closure inside the package is derived from the source alone (AST, nothing is
imported or run): the stage module is the ``python -m impressionist.X`` of its cmd, and every
``import impressionist.x``, ``from impressionist import x``, ``from impressionist.x import y`` and
relative ``from .x import y`` / ``from . import x`` is followed, including imports inside
functions (the late ones that keep heavy libraries out of start-up). dvc.yaml must list exactly
those ``src/impressionist/*.py`` files as the stage's deps, no fewer and no more.
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
ALLOWED_UNLISTED = {
    "__init__.py",  # the package marker (version string, a logging level)
    "errors.py",    # the one-line `error:` wrapper and atomic writes
    "params.py",    # reading and validating params.yaml (DVC tracks the values themselves)
    "layout.py",    # output paths, which dvc.yaml names itself as deps and outs
}


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
    package = PACKAGE if path.name == "__init__.py" else ".".join(
        [PACKAGE, *path.relative_to(SRC).with_suffix("").parts[:-1]])
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
    match = re.search(rf"python -m ({PACKAGE}(?:\.\w+)+)", cmd)
    assert match, f"stage cmd {cmd!r} does not run `python -m {PACKAGE}.<module>`"
    return match.group(1)


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
