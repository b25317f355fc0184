"""train.ema_decay: an EMA of the LoRA weights, saved as the LoRA (raw weights beside it), used for
the validation images, and kept in the checkpoints so that a killed run resumes bit-identically."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import killed_and_uninterrupted

from impressionist import train
from impressionist.ema import LoraEMA
from impressionist.errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"
DECAY = 0.7  # far from 1, so a few steps move the average visibly away from the weights


def outputs(root: Path) -> dict:
    return dict(lora_dir=root / "lora", checkpoint_dir=root / "ckpt", metrics_path=root / "train.json",
                loss_plot=root / "loss.png", live_dir=root / "dvclive", log_dir=root / "logs")


def ema_run(params, steps, every, decay=DECAY):
    params = copy.deepcopy(params)
    params["train"].update(max_steps=steps, checkpoint_every=every, keep_checkpoints=10, log_every=5,
                           ema_decay=decay, learning_rate=1e-2)
    params["train"]["validation"]["every"] = 0
    params["lora"]["rank"] = 4
    return params


def test_the_saved_lora_is_the_ema_of_the_step_weights(demo_params, encoded_cache, tmp_path, monkeypatch):
    """The weights after each of 4 optimizer steps (from the checkpoint of every step) averaged by
    hand: ema_1 = w_1, ema_k = d * ema_{k-1} + (1 - d) * w_k."""
    monkeypatch.chdir(tmp_path)
    out = outputs(tmp_path)
    train.run(ema_run(demo_params, steps=4, every=1), encoded_cache, **out)
    steps = [load_file(run_checkpoints(out) / f"step-{k:08d}" / train.LORA_STATE) for k in range(1, 5)]
    expected = dict(steps[0])
    for weights in steps[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * weights[k] for k in expected}

    saved = load_file(out["lora_dir"] / LORA_FILE)
    raw = load_file(out["lora_dir"] / train.RAW_LORA_SUBDIR / LORA_FILE)
    assert saved.keys() == raw.keys() == {f"transformer.{k}" for k in expected}
    moved = 0
    for key, value in expected.items():
        torch.testing.assert_close(saved[f"transformer.{key}"], value, rtol=1e-5, atol=1e-7)
        assert torch.equal(raw[f"transformer.{key}"], steps[-1][key])  # the raw LoRA: the last step's
        moved += not torch.allclose(value, steps[-1][key])
    assert moved > 0  # the average differs from the last weights: the test can tell them apart
    config = json.loads((out["lora_dir"] / "training_config.json").read_text())
    assert config["weights"] == "ema" and config["raw_weights"] == "raw/"


def test_without_ema_the_lora_is_the_raw_weights(demo_params, encoded_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = outputs(tmp_path)
    train.run(ema_run(demo_params, steps=2, every=2, decay=0), encoded_cache, **out)
    last = load_file(run_checkpoints(out) / "step-00000002" / train.LORA_STATE)
    saved = load_file(out["lora_dir"] / LORA_FILE)
    assert all(torch.equal(saved[f"transformer.{k}"], v) for k, v in last.items())
    assert not (out["lora_dir"] / train.RAW_LORA_SUBDIR).exists()
    assert json.loads((out["lora_dir"] / "training_config.json").read_text())["weights"] == "raw"


def test_applied_swaps_the_average_in_and_restores_the_weights_exactly():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(5))]
    ema = LoraEMA(params, 0.5)
    ema.update()
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    ema.update()
    trained = [p.detach().clone() for p in params]
    with ema.applied():
        assert all(torch.allclose(p, t - 0.5) for p, t in zip(params, trained))
    assert all(torch.equal(p, t) for p, t in zip(params, trained))
    assert ema.updates == 2


def test_validation_images_use_the_ema_weights(demo_params, encoded_cache, tmp_path, monkeypatch):
    seen = []
    real = train._log_validation_images

    def recording(accelerator, sampler, transformer, step):
        name, lora_b = next((n, p) for n, p in accelerator.unwrap_model(transformer).named_parameters()
                            if "lora_B" in n)
        seen.append(("transformer." + name.replace(".default", ""), lora_b.detach().clone()))
        return real(accelerator, sampler, transformer, step)

    monkeypatch.setattr(train, "_log_validation_images", recording)
    monkeypatch.chdir(tmp_path)
    params = ema_run(demo_params, steps=3, every=3)
    params["train"]["validation"].update(every=3, steps=1, resolution=32)
    out = outputs(tmp_path)
    train.run(params, encoded_cache, **out)
    saved = load_file(out["lora_dir"] / LORA_FILE)
    raw = load_file(out["lora_dir"] / train.RAW_LORA_SUBDIR / LORA_FILE)
    assert len(seen) == 1
    key, during_validation = seen[0]
    assert torch.equal(during_validation, saved[key]) and not torch.equal(during_validation, raw[key])


@pytest.mark.parametrize("decay", [1.0, -0.1, "high"])
def test_bad_decays_are_refused_before_any_model_loads(demo_params, encoded_cache, tmp_path, monkeypatch, decay):
    monkeypatch.setattr(train, "base_model_of_cache", lambda *a, **k: pytest.fail("model resolved"))
    demo_params["train"]["ema_decay"] = decay
    with pytest.raises(UserError, match="train.ema_decay"):
        train.run(demo_params, encoded_cache, **outputs(tmp_path))


def run_checkpoints(out: dict) -> Path:
    """The one run's checkpoint folder under the checkpoint root (``<root>/<run hash>``)."""
    (folder,) = [p for p in out["checkpoint_dir"].iterdir() if p.is_dir()]
    return folder


def test_sigkill_then_resume_with_ema_gives_the_same_loras(demo_params, encoded_cache, tmp_path):
    params = ema_run(demo_params, steps=12, every=4)
    uninterrupted, killed, resumed = killed_and_uninterrupted(params, encoded_cache, tmp_path)
    assert re.search(r"resuming from \.cache/checkpoints/[0-9a-f]+/step-00000004 at step 4", resumed)

    for file in (Path(LORA_FILE), Path(train.RAW_LORA_SUBDIR) / LORA_FILE):  # the EMA and the raw LoRA
        expected = load_file(uninterrupted / "models/lora" / file)
        got = load_file(killed / "models/lora" / file)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (file, key)


def test_the_model_card_says_which_weights_the_lora_holds():
    from impressionist.model_card import training_table

    ema = training_table({"weights": "ema", "train": {"ema_decay": 0.99}, "lora": {}}, [512, 768, 1024])
    assert "EMA of the trained weights (decay 0.99" in ema and "models/lora/raw/" in ema
    assert "512, 768, 1024 px (aspect buckets each)" in ema
    raw = training_table({"weights": "raw", "train": {"ema_decay": 0}, "lora": {}}, 512)
    assert "the last optimizer step's weights (no EMA)" in raw and "EMA of" not in raw
