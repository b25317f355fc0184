"""Every file name two modules share is spelled once, in ``layout.py`` (or beside the format it names).

A literal such as ``"samples.csv"`` written in the module that writes the file and again in the one
that reads it lets the two drift apart silently; the scan below finds any file-name literal (not in a
docstring) that more than one module of the package spells, and the import graph has no circle.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict

from helpers import REPO

SRC = REPO / "src" / "impressionist"
FILE_NAME = re.compile(r"^[\w-]+\.(csv|json|jsonl|parquet|png|safetensors|yaml|txt|md)$")


def file_name_literals(source: str) -> set[str]:
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings and FILE_NAME.match(node.value)}


def spelled_in_several_modules() -> dict[str, list[str]]:
    modules = defaultdict(set)
    for path in SRC.rglob("*.py"):
        for name in file_name_literals(path.read_text()):
            modules[name].add(path.relative_to(SRC).as_posix())
    return {name: sorted(where) for name, where in modules.items() if len(where) > 1}


def test_no_file_name_is_spelled_in_two_modules():
    shared = spelled_in_several_modules()
    assert not shared, "give each a constant in layout.py (or beside its format) and import it: " + repr(shared)


def test_the_scan_sees_a_file_name_literal_and_skips_docstrings():
    source = '"""Writes samples.csv."""\nPATH = "samples.csv"\ndef f():\n    """reads eval.json"""\n    return "x/eval.json"\n'
    assert file_name_literals(source) == {"samples.csv"}


def test_the_import_graph_has_no_circle():
    from test_dvc_deps import imported_modules, module_file  # the deps test's AST walker (imports in functions too)

    graph = {}
    for path in SRC.rglob("*.py"):
        name = path.relative_to(SRC).as_posix()
        targets = {module_file(m).relative_to(SRC).as_posix() for m in imported_modules(path)}
        # a module of a package runs its package's __init__ first: not an edge worth a circle
        graph[name] = {t for t in targets - {name} if not (t.endswith("__init__.py") and name.startswith(t[: -len("__init__.py")]))}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", "import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt])
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
