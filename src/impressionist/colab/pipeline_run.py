"""The run: the overrides into params.yaml, then ``dvc repro`` streamed here and to a log on Drive."""

from __future__ import annotations

import codecs
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ..cli import apply_overrides, hydra_value
from ..dvc_cli import dvc_executable
from ..errors import UserError
from ..layout import DVC_PIPELINE
from ..params import DEFAULT_PARAMS
from .console import say
from .drive import DriveLayout
from .state_mirror import StateMirror, state_paths
from .working_copy import run_environment

# DVC logs this right before it rewrites dvc.lock after a stage: the mirror then syncs soon.
LOCK_UPDATE = re.compile(r"(Updating|Generating) lock file 'dvc\.lock'")


def repro_command() -> list[str]:
    """``dvc repro --pull --allow-missing`` (see the package docstring)."""
    return ["dvc", "repro", "--pull", "--allow-missing"]


def planned_params(repo: Path | str, overrides: dict[str, Any]) -> dict[str, Any]:
    """params.yaml as the run will see it; an override naming no existing param stops here."""
    params = yaml.safe_load((Path(repo) / DEFAULT_PARAMS).read_text()) or {}
    for key, value in overrides.items():
        try:
            apply_overrides(params, {key: value})
        except (UserError, KeyError, TypeError):
            raise UserError(f"override {key}: params.yaml has no such param (update the "
                            "repository, or remove the override)") from None
    return params


def apply_params(repo: Path | str, overrides: dict[str, Any]) -> None:
    """Write the overrides into params.yaml the way ``dvc exp run -S key=value`` does (DVC's own
    Hydra-syntax writer, which keeps the file's comments); unknown keys stop before any write."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    planned_params(repo, overrides)
    if overrides:
        dvc_apply_overrides(Path(repo) / DEFAULT_PARAMS,
                            [f"{key}={hydra_value(value)}" for key, value in overrides.items()])


def run(repo: Path | str, layout: DriveLayout, overrides: dict[str, Any], *,
        mirror_interval: float = 2.0, out=None) -> Path:
    """Set the params and reproduce the pipeline, streaming its output here and to a log on Drive.

    Rerunning after a disconnect (with :func:`prepare` first) skips the finished stages and resumes
    training from the newest checkpoint on Drive. Returns the log's path; a failed run raises
    UserError naming it.
    """
    repo = Path(repo).resolve()
    out = out or sys.stdout
    apply_params(repo, overrides)
    command = repro_command()
    dvc = dvc_executable()  # before any output: no dvc is one line, not a traceback
    log_path = layout.logs / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    layout.logs.mkdir(parents=True, exist_ok=True)
    say(f"params.yaml: {len(overrides)} overrides set; {' '.join(command)}; full log: {log_path}")
    mirror = StateMirror(repo, layout.state, state_paths(repo / DVC_PIPELINE), mirror_interval)
    with mirror, open(log_path, "ab") as log:
        # Its own process group: a stop reaches dvc and the stage it runs, and nothing else.
        process = subprocess.Popen([dvc, *command[1:]], cwd=repo,
                                   env=run_environment(repo), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _stream(process, out, log, mirror)
            code = process.wait()
        except KeyboardInterrupt:  # the notebook's stop button
            _stop(process)
            raise
    if mirror.errors:
        say(f"warning: copying state to Drive failed {len(mirror.errors)} times "
             f"(last: {mirror.errors[-1]})")
    if code:
        raise UserError(f"the pipeline stopped (dvc exit code {code}); the output above and {log_path} "
                        "say why. Fix it and run the cells again: finished stages are skipped and "
                        "training resumes from its last checkpoint")
    return log_path


def _stream(process: subprocess.Popen, out, log, mirror: StateMirror) -> None:
    """Copy output as it comes (progress bars' carriage returns included) and watch for lock
    updates line by line."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    fd = process.stdout.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        log.write(chunk)
        log.flush()
        text = decoder.decode(chunk)
        out.write(text)
        out.flush()
        pending += text
        *lines, pending = pending.split("\n")
        if any(LOCK_UPDATE.search(line) for line in lines):
            mirror.poke()


def _stop(process: subprocess.Popen, grace: float = 30.0) -> None:
    """Ctrl-C to the whole group, so DVC and the stage stop cleanly; after DVC exits (or ``grace``
    seconds), SIGKILL whatever is left in the group (children that ignore SIGINT)."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the group is empty: everything has ended
            break
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            pass
