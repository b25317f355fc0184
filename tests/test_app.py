"""The Gradio app on localhost with the tiny model, called through gradio_client: two images with the
same seed, the base one equal to the plain base model's, bounds refused with a message, one job at
a time, and settings from params overridden by the environment."""

from __future__ import annotations

import copy
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import train_tiny_lora

from impressionist import app
from impressionist.errors import UserError

PROMPT = "impr3ssionism, a harbor at sunset"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_params(params: dict, lora_dir) -> dict:
    params = copy.deepcopy(params)
    params["app"] = {"lora": str(lora_dir), "min_resolution": 32, "max_resolution": 96,
                     "max_steps": 6, "max_prompt_chars": 60, "concurrency_limit": 1}
    params["sample"].update(steps=2, resolution=64)
    return params


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, _demo_params_master, encoded_cache):
    return train_tiny_lora(tmp_path_factory.mktemp("app-lora"), _demo_params_master, encoded_cache,
                           lora=dict(rank=4, alpha=4))


class Recording:
    """Wraps the real Generator: records when each call runs, and counts the images its pipeline draws."""

    def __init__(self, generator):
        self.generator, self.spans, self.draws = generator, [], 0
        pipe, recording = generator.pipe, self

        class CountingPipe:
            def __getattr__(self, name):  # disable_lora, set_adapters, ...: the real pipeline's
                return getattr(pipe, name)

            def __call__(self, *args, **kwargs):
                recording.draws += 1
                return pipe(*args, **kwargs)

        generator.pipe = CountingPipe()

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.generator(*args, **kwargs)
        finally:  # refused calls too: a span says the call ran, not that it succeeded
            self.spans.append((start, time.perf_counter()))


@pytest.fixture(scope="module")
def server(_demo_params_master, trained_lora, tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    settings = app.load_settings(app_params(_demo_params_master, trained_lora), environ={})
    generator = Recording(app.Generator(settings))
    demo = app.build_demo(settings, generator)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True)
    yield url, settings, generator
    demo.close()
    monkeypatch.undo()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def test_two_images_with_the_same_seed(client, server, tiny_flux_dir):
    from impressionist.models import load_pipeline

    base_file, lora_file = client.predict(PROMPT, 7, 3, 3.5, 1.0, 64, 48, api_name="/generate")
    base, lora = (np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in (base_file, lora_file))
    assert base.shape == lora.shape == (48, 64, 3)
    assert np.abs(base - lora).max() > 5  # the LoRA changes the picture

    # The base image is exactly what the plain base model draws from that seed.
    pipe = load_pipeline(tiny_flux_dir, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(PROMPT, height=48, width=64, num_inference_steps=3, guidance_scale=3.5,
                 generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert (np.asarray(plain, dtype=np.int16) == base).all()

    # LoRA scale 0 is the base model again; the same request gives the same pictures.
    zero_base, zero_lora = client.predict(PROMPT, 7, 3, 3.5, 0.0, 64, 48, api_name="/generate")
    assert Image.open(zero_lora).tobytes() == Image.open(zero_base).tobytes() == Image.open(base_file).tobytes()


@pytest.mark.parametrize("args, message", [
    ((PROMPT, 0, 50, 3.5, 1.0, 64, 64), "greater than maximum value 6"),   # steps (slider bound)
    ((PROMPT, 0, 2, 3.5, 1.0, 512, 64), "greater than maximum value 96"),  # width (slider bound)
    ((PROMPT, 0, 2, 3.5, 9.0, 64, 64), "greater than maximum value 2"),    # LoRA scale
    ((PROMPT, 0, 2, 3.5, 1.0, 40, 64), "width must be a multiple of 16, got 40"),
    ("x" * 61, "the prompt has 61 characters; the limit is 60"),
    ("   ", "the prompt is empty"),
])
def test_out_of_bounds_inputs_are_refused(client, server, args, message):
    from gradio_client.exceptions import AppError

    if isinstance(args, str):
        args = (args, 0, 2, 3.5, 1.0, 64, 64)
    draws_before = server[2].draws
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/generate")
    assert server[2].draws == draws_before  # refused before any image was drawn


@pytest.mark.parametrize("seed", [float("nan"), float("inf"), 2.5])
def test_a_seed_that_is_not_a_whole_number_is_a_message(server, seed):
    """NaN and inf reach int() nowhere: the same one-line UserError as any out-of-bounds input."""
    with pytest.raises(UserError, match="seed must be a whole number"):
        app.check_request(server[1], PROMPT, seed, 2, 3.5, 1.0, 64, 64)


def test_a_nan_seed_in_the_ui_is_a_gradio_error(server):
    """The UI path: the seed box hands NaN on (JSON clients cannot send it, a raw request can) and
    the event handler answers with the app's message as a gr.Error, not a bare ValueError."""
    import gradio as gr

    demo = app.build_demo(server[1], server[2])
    seed_box = next(block for block in demo.blocks.values() if isinstance(block, gr.Number))
    passed_on = seed_box.preprocess(float("nan"))  # what Gradio does to the request's value first
    handler = next(fn for fn in demo.fns.values() if fn.api_name == "generate").fn
    draws_before = server[2].draws
    with pytest.raises(gr.Error, match="seed must be a whole number, got nan"):
        handler(PROMPT, passed_on, 2, 3.5, 1.0, 64, 64)
    assert server[2].draws == draws_before


def test_queue_runs_one_job_at_a_time(client, server):
    generator = server[2]
    generator.spans.clear()
    jobs = [client.submit(PROMPT, seed, 6, 3.5, 1.0, 96, 96, api_name="/generate") for seed in (1, 2, 3)]
    for job in jobs:
        assert len(job.result(timeout=120)) == 2
    spans = sorted(generator.spans)
    assert len(spans) == 3
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:]))  # no overlap


def test_generator_works_without_the_ui(server):
    settings, generator = server[1], server[2].generator
    draws_before = server[2].draws
    base, lora = generator(PROMPT, seed=3)  # defaults: sample.steps, guidance, resolution
    assert base.size == lora.size == (settings.default_size, settings.default_size) == (64, 64)
    assert server[2].draws == draws_before + 2  # the counter sees the pipeline's draws
    with pytest.raises(UserError, match="steps must be between 1 and 6, got 7"):
        generator(PROMPT, steps=7)
    with pytest.raises(UserError, match="seed must be a whole number"):
        generator(PROMPT, seed=1.5)


def test_settings_from_params_and_environment(demo_params, trained_lora, tmp_path, monkeypatch):
    params = app_params(demo_params, trained_lora)
    settings = app.load_settings(params, environ={})
    assert settings.base_model == "builtin:tiny-flux" and settings.lora == str(trained_lora)
    assert settings.examples == [f"impr3ssionism, {p}" for p in demo_params["sample"]["prompts"]]
    assert settings.device == ("cuda" if torch.cuda.is_available() else "cpu")
    overridden = app.load_settings(params, environ={
        "IMPRESSIONIST_BASE_MODEL": "black-forest-labs/FLUX.1-dev",
        "IMPRESSIONIST_LORA": "someone/impressionist-flux-lora", "IMPRESSIONIST_MAX_STEPS": "40",
        "IMPRESSIONIST_MAX_RESOLUTION": "1024", "IMPRESSIONIST_CONCURRENCY_LIMIT": "2"})
    assert (overridden.base_model, overridden.lora) == ("black-forest-labs/FLUX.1-dev",
                                                        "someone/impressionist-flux-lora")
    assert (overridden.max_steps, overridden.max_resolution, overridden.concurrency_limit) == (40, 1024, 2)
    # No params file at all (a bare Space): the real recipe's defaults.
    monkeypatch.chdir(tmp_path)
    bare = app.load_settings(environ={})
    assert bare.base_model == "black-forest-labs/FLUX.1-dev" and bare.lora == "models/lora"
    with pytest.raises(UserError, match="IMPRESSIONIST_MAX_STEPS='many' must be a int"):
        app.load_settings(params, environ={"IMPRESSIONIST_MAX_STEPS": "many"})
    with pytest.raises(UserError, match="no LoRA at"):
        app.Generator(app.load_settings(params, environ={"IMPRESSIONIST_LORA": str(tmp_path / "none")}))


@pytest.mark.parametrize("change, message", [
    ({"min_resolution": 40}, "app.min_resolution=40 must be a multiple of 16"),
    ({"max_resolution": 100}, "app.max_resolution=100 must be a multiple of 16"),
    ({"min_resolution": 128, "max_resolution": 64}, "must be at least app.min_resolution=128"),
    ({"max_guidance": -1.0}, "app.max_guidance=-1.0 must be a positive number"),
    ({"max_lora_scale": True}, "app.max_lora_scale=True must be a positive number"),
    ({"max_lora_scale": "2"}, "app.max_lora_scale='2' must be a positive number"),
])
def test_bad_settings_are_one_line(demo_params, change, message):
    params = app_params(demo_params, "models/lora")
    params["app"].update(change)
    with pytest.raises(UserError, match=message) as err:
        app.load_settings(params, environ={})
    assert "\n" not in str(err.value)


def test_a_lora_that_does_not_load_is_one_line_naming_the_setting(demo_params, tmp_path):
    from safetensors.torch import save_file

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / app.LORA_WEIGHTS).write_bytes(b"not a safetensors file")
    other_model = tmp_path / "other-model"  # a LoRA whose layers have another base model's shape
    other_model.mkdir()
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 7),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(9, 4)},
              str(other_model / app.LORA_WEIGHTS))
    for lora in (garbage, other_model):
        settings = app.load_settings(app_params(demo_params, lora), environ={})
        with pytest.raises(UserError) as err:
            app.Generator(settings)
        message = str(err.value)
        assert f"cannot load the LoRA {lora}" in message and "IMPRESSIONIST_LORA" in message
        assert "app.lora" in message and "\n" not in message
