"""Sampling with and without the LoRA, the grid, and the refusals."""

import pandas as pd
import pytest
from PIL import Image

from impressionist import sample, train
from impressionist.errors import UserError


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, _demo_params_master, encoded_cache):
    import copy

    root = tmp_path_factory.mktemp("lora")
    params = copy.deepcopy(_demo_params_master)
    params["train"].update(max_steps=5, checkpoint_every=0)
    train.run(params, encoded_cache, lora_dir=root / "lora", checkpoint_dir=root / "ckpt",
              metrics_path=root / "m.json", loss_plot=root / "loss.png", live_dir=root / "live",
              log_dir=root / "logs")
    return root / "lora"


def small(params):
    params["sample"].update(prompts=["a harbor at sunset", "a field"], seeds=[0, 1], resolution=32,
                            steps=2, lora_scales=[0.5, 1.0])
    return params


def test_base_then_lora_samples_and_grid(demo_params, trained_lora, tmp_path):
    params = small(demo_params)
    sample.run_base(params, tmp_path / "base")
    base = pd.read_csv(tmp_path / "base/samples.csv")
    assert len(base) == 4 and set(base.lora_scale) == {0.0}
    assert base.prompt.iloc[0] == f"{params['caption']['trigger']}, a harbor at sunset"
    assert Image.open(tmp_path / "base" / base.file.iloc[0]).size == (32, 32)

    sample.run_lora(params, trained_lora, tmp_path / "base", tmp_path / "lora", tmp_path / "grid.png")
    lora = pd.read_csv(tmp_path / "lora/samples.csv")
    assert sorted(lora.lora_scale.unique()) == [0.5, 1.0] and len(lora) == 8
    assert Image.open(tmp_path / "grid.png").size[0] > 3 * 32

    # Same prompt and seed: the LoRA changes the picture, and the scale matters.
    def pixels(folder, table, scale):
        row = table[(table.seed == 0) & (table.lora_scale == scale)].iloc[0]
        return Image.open(folder / row.file).tobytes()
    base_px = pixels(tmp_path / "base", base, 0.0)
    assert pixels(tmp_path / "lora", lora, 1.0) != base_px
    assert pixels(tmp_path / "lora", lora, 0.5) != pixels(tmp_path / "lora", lora, 1.0)


def test_sampling_is_deterministic(demo_params, tmp_path):
    params = small(demo_params)
    params["sample"]["prompts"] = ["a field"]
    sample.run_base(params, tmp_path / "a")
    sample.run_base(params, tmp_path / "b")
    for name in pd.read_csv(tmp_path / "a/samples.csv").file:
        assert Image.open(tmp_path / "a" / name).tobytes() == Image.open(tmp_path / "b" / name).tobytes()


def test_refusals(demo_params, tmp_path):
    params = small(demo_params)
    with pytest.raises(UserError, match="no LoRA"):
        sample.run_lora(params, tmp_path / "missing", tmp_path / "base", tmp_path / "out", tmp_path / "g.png")
    params["sample"]["prompts"] = []
    with pytest.raises(UserError, match="sample.prompts"):
        sample.run_base(params, tmp_path / "base")
    params = small(demo_params)
    params["sample"]["resolution"] = 40
    with pytest.raises(UserError, match="multiple of 16"):
        sample.run_base(params, tmp_path / "base")
    assert not (tmp_path / "base").exists() and not (tmp_path / "out").exists()
