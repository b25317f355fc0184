"""Running the ``dvc`` command line from Python: which executable, which environment, one-line errors.

Used by the pull-request report and the Colab notebook, which both shell out to DVC.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from .errors import UserError

INSTALL_HINT = "`pip install -r requirements.txt` (or the dvc pin from it)"


def search_path(environ: Mapping[str, str] | None = None) -> str:
    """PATH with this interpreter's folder first: the dvc (and python) of a venv that is not activated."""
    environ = os.environ if environ is None else environ
    return os.pathsep.join(p for p in (str(Path(sys.executable).parent), environ.get("PATH", "")) if p)


def dvc_executable(environ: Mapping[str, str] | None = None) -> str:
    """The dvc beside this interpreter, else the one on PATH; one line when there is none."""
    found = shutil.which("dvc", path=search_path(environ))
    if not found:
        raise UserError(f"dvc is not installed; {INSTALL_HINT}")
    return found


def dvc_environment(environ: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a dvc process: no analytics, and this interpreter first on PATH (stage
    commands call ``python``)."""
    environ = os.environ if environ is None else environ
    return {**environ, "DVC_NO_ANALYTICS": "1", "PATH": search_path(environ), **extra}


def error_line(output: str) -> str:
    """DVC's own error from its output: the last ``ERROR`` line, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["(no output)"])[-1]


def run_dvc(root: Path | str, *args: str, env: Mapping[str, str] | None = None) -> str:
    """stdout of ``dvc <args>`` run in ``root``; a failure becomes one UserError line with DVC's error."""
    result = subprocess.run([dvc_executable(env), *args], cwd=root, env=dict(env or dvc_environment()),
                            capture_output=True, text=True)
    if result.returncode:
        raise UserError(f"`dvc {' '.join(args)}` failed in {root}: {error_line(result.stderr or result.stdout)}")
    return result.stdout
