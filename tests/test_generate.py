"""`impressionist generate`: one image, equal to the sample stage's image for the same prompt, seed,
LoRA scale and inference settings (it calls the stage's loader and draw function)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from helpers import train_tiny_lora

from impressionist import cli, generate, sample
from impressionist.errors import UserError


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, _demo_params_master, encoded_cache):
    return train_tiny_lora(tmp_path_factory.mktemp("generate-lora"), _demo_params_master, encoded_cache)


def small(params):
    params["sample"].update(prompts=["a harbor at sunset"], seeds=[0, 3], resolution=32, steps=2,
                            lora_scales=[0.5, 1.0], val_captions=0)
    params["sample"]["eval_set"].update(num_subjects=1, seeds=[0], resolution=32, steps=2)
    return params


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_generate_equals_the_sample_stages_image(demo_params, trained_lora, tmp_path, capsys):
    params = small(demo_params)
    sample.run_base(params, tmp_path / "base")
    sample.run_lora(params, trained_lora, tmp_path / "base", tmp_path / "lora", tmp_path / "grid.png")
    table = pd.read_csv(tmp_path / "lora/samples.csv")
    row = table[(table.seed == 3) & (table.lora_scale == 0.5)].iloc[0]
    out = generate.run(params, row.prompt, trained_lora, 0.5, 3, tmp_path / "one.png")
    assert np.array_equal(pixels(out), pixels(tmp_path / "lora" / row.file))
    # and the base model (scale 0) is the base sample
    base = pd.read_csv(tmp_path / "base/samples.csv")
    base_row = base[base.seed == 3].iloc[0]
    generate.run(params, base_row.prompt, trained_lora, 0.0, 3, tmp_path / "base.png")
    assert np.array_equal(pixels(tmp_path / "base.png"), pixels(tmp_path / "base" / base_row.file))
    assert not np.array_equal(pixels(out), pixels(tmp_path / "base.png"))  # the LoRA matters


def test_refusals_are_one_line_before_any_model(demo_params, tmp_path, capsys):
    with pytest.raises(UserError, match="must end in"):
        generate.run(demo_params, "a field", None, 1.0, 0, tmp_path / "x.txt")
    with pytest.raises(UserError, match="no LoRA"):
        generate.run(demo_params, "a field", tmp_path / "none", 1.0, 0, tmp_path / "x.png")
    with pytest.raises(UserError, match="scale"):
        generate.run(demo_params, "a field", None, -1.0, 0, tmp_path / "x.png")
    # valid params (the entry checks `model` and `sample` first), so the refusal is the --out one
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(demo_params))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "a field", "--out", str(tmp_path / "x.gif"), "--params", str(tmp_path / "params.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: generate: --out") and "\n" not in err
