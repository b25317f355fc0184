"""Helpers several test files share (fixtures stay in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml


def run_train_stage(workdir: Path, kill_after_checkpoint: bool = False) -> subprocess.CompletedProcess | None:
    """``python -m impressionist.train`` in ``workdir``, as DVC runs it; with ``kill_after_checkpoint``,
    SIGKILLed as soon as it reports its first checkpoint (no clean-up handlers run, as on a lost Colab VM)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "impressionist.train"]
    if not kill_after_checkpoint:
        return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, check=True)
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("train: checkpoint"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return None


def killed_and_uninterrupted(params: dict, cache: Path, root: Path) -> tuple[Path, Path, str]:
    """The train stage run twice on the same cache and params: once straight through, once SIGKILLed
    after its first checkpoint and run again. Returns both work folders and the rerun's output."""
    runs = {}
    for name in ("uninterrupted", "killed"):
        workdir = root / name
        shutil.copytree(cache, workdir / "data/cache")
        (workdir / "params.yaml").write_text(yaml.safe_dump(params))
        runs[name] = workdir
    run_train_stage(runs["uninterrupted"])
    run_train_stage(runs["killed"], kill_after_checkpoint=True)
    assert not (runs["killed"] / "models/lora").exists()
    resumed = run_train_stage(runs["killed"])
    return runs["uninterrupted"], runs["killed"], resumed.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_app(cwd: Path, env: dict[str, str], log_path: Path, what: str = "app.py") -> Iterator[str]:
    """``python app.py`` in ``cwd`` on a free loopback port: yields its URL once it answers, stops it after.

    ``env`` gets GRADIO_SERVER_NAME/PORT and analytics off added; the output goes to ``log_path``.
    """
    port = free_port()
    env = dict(env, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        process.kill()
                        pytest.fail(f"{what} did not serve {url}:\n{Path(log_path).read_text()[-3000:]}")
                    time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)
