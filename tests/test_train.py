"""The trainer: it learns, it resumes exactly, and it resumes only runs with the same params."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cpu_recipe_params, killed_and_uninterrupted
from PIL import Image
from safetensors.torch import load_file

from impressionist import checkpoints, train
from impressionist.batch_order import BucketBatches
from impressionist.errors import UserError
from impressionist.flux_math import flow_matching_loss
from impressionist.latent_cache import CacheReader
from impressionist.params.model import MachinesParams
from impressionist.params.training import TrainParams

LORA_FILE = "pytorch_lora_weights.safetensors"


def outputs(root: Path) -> dict:
    return dict(lora_dir=root / "lora", checkpoint_dir=root / "ckpt", metrics_path=root / "train.json",
                loss_plot=root / "loss.png", live_dir=root / "dvclive", log_dir=root / "logs")


def small_run(params, steps, every=10, rank=4):
    params["train"].update(max_steps=steps, checkpoint_every=every, log_every=5)
    params["lora"]["rank"] = rank
    return params


def fixed_eval_loss(transformer, cache: CacheReader) -> float:
    """Loss on every cached sample with fixed noise and sigmas: comparable before/after training."""
    generator = torch.Generator().manual_seed(123)
    total = []
    for sample in cache.samples:
        latent = cache.latent(sample)[None].float()
        embeds, pooled = cache.text(sample["caption_key"])
        for sigma in (0.25, 0.5, 0.75):
            noise = torch.randn(latent.shape, generator=generator)
            with torch.no_grad():
                total.append(flow_matching_loss(transformer, latent, noise, torch.tensor([sigma]),
                                                embeds[None], pooled[None], 1.0).item())
    return sum(total) / len(total)


def test_training_lowers_the_loss(demo_params, encoded_cache, tiny_flux_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from diffusers import FluxPipeline

    params = small_run(demo_params, steps=300, every=0, rank=16)
    params["lora"].update(alpha=16, targets="all-linear")
    params["train"].update(learning_rate=2e-3, caption_dropout=0.0)
    train.run(params, encoded_cache, **outputs(tmp_path))
    cache = CacheReader(encoded_cache)

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, dtype=torch.float32, vae=None,
                                        text_encoder=None, text_encoder_2=None, tokenizer=None,
                                        tokenizer_2=None)
    before = fixed_eval_loss(pipe.transformer, cache)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    after = fixed_eval_loss(pipe.transformer, cache)
    # The velocity target noise - x has variance ~2 per element, so a random transformer's loss is
    # ~2; the irreducible part (the noise itself) stays. Fitting the 10 training images must still
    # remove a clear share: 15% is far above the run-to-run noise of this fixed-noise estimate.
    print(f"fixed-noise loss before {before:.4f} after {after:.4f}")
    assert after < 0.85 * before, (before, after)


def kept(root: Path) -> dict[str, list[str]]:
    """The checkpoint names in each run's folder under a checkpoint root."""
    return {run.name: sorted(p.name for p in run.iterdir()) for run in sorted(root.iterdir())}


def test_checkpoints_resume_only_matching_runs(demo_params, encoded_cache, tmp_path, capsys, monkeypatch):
    from helpers import assert_png_shows, record_figures

    monkeypatch.chdir(tmp_path)
    figures = record_figures(monkeypatch, train)
    out = outputs(tmp_path)
    first = train.run(small_run(demo_params, 20), encoded_cache, **out)["run_hash"]
    assert kept(out["checkpoint_dir"]) == {first: ["step-00000010", "step-00000020"]}
    capsys.readouterr()

    # More steps with the same params (a constant schedule): continues from the last checkpoint.
    summary = train.run(small_run(demo_params, 30), encoded_cache, **out)
    assert summary["resumed_from_step"] == 20 and summary["steps"] == 30 and summary["run_hash"] == first
    assert "resuming from" in capsys.readouterr().out
    # the loss plot of the resumed run is the whole logged curve, every log_every (5) steps from 5
    history = json.loads((out["lora_dir"] / "training_config.json").read_text())["history"]
    (curve,) = figures["loss.png"].axes[0].get_lines()
    assert list(curve.get_xdata()) == [h["step"] for h in history] == list(range(5, 31, 5))
    assert list(curve.get_ydata()) == [h["loss"] for h in history]
    assert_png_shows(out["loss_plot"], figures["loss.png"])
    # keep_checkpoints (2 in params.yaml) pruned step 10 once step 30 was written
    assert demo_params["train"]["keep_checkpoints"] == 2
    assert kept(out["checkpoint_dir"]) == {first: ["step-00000020", "step-00000030"]}

    # A different rank is another run: it starts at 0 in its own folder, the rank-4 run's stay.
    other = train.run(small_run(demo_params, 10, rank=8), encoded_cache, **out)
    log = capsys.readouterr().out
    assert other["resumed_from_step"] == 0 and "resuming" not in log
    assert "1 other run(s) keep checkpoints" in log
    assert load_file(out["lora_dir"] / LORA_FILE)[
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == 8
    assert kept(out["checkpoint_dir"]) == {first: ["step-00000020", "step-00000030"],
                                           other["run_hash"]: ["step-00000010"]}

    # Back to rank 4 (say, the first experiment applied again): it continues its own run.
    assert train.run(small_run(demo_params, 40), encoded_cache, **out)["resumed_from_step"] == 30
    # `impressionist clean-checkpoints` keeps the most recently checkpointed run.
    checkpoints.main(["--root", str(out["checkpoint_dir"]), "--dry-run"])
    assert other["run_hash"] in kept(out["checkpoint_dir"])
    checkpoints.main(["--root", str(out["checkpoint_dir"])])
    assert kept(out["checkpoint_dir"]) == {first: ["step-00000030", "step-00000040"]}


def test_sigkill_then_resume_gives_the_same_lora(demo_params, encoded_cache, tmp_path):
    params = small_run(demo_params, 30, every=10)
    uninterrupted, killed, resumed = killed_and_uninterrupted(params, encoded_cache, tmp_path)
    assert re.search(r"resuming from \.cache/checkpoints/[0-9a-f]+/step-00000010 at step 10", resumed)

    expected = load_file(uninterrupted / "models/lora" / LORA_FILE)
    got = load_file(killed / "models/lora" / LORA_FILE)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def _train_stage_repo(root: Path, params: dict, cache: Path) -> tuple[Path, dict[str, str]]:
    """A git + DVC repository holding the project's real train stage (dvc.yaml's definition), its
    code and a committed encode cache: `dvc exp run` runs just that stage."""
    repo_root = Path(__file__).resolve().parents[1]
    stage = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]["train"]
    root.mkdir()
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(repo_root / ".gitignore", root / ".gitignore")
    shutil.copytree(repo_root / "src/impressionist", root / "src/impressionist",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(cache, root / "data/cache")
    env = dict(os.environ, PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1", PYTHONPATH=str(root / "src"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "init"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)
    return root, env


@pytest.mark.slow  # two `dvc exp run`s: a minute or more
def test_a_killed_dvc_exp_run_resumes_in_the_next_dvc_exp_run(demo_params, encoded_cache, tmp_path):
    """`dvc exp run` force-checks-out the stage's outs before it runs: the checkpoints, outside
    them, survive a SIGKILL of the whole run, and the next `dvc exp run` continues from them."""
    repo, env = _train_stage_repo(tmp_path / "repo", small_run(demo_params, 30, every=10), encoded_cache)
    proc = subprocess.Popen(["dvc", "exp", "run"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("train: checkpoint"):
            os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage, as a lost VM would
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    assert not (repo / "models/lora").exists()

    second = subprocess.run(["dvc", "exp", "run"], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert re.search(r"train: resuming from \.cache/checkpoints/[0-9a-f]+/step-000000[1-3]0 at step [1-3]0 of 30",
                     second.stdout), second.stdout[-3000:]
    assert json.loads((repo / "metrics/train.json").read_text())["steps"] == 30


def test_resume_with_lora_dropout_gives_the_same_lora(demo_params, encoded_cache, tmp_path, monkeypatch):
    """Dropout draws from the global RNG, which load_state restores: nothing may draw from it in
    between (a DataLoader iterator would), or the resumed run drops other units."""
    monkeypatch.chdir(tmp_path)
    params = small_run(demo_params, 20, every=10)
    params["lora"]["dropout"] = 0.1
    whole, split = outputs(tmp_path / "whole"), outputs(tmp_path / "split")
    train.run(copy.deepcopy(params), encoded_cache, **whole)
    interrupted = copy.deepcopy(params)
    interrupted["train"]["max_steps"] = 10  # stops right after its step-10 checkpoint
    train.run(interrupted, encoded_cache, **split)
    assert train.run(copy.deepcopy(params), encoded_cache, **split)["resumed_from_step"] == 10

    expected = load_file(whole["lora_dir"] / LORA_FILE)
    got = load_file(split["lora_dir"] / LORA_FILE)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_a_rerun_continues_its_own_checkpoints_before_resume_from(demo_params, encoded_cache, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = outputs(tmp_path)
    earlier_run = train.run(small_run(copy.deepcopy(demo_params), 10), encoded_cache, **out)["run_hash"]
    earlier = out["checkpoint_dir"] / earlier_run / "step-00000010"

    # Another learning rate (another run hash), started from the earlier run's checkpoint...
    params = small_run(copy.deepcopy(demo_params), 20)
    params["train"].update(learning_rate=5e-4, resume_from=str(earlier))
    assert train.run(copy.deepcopy(params), encoded_cache, **out)["resumed_from_step"] == 10
    # ...and rerun with more steps (say after a disconnect): it continues from its own step 20.
    params["train"]["max_steps"] = 30
    capsys.readouterr()
    assert train.run(params, encoded_cache, **out)["resumed_from_step"] == 20
    assert "resuming from" in capsys.readouterr().out
    # the resume_from folder is another run's, but it was asked for: never discarded
    assert earlier.is_dir()


def test_resume_from_trains_with_the_new_optimizer_settings(demo_params, encoded_cache, tmp_path,
                                                            monkeypatch):
    """load_state restores the checkpoint's lr and weight decay; the run must use the params' ones."""
    monkeypatch.chdir(tmp_path)
    out = outputs(tmp_path)
    earlier_run = train.run(small_run(copy.deepcopy(demo_params), 10), encoded_cache, **out)["run_hash"]
    earlier = out["checkpoint_dir"] / earlier_run / "step-00000010"
    made = []
    real_make = train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda *args: made.append(real_make(*args)) or made[-1])

    params = small_run(copy.deepcopy(demo_params), 15)
    assert (params["train"]["learning_rate"], params["train"]["adam_weight_decay"]) != (5e-4, 0.03)
    params["train"].update(learning_rate=5e-4, adam_weight_decay=0.03, resume_from=str(earlier))
    summary = train.run(params, encoded_cache, **outputs(tmp_path / "b"))
    assert summary["resumed_from_step"] == 10
    for group in made[0].param_groups:
        assert group["lr"] == 5e-4 and group["weight_decay"] == 0.03
    history = json.loads((tmp_path / "b/lora/training_config.json").read_text())["history"]
    assert [h["lr"] for h in history if h["step"] > 10] == [5e-4]  # past warm-up: the new constant lr

    # Another optimizer cannot continue this optimizer state: one line, before any model loads.
    params["train"].update(optimizer="prodigy", learning_rate=1.0)
    monkeypatch.setattr(train, "base_model_of_cache", lambda *a, **k: pytest.fail("model resolved"))
    with pytest.raises(UserError, match="train.optimizer=adamw") as err:
        train.run(params, encoded_cache, **outputs(tmp_path / "c"))
    assert "\n" not in str(err.value)


def test_resume_unpickles_nothing(demo_params, encoded_cache, tmp_path, monkeypatch, no_pickle_loads):
    """Resuming reads the LoRA from safetensors and the optimizer and RNG state with
    weights_only=True; the learning-rate schedule is recomputed from the step, not unpickled."""
    monkeypatch.chdir(tmp_path)
    out = outputs(tmp_path)
    train.run(small_run(copy.deepcopy(demo_params), 5, every=5), encoded_cache, **out)
    assert train.run(small_run(copy.deepcopy(demo_params), 10, every=5), encoded_cache,
                     **out)["resumed_from_step"] == 5
    assert sorted(Path(f).name for f in no_pickle_loads) == ["optimizer.bin", "random_states_0.pkl"]


@pytest.mark.parametrize("change, message", [
    ({"lora": {"rank": 0}}, "lora.rank"),
    ({"lora": {"targets": ["to_q", "not_a_layer"]}}, "unknown module(s) not_a_layer"),
    ({"train": {"optimizer": "sgd"}}, "train.optimizer"),
    ({"train": {"optimizer": "adamw8bit"}}, "needs a CUDA GPU"),
    ({"train": {"mixed_precision": "fp16"}}, "needs a CUDA GPU"),
    ({"model": {"device": "cuda"}}, "no CUDA GPU"),
    ({"train": {"base_quantization": "nf4"}}, "nf4 needs a CUDA GPU"),
    ({"train": {"base_quantization": "fp8"}}, "fp8 needs a CUDA GPU"),
    ({"train": {"base_quantization": "int3"}}, "train.base_quantization"),
    ({"train": {"base_quantization": "nf4", "compile": True, "gradient_checkpointing": True}},
     "train.compile cannot be combined with train.base_quantization=nf4 and train.gradient_checkpointing"),
    ({"train": {"resume_from": "no/such/checkpoint"}}, "not a checkpoint written by the train stage"),
    ({"train": {"attention_backend": "_native_cudnn"}}, "_native_cudnn needs a CUDA GPU"),
    ({"train": {"attention_backend": "flashy"}}, "train.attention_backend"),
])
def test_bad_params_stop_with_one_line(demo_params, encoded_cache, tmp_path, change, message):
    if "CUDA" in message and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    for section, values in change.items():
        demo_params[section].update(values)
    out = outputs(tmp_path)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        train.run(demo_params, encoded_cache, **out)
    assert "\n" not in str(err.value)
    assert not out["lora_dir"].exists() and not out["checkpoint_dir"].exists()


def test_empty_or_missing_cache_is_refused(demo_params, tmp_path):
    with pytest.raises(UserError, match="run the encode_latents stage first"):
        train.run(demo_params, tmp_path / "nothing", **outputs(tmp_path))
    empty = tmp_path / "empty"
    for half in ("latents", "text"):
        (empty / half).mkdir(parents=True)
    (empty / "latents" / "index.json").write_text(json.dumps({"base_model": "builtin:tiny-flux", "samples": []}))
    with pytest.raises(UserError, match="run the encode_text stage first"):
        train.run(demo_params, empty, **outputs(tmp_path))
    (empty / "text" / "index.json").write_text(json.dumps({"base_model": "builtin:tiny-flux", "text": {},
                                                           "captions": {}}))
    with pytest.raises(UserError, match="is empty: no training images"):
        train.run(demo_params, empty, **outputs(tmp_path))


def _without(section: dict, key: str) -> dict:
    section.pop(key)
    return section


@pytest.mark.parametrize("change, message", [
    (lambda p: p["train"].update(lr_scheduler="cosine_annealing"), "train.lr_scheduler"),
    (lambda p: _without(p["train"], "lr_scheduler"), "'train.lr_scheduler' is missing"),
    (lambda p: _without(p["lora"], "rank"), "'lora.rank' is missing"),
    (lambda p: p["lora"].update(targets="everything"), "lora.targets"),
    (lambda p: p["lora"].update(init="orthogonal"), "lora.init"),
    (lambda p: p["lora"].update(dropout=1.5), "lora.dropout"),
    (lambda p: p["train"].update(optimizer="prodigy", learning_rate=1e-4), "train.learning_rate: 1.0"),
    (lambda p: p["train"]["validation"].update(every=5, steps=0), "train.validation.steps"),
    (lambda p: p["train"]["validation"].update(every=5, resolution=40), "train.validation.resolution"),
    (lambda p: _without(p["train"]["validation"], "guidance_scale"), "'train.validation.guidance_scale' is missing"),
    (lambda p: p["train"]["validation"].update(every=5, prompts=[]), "train.validation.prompts"),
])
def test_bad_params_are_refused_before_any_model_loads(demo_params, encoded_cache, tmp_path, monkeypatch,
                                                       change, message):
    monkeypatch.setattr(train, "base_model_of_cache", lambda *a, **k: pytest.fail("model resolved"))
    demo_params["train"]["validation"]["every"] = 30  # on, as in the demo
    change(demo_params)
    with pytest.raises(UserError, match=message) as err:
        train.run(demo_params, encoded_cache, **outputs(tmp_path))
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())


def test_run_hash_ignores_max_steps_only_under_a_constant_schedule(demo_params):
    def run_hash(**changes):
        params = copy.deepcopy(demo_params)
        params["train"].update(changes)
        return train.run_hash(params, "cache", 1)

    assert demo_params["train"]["lr_scheduler"] == "constant_with_warmup"
    assert run_hash(max_steps=10) == run_hash(max_steps=20)
    assert run_hash(max_steps=10, lr_scheduler="cosine") != run_hash(max_steps=20, lr_scheduler="cosine")
    # Recomputing activations, another attention kernel or compiled blocks do not change the maths:
    # toggling them keeps the checkpoints.
    assert run_hash(gradient_checkpointing=True) == run_hash(gradient_checkpointing=False)
    assert run_hash(attention_backend="_native_math") == run_hash(attention_backend="native")
    assert run_hash(compile=True) == run_hash(compile=False)
    assert run_hash(seed=1) != run_hash(seed=0)
    # The optimizer and its settings shape training: another one is another run.
    assert run_hash(optimizer="prodigy") != run_hash(optimizer="adamw")
    assert run_hash(adam_weight_decay=0.1) != run_hash(adam_weight_decay=0.0)
    assert run_hash(learning_rate=1e-3) != run_hash(learning_rate=1e-4)


def test_compiled_blocks_train_the_same_lora(demo_params, encoded_cache, tmp_path, monkeypatch):
    """train.compile: the repeated Flux blocks go through torch.compile (inductor, on the CPU here)
    and train the LoRA eager mode trains, up to float rounding."""
    from diffusers import FluxTransformer2DModel

    compiled = []
    real_compile = FluxTransformer2DModel.compile_repeated_blocks

    def recording_compile(model, *args, **kwargs):
        real_compile(model, *args, **kwargs)
        compiled.extend(type(m).__name__ for m in model.modules() if getattr(m, "_compiled_call_impl", None))

    monkeypatch.setattr(FluxTransformer2DModel, "compile_repeated_blocks", recording_compile)
    monkeypatch.chdir(tmp_path)
    loras = []
    for compile_ in (False, True):
        params = small_run(copy.deepcopy(demo_params), 3, every=0)
        params["train"]["compile"] = compile_
        out = outputs(tmp_path / f"compile{compile_}")
        train.run(params, encoded_cache, **out)
        loras.append(load_file(out["lora_dir"] / LORA_FILE))
    assert sorted(set(compiled)) == ["FluxSingleTransformerBlock", "FluxTransformerBlock"]
    assert loras[0].keys() == loras[1].keys()  # no compile wrapper in the parameter names
    assert all(torch.allclose(loras[0][k], loras[1][k], rtol=1e-4, atol=1e-6) for k in loras[0])


def test_an_attention_backend_trains_the_same_lora(demo_params, encoded_cache, tmp_path, monkeypatch):
    """The math SDPA kernel instead of PyTorch's default choice: the backend is really set, and the
    LoRA is the one the default trains, up to float rounding."""
    from diffusers import ModelMixin

    chosen = []
    real_set = ModelMixin.set_attention_backend
    monkeypatch.setattr(ModelMixin, "set_attention_backend",
                        lambda model, name: (chosen.append(name), real_set(model, name))[1])
    monkeypatch.chdir(tmp_path)
    loras = []
    for backend in ("native", "_native_math"):
        params = small_run(copy.deepcopy(demo_params), 4, every=0)
        params["train"]["attention_backend"] = backend
        out = outputs(tmp_path / backend)
        train.run(params, encoded_cache, **out)
        loras.append(load_file(out["lora_dir"] / LORA_FILE))
    assert chosen == ["_native_math"]  # native is diffusers' default: left alone
    assert any(v.abs().max() > 0 for k, v in loras[1].items() if "lora_B" in k)
    assert all(torch.allclose(loras[0][k], loras[1][k], rtol=1e-4, atol=1e-6) for k in loras[0])


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    def save(step, run="a"):
        staged = checkpoints.staging_folder(tmp_path, step)
        staged.mkdir(parents=True)
        return checkpoints.publish(tmp_path, step, {"run_hash": run, "step": step}, keep=1)

    for step in (10, 20, 30):
        save(step)
    save(5, run="b")  # another run's checkpoint is not this run's to prune
    # max_steps lowered below 30 (a constant schedule resumes): the new step-25 checkpoint stays
    assert save(25).is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005", "step-00000025", "step-00000030"]


def test_bucket_batches_are_deterministic_and_single_bucket():
    samples = [{"bucket": [64, 64]}] * 5 + [{"bucket": [48, 80]}] * 3
    order = BucketBatches(samples, batch_size=2, seed=3)
    assert order.batches_per_epoch == 3 + 2
    epoch0 = [order[i] for i in range(order.batches_per_epoch)]
    assert sorted(i for batch in epoch0 for i in batch) == list(range(8))  # each sample once
    for batch in epoch0:
        assert len({tuple(samples[i]["bucket"]) for i in batch}) == 1
    assert epoch0 == [BucketBatches(samples, 2, 3)[i] for i in range(5)]
    assert order[5] == order.epoch(1)[0] and order.epoch(1) != order.epoch(0)


def test_explicit_resume_refuses_another_base_model_or_lora_shape(demo_params, encoded_cache, tmp_path,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = outputs(tmp_path)
    run_hash = train.run(small_run(demo_params, 10), encoded_cache, **out)["run_hash"]
    checkpoint = out["checkpoint_dir"] / run_hash / "step-00000010"

    other_rank = small_run(copy.deepcopy(demo_params), 10, rank=8)
    other_rank["train"]["resume_from"] = str(checkpoint)
    with pytest.raises(UserError, match="another LoRA shape"):
        train.run(other_rank, encoded_cache, **outputs(tmp_path / "b"))

    meta = json.loads((checkpoint / "impressionist.json").read_text())
    meta["base_model"] = "black-forest-labs/FLUX.1-schnell"
    (checkpoint / "impressionist.json").write_text(json.dumps(meta))
    same = small_run(copy.deepcopy(demo_params), 12)
    same["train"]["resume_from"] = str(checkpoint)
    with pytest.raises(UserError, match="trained on black-forest-labs/FLUX.1-schnell"):
        train.run(same, encoded_cache, **outputs(tmp_path / "c"))


def test_validation_images_are_logged_to_both_trackers(demo_params, encoded_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = small_run(demo_params, 10, every=0)
    params["train"]["validation"] = {"every": 5, "prompts": ["trig, a harbor"], "seed": 0, "steps": 2,
                                     "guidance_scale": 3.5, "resolution": 32}
    out = outputs(tmp_path)
    train.run(params, encoded_cache, **out)
    image = out["live_dir"] / "plots/images/validation_0.png"
    assert Image.open(image).size == (32, 32)
    events = list(out["log_dir"].rglob("events.out.tfevents.*"))
    assert events and any(b"validation/0" in e.read_bytes() for e in events)


def test_two_gloo_processes_train_identical_loras(demo_params, encoded_cache, tmp_path, monkeypatch):
    """The stage's own command with train.num_processes: 2 launches two real DDP ranks through
    accelerate (gloo on CPU): every rank ends with the same LoRA, and it is the LoRA one process
    trains with the same params (the ranks split each step's micro-batches, not the recipe)."""
    params = small_run(demo_params, 6, every=3)
    params["train"].update(gradient_accumulation_steps=2, num_processes=2)
    shutil.copytree(encoded_cache, tmp_path / "data/cache")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "impressionist.train"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: launching 2 processes" in result.stdout
    config = json.loads((tmp_path / "models/lora/training_config.json").read_text())
    assert len(config["rank_checksums"]) == 2
    assert config["rank_checksums"][0] == config["rank_checksums"][1]
    # the number of processes is not part of the run hash: one process may resume this run
    assert config["run_hash"] == train.run_hash(params, CacheReader(tmp_path / "data/cache").index["fingerprint"], 1)

    single = copy.deepcopy(params)
    single["train"]["num_processes"] = 1
    monkeypatch.chdir(tmp_path)
    out = outputs(tmp_path / "single")
    train.run(single, tmp_path / "data/cache", **out)
    two_ranks, one_rank = load_file(tmp_path / "models/lora" / LORA_FILE), load_file(out["lora_dir"] / LORA_FILE)
    assert two_ranks.keys() == one_rank.keys()
    assert any(v.abs().max() > 0 for k, v in one_rank.items() if "lora_B" in k)  # it trained
    # gradients average across ranks instead of summing halves: equal up to float rounding
    assert all(torch.allclose(two_ranks[k], one_rank[k], rtol=1e-4, atol=1e-6) for k in one_rank)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine(params: dict, root: Path, encoded_cache: Path, rank: int, port: int, timeout_s: int = 120):
    """The stage's own command as machine ``rank`` of two on the loopback, in its own folder."""
    params = copy.deepcopy(params)
    params["compute"] = {"machines": dict(num_machines=2, machine_rank=rank, main_process_ip="127.0.0.1",
                                          main_process_port=port, join_timeout_s=timeout_s)}
    root.mkdir()
    shutil.copytree(encoded_cache, root / "data/cache")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.Popen([sys.executable, "-m", "impressionist.train"], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_machines_on_the_loopback_train_the_lora_of_one_process(demo_params, encoded_cache, tmp_path,
                                                                     monkeypatch):
    """compute.machines: two launches of the stage's command (accelerate --num_machines 2, machine
    ranks 0 and 1 on 127.0.0.1, one gloo process each) train the LoRA one process trains with the
    same effective batch (gradient_accumulation_steps counts micro-batches over every process)."""
    params = small_run(demo_params, 6, every=3)
    params["train"].update(gradient_accumulation_steps=2, num_processes=1)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # gloo: the CPU stands in for each machine's GPU
    port = free_port()
    first = machine(params, tmp_path / "m0", encoded_cache, 0, port)
    second = machine(params, tmp_path / "m1", encoded_cache, 1, port)
    results = [proc.communicate(timeout=600) for proc in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, results[0][1][-3000:] + results[1][1][-3000:]
    assert "on machine 0 of 2, 2 in all" in results[0][0] and "on machine 1 of 2" in results[1][0]
    config = json.loads((tmp_path / "m0/models/lora/training_config.json").read_text())
    assert len(config["rank_checksums"]) == 2 and config["rank_checksums"][0] == config["rank_checksums"][1]

    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.chdir(tmp_path)
    out = outputs(tmp_path / "single")
    train.run(params, tmp_path / "m0/data/cache", **out)
    two, one = load_file(tmp_path / "m0/models/lora" / LORA_FILE), load_file(out["lora_dir"] / LORA_FILE)
    assert two.keys() == one.keys()
    assert any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)  # it trained
    assert all(torch.allclose(two[k], one[k], rtol=1e-4, atol=1e-6) for k in one)


def test_a_machine_that_never_joins_stops_with_one_line_within_the_timeout(demo_params, encoded_cache, tmp_path,
                                                                         monkeypatch):
    params = small_run(demo_params, 2)
    params["train"].update(gradient_accumulation_steps=2, num_processes=1)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    first = machine(params, tmp_path / "m0", encoded_cache, 0, free_port(), timeout_s=5)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[-1]] and "did not all join" in errors[0] and "join_timeout_s=5 s" in errors[0], \
        stderr[-3000:]
    assert not (tmp_path / "m0/models/lora").exists()


def test_process_counts_are_checked_before_any_launch(demo_params):
    from impressionist import launcher

    cpu = torch.device("cpu")
    assert launcher.processes_to_launch(0, 4, cpu) == 1  # auto: 1 on CPU
    assert launcher.processes_to_launch(2, 4, cpu) == 2
    with pytest.raises(UserError, match="multiple of 3"):
        TrainParams.check({"train": {**demo_params["train"], "gradient_accumulation_steps": 4,
                                           "num_processes": 3}})
    assert launcher.largest_divisor_up_to(4, 8) == 4 and launcher.largest_divisor_up_to(12, 8) == 6
    assert launcher.under_launcher({"LOCAL_RANK": "0"}) and not launcher.under_launcher({})
    # compute.machines: accelerate's multi-node arguments, the join timeout as the rendezvous timeout
    two = MachinesParams.check({"compute": {"machines": {"num_machines": 2, "machine_rank": 1,
                                                                  "join_timeout_s": 30}}})
    assert two.several and "--machine_rank 1" in " ".join(two.launch_args())
    assert "timeout=30" in two.launch_args() and not MachinesParams.check({}).several
    with pytest.raises(UserError, match=r"machine_rank=2 must be 0 \.\. 1"):
        MachinesParams.check({"compute": {"machines": {"num_machines": 2, "machine_rank": 2}}})
    params = copy.deepcopy(demo_params)
    params["train"]["num_processes"] = -1
    with pytest.raises(UserError, match="train.num_processes"):
        TrainParams.check(params)
    # LoRA dropout draws each process's own masks: only then does the count enter the run hash
    assert train.run_hash(params, "c", 1) == train.run_hash(params, "c", 2)
    params["lora"]["dropout"] = 0.1
    assert train.run_hash(params, "c", 1) != train.run_hash(params, "c", 2)


def test_data_loader_workers_do_not_change_what_is_trained(demo_params, encoded_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loras = []
    for workers in (0, 2):
        params = small_run(copy.deepcopy(demo_params), 8, every=0)
        params["train"].update(dataloader_workers=workers, gradient_accumulation_steps=2)
        out = outputs(tmp_path / f"w{workers}")
        train.run(params, encoded_cache, **out)
        loras.append(load_file(out["lora_dir"] / LORA_FILE))
    assert loras[0].keys() == loras[1].keys()
    assert all(torch.equal(loras[0][k], loras[1][k]) for k in loras[0])


def test_bf16_recipe_trains_on_the_cpu(demo_params, encoded_cache, tmp_path, monkeypatch):
    """The real recipe's precision: bf16 base weights, bf16 autocast, fp32 LoRA weights. Run as the
    stage runs (its own process: accelerate keeps the first precision a process asks for)."""
    params = small_run(copy.deepcopy(demo_params), 6, every=0)
    params["model"]["dtype"] = "bfloat16"
    params["train"]["mixed_precision"] = "bf16"
    shutil.copytree(encoded_cache, tmp_path / "data/cache")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "impressionist.train"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    bf16 = load_file(tmp_path / "models/lora" / LORA_FILE)
    assert math.isfinite(json.loads((tmp_path / "metrics/train.json").read_text())["final_loss"])

    fp32_params = small_run(copy.deepcopy(demo_params), 6, every=0)
    monkeypatch.chdir(tmp_path)
    out = outputs(tmp_path / "fp32")
    train.run(fp32_params, encoded_cache, **out)
    fp32 = load_file(out["lora_dir"] / LORA_FILE)
    assert bf16.keys() == fp32.keys()
    assert all(v.dtype == torch.float32 for v in bf16.values())  # the LoRA trained in fp32
    b16, b32 = (torch.cat([lora[k].flatten() for k in sorted(lora) if "lora_B" in k]) for lora in (bf16, fp32))
    assert not torch.equal(b16, b32)  # bf16 arithmetic really ran
    assert torch.nn.functional.cosine_similarity(b16, b32, dim=0) > 0.99  # and learned the same thing


def test_the_recipe_draws_validation_images_in_bf16(encoded_cache, tmp_path):
    """params.yaml as committed (bf16 weights, bf16 autocast, checkpointing, EMA, validation on)
    with only the CPU's changes, run as the stage runs: the validation images of a bf16 run are
    drawn (they crashed, a 16-bit VAE fed fp32 latents), after each step's checkpoint."""
    params = cpu_recipe_params(max_steps=2)
    assert (params["model"]["dtype"], params["train"]["mixed_precision"]) == ("bfloat16", "bf16")
    shutil.copytree(encoded_cache, tmp_path / "data/cache")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "impressionist.train"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [line for line in result.stdout.splitlines() if line.startswith(("train: checkpoint", "train: validation"))]
    assert [line.split()[1] for line in log] == ["checkpoint", "validation"] * 2
    with Image.open(tmp_path / "dvclive/plots/images/validation_1.png") as image:
        assert image.size == (32, 32) and len(image.convert("RGB").getcolors(1 << 16) or []) > 1
    assert (tmp_path / "models/lora" / LORA_FILE).is_file()


def test_a_failing_validation_image_keeps_the_steps_checkpoint(demo_params, encoded_cache, tmp_path, monkeypatch):
    """The step's checkpoint is written before its validation images are drawn: a crash while
    drawing loses no training, and the rerun resumes at that step."""
    from impressionist.validation_images import ValidationSampler

    def broken(self, transformer):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(ValidationSampler, "images", broken)
    monkeypatch.chdir(tmp_path)
    params = small_run(demo_params, 4, every=2)
    params["train"]["validation"].update(every=2, resolution=32)
    out = outputs(tmp_path)
    with pytest.raises(RuntimeError, match="drawing failed"):
        train.run(params, encoded_cache, **out)
    (run_folder,) = out["checkpoint_dir"].iterdir()
    assert sorted(p.name for p in run_folder.iterdir()) == ["step-00000002"]
