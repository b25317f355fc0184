"""Shared fixtures: the demo params, the tiny Flux pipeline and a small encoded cache.

Everything is built offline inside pytest's temporary folders.
"""

from __future__ import annotations

import copy
import os

import pytest

from helpers import REPO, committed_params_text, write_filtered_dataset

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
