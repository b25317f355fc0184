"""Shared fixtures: the demo params, the tiny Flux pipeline and a small encoded cache.

Everything is built offline inside pytest's temporary folders.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Checkpoints go to each test's own folder (.cache/checkpoints under its working directory), never
# to a root shared through the environment, where one test's run would resume another's.
os.environ.pop("IMPRESSIONIST_CHECKPOINTS", None)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Locally built models go to a per-session folder, never the developer's .cache."""
    folder = tmp_path_factory.mktemp("impressionist-cache")
    old = os.environ.get("IMPRESSIONIST_CACHE")
    os.environ["IMPRESSIONIST_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("IMPRESSIONIST_CACHE", None)
    else:
        os.environ["IMPRESSIONIST_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def outside_the_checkout(tmp_path_factory):
    """Tests run in an empty folder, never in the checkout. The stages' default paths (data/...,
    models/..., samples/..., plots/...) are relative, so a test that leans on a default would
    otherwise read what an earlier `impressionist demo` left in the checkout (and pass there, but
    fail on a fresh clone) or write into it. Here it fails the same way everywhere. Files of the
    repository itself are reached through REPO."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield


def committed_params_text() -> str:
    """params.yaml as committed. The workspace copy may hold a DVC experiment's overrides (the
    demo is one: `dvc exp run -S` leaves its values in the workspace), which tests must not see."""
    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else (REPO / "params.yaml").read_text()


@pytest.fixture(scope="session")
def _demo_params_master():
    import yaml

    from impressionist.cli import apply_overrides, demo_overrides

    params = apply_overrides(yaml.safe_load(committed_params_text()), demo_overrides(REPO / "configs/demo.yaml"))
    # absolute, so that tests running in another folder still find the shipped subjects file
    params["sample"]["eval_set"]["subjects"] = str(REPO / params["sample"]["eval_set"]["subjects"])
    return params


@pytest.fixture
def demo_params(_demo_params_master):
    """params.yaml with configs/demo.yaml applied: a fresh copy each test may change."""
    return copy.deepcopy(_demo_params_master)


@pytest.fixture(scope="session")
def tiny_flux_dir(isolated_cache):
    from impressionist.models import BUILTIN_TINY_FLUX, resolve_pretrained

    return resolve_pretrained(BUILTIN_TINY_FLUX)


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


@pytest.fixture(scope="session")
def encoded_cache(tmp_path_factory, _demo_params_master, tiny_flux_dir):
    from impressionist import encode

    root = tmp_path_factory.mktemp("encoded")
    filtered, captions = write_filtered_dataset(root)
    encode.run(copy.deepcopy(_demo_params_master), filtered, captions, root / "cache")
    return root / "cache"


@pytest.fixture
def no_pickle_loads(monkeypatch):
    """torch.load fails unless called with weights_only=True (pickle that can run code); yields
    the files it did load, so a test can check the guarded path really ran."""
    import torch

    real_load, loaded = torch.load, []

    def guarded_load(f, *args, **kwargs):
        if kwargs.get("weights_only") is not True:
            raise AssertionError(f"torch.load({f!r}) without weights_only=True: {kwargs}")
        loaded.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded_load)
    return loaded
