"""Helpers several test files share (fixtures stay in conftest.py)."""

from __future__ import annotations

import contextlib
import copy
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

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def run_train_stage(workdir: Path, kill_after_checkpoint: bool = False) -> subprocess.CompletedProcess | None:
    """``python -m impressionist train`` in ``workdir``, as DVC runs it; with ``kill_after_checkpoint``,
    SIGKILLed as soon as it reports its first checkpoint (no clean-up handlers run, as on a lost Colab VM)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "impressionist", "train"]
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


def committed_params_text() -> str:
    """params.yaml as committed. The workspace copy may hold a DVC experiment's overrides (the
    demo is one: `dvc exp run -S` leaves its values in the workspace), which tests must not see."""
    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else (REPO / "params.yaml").read_text()


def record_figures(monkeypatch, *modules) -> dict:
    """Watch ``impressionist.plotting.save_figure`` (and its by-name imports in ``modules``): the
    figure each call writes, by file name. A test checks the data plotted on it, and with
    :func:`assert_png_shows` that the file on disk is that figure."""
    from impressionist import plotting

    figures, real = {}, plotting.save_figure

    def save_figure(fig, path):
        figures[Path(path).name] = fig
        return real(fig, path)

    for module in (plotting, *modules):
        monkeypatch.setattr(module, "save_figure", save_figure)
    return figures


def assert_png_shows(path: Path, fig) -> None:
    """``path`` is ``fig`` rendered: a PNG of the figure's pixel size that is not blank."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == tuple(round(x * fig.dpi) for x in fig.get_size_inches())
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 20, f"{path.name} is nearly blank"


def write_filtered_dataset(root: Path, n_images: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """A data/filtered + data/captions pair in the layout of docs/layout.md (random pixels)."""
    filtered, captions = root / "filtered", root / "captions"
    (filtered / "images").mkdir(parents=True)
    captions.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sizes = [(96, 96), (128, 80), (80, 128)]
    rows, caps = [], []
    for i in range(n_images):
        width, height = sizes[i % len(sizes)]
        image_id = f"{i:016x}"
        # Smooth colour fields, not white noise: something a tiny model can learn.
        base = rng.random(3) * 255
        yy, xx = np.mgrid[0:height, 0:width]
        pixels = base + 60 * np.sin(xx[..., None] / (6 + i % 4) + np.arange(3)) * np.cos(yy[..., None] / 9)
        Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(filtered / "images" / f"{image_id}.png")
        split = "val" if i % 6 == 5 else "train"
        rows.append(dict(id=image_id, file=f"images/{image_id}.png", artist="claude-monet",
                         genre="landscape", style="Impressionism", width=width, height=height,
                         split=split))
        caps.append(dict(id=image_id, split=split, caption=f"trig, a painting number {i % 3}",
                         caption_source="template"))
    pd.DataFrame(rows).to_parquet(filtered / "metadata.parquet")
    pd.DataFrame(caps).to_parquet(captions / "captions.parquet")
    return filtered, captions / "captions.parquet"


def train_tiny_lora(root: Path, params: dict, cache: Path, *, lora: dict | None = None, steps: int = 5,
                    learning_rate: float | None = 1e-2) -> Path:
    """A LoRA from the real trainer in a few seconds, in ``root/lora``. The default learning rate is
    high enough that the LoRA visibly changes the tiny model's images."""
    from impressionist import train

    params = copy.deepcopy(params)
    params["lora"].update(lora or {})
    # The recipe the tests' "the LoRA visibly changes the images" thresholds were set with: no EMA
    # (over a few steps the average stays near the first step's weights) and logit-normal timesteps
    # (the style bias trains high noise, which moves a few-step tiny-model image less).
    params["train"].update(max_steps=steps, checkpoint_every=0, ema_decay=0.0, timestep_sampling="logit_normal")
    if learning_rate is not None:
        params["train"]["learning_rate"] = learning_rate
    train.run(params, cache, lora_dir=root / "lora", checkpoint_dir=root / "ckpt",
              metrics_path=root / "train.json", loss_plot=root / "loss.png", live_dir=root / "live",
              log_dir=root / "logs")
    return root / "lora"


def cpu_recipe_params(max_steps: int = 2) -> dict:
    """The committed params.yaml (the real recipe: bf16 weights and autocast, gradient checkpointing,
    validation images, EMA, all-linear LoRA) with only what a CPU test needs changed: the tiny
    model on the CPU, a few steps, a single process reading in-process, tiny validation images."""
    params = yaml.safe_load(committed_params_text())
    params["model"].update(pretrained="builtin:tiny-flux", device="cpu")
    params["train"].update(max_steps=max_steps, checkpoint_every=1, log_every=1, dataloader_workers=0,
                           gradient_accumulation_steps=1)
    params["train"]["validation"].update(every=1, steps=1, resolution=32)
    return params
