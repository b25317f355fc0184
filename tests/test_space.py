"""`impressionist space`: the dry-run Space folder, copied alone into an empty directory, starts with
`python app.py` (tiny model, installed libraries, none of the repository's files) and answers a
gradio_client call and a headless browser with two images; its README and requirements are what a
Space reads; the deployment's Hub calls go to a recording stand-in of HfApi, with the token only ever
sent as the Space secret; ZeroGPU wraps the generation in spaces.GPU."""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, committed_params_text, served_app, train_tiny_lora
from PIL import Image
from test_app_browser import browser, image_sources  # noqa: F401  (the browser fixture)

from impressionist import app, space
from impressionist.errors import UserError
from impressionist.params.shipping import SpaceParams

PROMPT = "impr3ssionism, a harbor at sunset"
TOKEN = "hf_" + "SecretTestToken" + "7d1e9c"  # looks like a token; must never land in a file or a log


def real_params() -> dict:
    return yaml.safe_load(committed_params_text())


def test_spaces_package_is_not_installed_here():
    # The ZeroGPU package is only useful on a Space; the tests use a stand-in (test_zerogpu_wrapping).
    assert importlib.util.find_spec("spaces") is None


def test_folder_readme_and_requirements(tmp_path):
    from huggingface_hub import SpaceCard

    out = tmp_path / "space"
    files = space.run(real_params(), dry_run=True, out=out, repo=REPO, lora_repo="someone/impressionist-flux-lora")
    assert {"app.py", "README.md", "requirements.txt", "params.yaml", "src/impressionist/app.py",
            "src/impressionist/inference.py", "src/impressionist/models.py"} <= set(files)
    assert not any(f.startswith(("tests", "benchmarks", "data", "models/")) for f in files)
    card = SpaceCard.load(out / "README.md")
    assert (card.data.sdk, card.data.app_file, card.data.license) == ("gradio", "app.py", "other")
    assert card.data.sdk_version == importlib.metadata.version("gradio")  # the tested gradio
    assert card.data.models == ["black-forest-labs/FLUX.1-dev", "someone/impressionist-flux-lora"]
    assert "zerogpu" in card.data.tags and card.data.title
    # pinned to the tested (= installed) versions, and only what the app needs
    pins = dict(line.split("==") for line in (out / "requirements.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    repo_pins = dict(line.split("#")[0].strip().split("==") for line in (REPO / "requirements.txt").read_text()
                     .splitlines() if "==" in line)
    assert {"torch", "diffusers", "transformers", "peft", "gradio", "huggingface_hub"} <= set(pins)
    for name, version in pins.items():
        assert repo_pins[name] == version == importlib.metadata.version(name)
    assert not {"dvc", "dvclive", "tensorboard", "torch-fidelity", "datasets", "spaces"} & set(pins)
    app_params = yaml.safe_load((out / "params.yaml").read_text())
    assert set(app_params) == {"model", "caption", "sample", "app"}
    assert app_params["app"]["lora"] == "someone/impressionist-flux-lora"


@pytest.fixture(scope="module")
def space_server(tmp_path_factory, _demo_params_master, encoded_cache):
    """The dry-run folder copied alone into an empty directory and started with `python app.py`."""
    root = tmp_path_factory.mktemp("space")
    lora = train_tiny_lora(root, _demo_params_master, encoded_cache, lora=dict(rank=4, alpha=4))
    space.run(real_params(), dry_run=True, out=root / "build", repo=REPO, lora_repo="someone/impressionist-flux-lora")
    alone = root / "empty" / "space"
    shutil.copytree(root / "build", alone)
    # Shadow the package: were app.py to import an installed impressionist instead of its own, it would fail.
    poisoned = root / "poisoned" / "impressionist"
    poisoned.mkdir(parents=True)
    (poisoned / "__init__.py").write_text("raise ImportError('not the Space folder impressionist')\n")
    env = dict(os.environ, PYTHONPATH=str(poisoned.parent), HF_HUB_OFFLINE="1",
               IMPRESSIONIST_BASE_MODEL="builtin:tiny-flux", IMPRESSIONIST_LORA=str(lora),
               IMPRESSIONIST_MIN_RESOLUTION="32", IMPRESSIONIST_MAX_RESOLUTION="64", IMPRESSIONIST_MAX_STEPS="4",
               GRADIO_TEMP_DIR=str(root / "gradio"))
    with served_app(alone, env, root / "app.log", "the Space folder's app.py") as url:
        yield url


def test_space_folder_alone_answers_gradio_client(space_server):
    from gradio_client import Client

    client = Client(space_server, verbose=False)
    base_file, lora_file = client.predict(PROMPT, 3, 3, 3.5, 1.0, 64, 48, api_name="/generate")
    base, lora = (np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in (base_file, lora_file))
    assert base.shape == lora.shape == (48, 64, 3)
    assert np.abs(base - lora).max() > 2  # the LoRA from IMPRESSIONIST_LORA is applied


def test_space_page_in_a_browser_shows_two_images(space_server, browser):  # noqa: F811
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(space_server)
    wait = WebDriverWait(browser, 60)
    prompt = wait.until(lambda d: d.find_element("css selector", "#prompt textarea"))
    prompt.clear()
    prompt.send_keys(PROMPT)
    browser.find_element("css selector", "#generate").click()
    sources = wait.until(lambda d: (lambda found: found if len(found) == 2 else False)(image_sources(d)))
    pictures = [urllib.request.urlopen(src, timeout=10).read() for src in sources.values()]
    assert all(p.startswith(b"\x89PNG") for p in pictures) and pictures[0] != pictures[1]


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records each call; the upload reads the folder as sent."""

    calls: list = []
    uploaded: dict = {}
    whoami_error: Exception | None = None

    def whoami(self, token=None):
        self.calls.append(("whoami", {"token": token}))
        if self.whoami_error:
            raise self.whoami_error
        return {"name": "someone"}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/spaces/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        RecordingHfApi.uploaded = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def add_space_variable(self, repo_id, key, value, **kwargs):
        self.calls.append(("add_space_variable", {"repo_id": repo_id, "key": key, "value": value, **kwargs}))

    def add_space_secret(self, repo_id, key, value, **kwargs):
        self.calls.append(("add_space_secret", {"repo_id": repo_id, "key": key, "value": value, **kwargs}))

    def request_space_hardware(self, repo_id, hardware, **kwargs):
        self.calls.append(("request_space_hardware", {"repo_id": repo_id, "hardware": hardware, **kwargs}))


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    RecordingHfApi.calls, RecordingHfApi.uploaded, RecordingHfApi.whoami_error = [], {}, None
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return RecordingHfApi


def test_deploy_calls_the_hub_with_the_token_only_as_secret(hub, tmp_path, capsys):
    out = tmp_path / "space"
    url = space.run(real_params(), out=out, repo=REPO, space_id="someone/impressionist",
                    lora_repo="someone/impressionist-flux-lora", hardware="l4x1")
    assert url == "https://huggingface.co/spaces/someone/impressionist"
    names = [name for name, _ in hub.calls]
    assert names == ["whoami", "create_repo", "upload_folder", "add_space_variable", "add_space_variable",
                     "add_space_variable", "add_space_secret", "request_space_hardware"]
    kwargs = dict(hub.calls[1:3])
    assert kwargs["create_repo"]["repo_type"] == "space" and kwargs["create_repo"]["space_sdk"] == "gradio"
    assert kwargs["create_repo"]["exist_ok"] is True and kwargs["create_repo"]["private"] is True
    assert kwargs["upload_folder"]["repo_type"] == "space" and kwargs["upload_folder"]["repo_id"] == "someone/impressionist"
    variables = {c["key"]: c["value"] for n, c in hub.calls if n == "add_space_variable"}
    assert variables == {"IMPRESSIONIST_BASE_MODEL": "black-forest-labs/FLUX.1-dev",
                         "IMPRESSIONIST_LORA": "someone/impressionist-flux-lora",
                         "IMPRESSIONIST_QUANTIZATION": "nf4"}  # l4x1: 24 GB
    secret = next(c for n, c in hub.calls if n == "add_space_secret")
    assert (secret["key"], secret["value"]) == ("HF_TOKEN", TOKEN)  # from the environment
    assert next(c for n, c in hub.calls if n == "request_space_hardware")["hardware"] == "l4x1"
    # the token: in no uploaded file, no file left anywhere, nothing printed
    assert {"app.py", "README.md", "requirements.txt", "params.yaml"} <= set(hub.uploaded)
    assert not any(TOKEN.encode() in data for data in hub.uploaded.values())
    assert not out.exists()  # a deployment builds in a temporary folder
    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err and "someone/impressionist" in printed.out
    space.run(real_params(), dry_run=True, out=out, repo=REPO, lora_repo="someone/impressionist-flux-lora")
    assert not any(TOKEN.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_deploy_refusals_are_one_line_before_any_hub_call(hub, monkeypatch, tmp_path, capsys):
    params = real_params()
    args = dict(out=tmp_path / "s", repo=REPO, space_id="someone/impressionist", lora_repo="someone/lora")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UserError, match="HF_TOKEN is not set"):
        space.run(params, **args)
    assert hub.calls == []
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        space.run(params, **args)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.whoami_error = ConnectionError("no route to host")
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub"):
        space.run(params, **args)
    assert [n for n, _ in hub.calls] == ["whoami"]  # nothing created
    with pytest.raises(UserError, match="space.hardware='h900' is not a Space hardware"):
        space.run(params, **{**args, "hardware": "h900"})
    params["space"]["HF_token"] = "x"
    with pytest.raises(UserError, match="never put a Hugging Face token in params"):
        space.run(params, **args)
    # the command line: one error line, exit code 2
    (tmp_path / "params.yaml").write_text(committed_params_text())
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.chdir(REPO)  # `impressionist space` runs from the repository root (requirements.txt)
    with pytest.raises(SystemExit) as exit_info:
        space.main(["--params", str(tmp_path / "params.yaml"), "--space-id", "someone/impressionist",
                    "--lora-repo", "someone/lora"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: HF_TOKEN is not set") and "\n" not in err


def test_zerogpu_wrapping(monkeypatch, _demo_params_master):
    recorded = []

    def GPU(duration):  # the stand-in records the duration and each call through the wrapper
        def decorate(fn):
            def wrapper(*args, **kwargs):
                recorded.append(("call", duration))
                return fn(*args, **kwargs)
            wrapper.zerogpu = True
            return wrapper
        return decorate

    def generate(prompt):
        return prompt.upper()

    assert app.on_zerogpu(generate, 60) is generate  # no spaces package: unchanged
    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    wrapped = app.on_zerogpu(generate, 60)
    assert wrapped("x") == "X" and recorded == [("call", 60)]

    # build_demo registers the wrapped function, with app.gpu_duration
    params = copy.deepcopy(_demo_params_master)
    params["app"] = {"gpu_duration": 45}
    settings = app.load_settings(params, environ={})
    white = Image.new("RGB", (16, 16))
    demo = app.build_demo(settings, generator=lambda *args: (white, white))
    functions = [f.fn for f in demo.fns.values()]
    assert any(getattr(fn, "zerogpu", False) for fn in functions)
    next(fn for fn in functions if getattr(fn, "zerogpu", False))(PROMPT, 0, 2, 3.5, 1.0, 64, 64)
    assert recorded[-1] == ("call", 45)


@pytest.mark.parametrize("values, message", [
    ({"space_id": "impressionist"}, r"space.space_id='impressionist' needs a namespace: your-name/impressionist"),
    ({"lora_repo": "a/b/c"}, r"space.lora_repo='a/b/c' is not a valid Hub repo id"),
    ({"private": "yes"}, r"space.private='yes' must be true or false"),
    ({"hardware": "tpu"}, r"space.hardware='tpu' is not a Space hardware"),
])
def test_space_settings_are_checked_in_one_line(values, message):
    with pytest.raises(UserError, match=message):
        SpaceParams.of(values)
