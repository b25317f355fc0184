"""Data-parallel inference stages: the process count, its refusals, the order restored, and the
stages' outs byte-identical on two gloo processes and on one."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import train_tiny_lora, write_filtered_dataset

from impressionist import data_parallel, evaluate, reference, sample
from impressionist.data_parallel import assemble, processes_for
from impressionist.errors import UserError
from impressionist.params.model import ComputeParams


def compute(n) -> ComputeParams:
    return ComputeParams.check({"compute": {"num_processes": n}})


def test_process_count_auto_explicit_and_refusals(monkeypatch):
    logged = []
    assert processes_for(compute("auto"), False, [5, 18], "sample", logged.append) == 1  # CPU: one
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert processes_for(compute("auto"), True, [5, 18], "sample", logged.append) == 4
    # auto never leaves a GPU without any work: the largest list decides, and says so
    assert processes_for(compute("auto"), True, [3, 2, 0], "sample", logged.append) == 3
    assert logged == ["sample: 3 of 4 GPUs: its largest work list has 3 item(s)"]
    assert processes_for(compute(2), False, [3, 0], "sample") == 2  # uneven (2 + 1) is fine
    assert processes_for(compute(2), False, [1, 18], "sample") == 2  # a rank idles in the 1-image list
    with pytest.raises(UserError, match="compute.num_processes=5 but 4 GPU"):
        processes_for(compute(5), True, [100], "sample")
    with pytest.raises(UserError, match="only 2 work item"):
        processes_for(compute(3), False, [2, 1], "evaluate")
    for bad in (0, -1, "all", True, 1.5):
        with pytest.raises(UserError, match="compute.num_processes"):
            compute(bad)
    assert ComputeParams.check({}).num_processes == "auto"  # an optional section


def test_several_machines_launch_even_one_process_each(monkeypatch):
    """compute.machines.num_machines > 1: the stage hands itself to accelerate's multi-node launch
    even with one process per machine (one machine and one process launch nothing)."""
    calls = []
    monkeypatch.setattr(data_parallel.launcher, "relaunch", lambda *a, **k: calls.append(k["machines"]))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert not data_parallel.launch("sample", "impressionist.sample", [], {"compute": {"num_processes": 1}},
                                    False, [4])
    machines = {"num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.1"}
    assert data_parallel.launch("sample", "impressionist.sample", [],
                                {"compute": {"num_processes": 1, "machines": machines}}, False, [4])
    assert [(m.num_machines, m.machine_rank, m.main_process_ip) for m in calls] == [(2, 1, "10.0.0.1")]


def test_assemble_restores_the_items_order_and_refuses_gaps():
    # shares as ranks could return them: rank 1 first, each out of order
    shares = [[(3, "d"), (1, "b")], [(0, "a"), (4, "e"), (2, "c")]]
    assert assemble(shares, 5) == ["a", "b", "c", "d", "e"]
    with pytest.raises(RuntimeError, match="not 0..4"):
        assemble([[(0, "a"), (1, "b")], [(3, "d"), (4, "e")]], 5)
    with pytest.raises(RuntimeError):
        assemble([[(0, "a"), (1, "b")], [(1, "b")]], 2)


def test_one_process_maps_in_place():
    assert data_parallel.map_in_order([3, 1, 2], lambda x: x * 10) == [30, 10, 20]


def test_a_count_beyond_the_work_is_one_line_before_any_model(demo_params, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = small(demo_params)
    params["compute"] = {"num_processes": 19}  # the eval set has 18 images, the show set 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(sample, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--base", "--params", str(tmp_path / "params.yaml")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: compute.num_processes=19 but sample_base has only 18 work item(s)")
    assert "\n" not in err and not (tmp_path / "samples").exists()


def small(params):
    """Uneven shares on two ranks: 3 show images, 18 eval images per model (16 + 2 per feature
    batch), 18 validation paintings (2 feature batches)."""
    params["sample"].update(prompts=["a harbor", "a field", "a bridge"], seeds=[0], resolution=32, steps=2,
                            lora_scales=[0.5, 1.0], val_captions=0)
    params["sample"]["eval_set"].update(num_subjects=9, seeds=[0, 1], resolution=32, steps=2)
    params["evaluate"]["bootstrap_resamples"] = 200
    return params


STAGES = [["impressionist.sample", "--base"], ["impressionist.sample"], ["impressionist.reference"],
          ["impressionist.evaluate"]]
OUTS = ["samples", "data/reference", "metrics", "plots"]


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for out in OUTS for p in sorted((root / out).rglob("*")) if p.is_file()}


def test_two_gloo_processes_write_the_same_bytes_as_one(demo_params, encoded_cache, tmp_path, monkeypatch):
    """Each data-parallel stage's own command with compute.num_processes: 2 launches two gloo ranks;
    every out (images, tables, features, metrics, plots) is byte for byte the one-process out."""
    params = small(demo_params)
    lora = train_tiny_lora(tmp_path / "train", params, encoded_cache)
    filtered, _ = write_filtered_dataset(tmp_path / "data_src", n_images=108)  # every 6th is val: 18
    runs = {}
    for count in (2, 1):
        root = tmp_path / f"x{count}"
        shutil.copytree(lora, root / "models/lora")
        shutil.copytree(filtered, root / "data/filtered")
        run_params = copy.deepcopy(params)
        run_params["compute"] = {"num_processes": count}
        (root / "params.yaml").write_text(yaml.safe_dump(run_params))
        for stage in STAGES:
            if count == 1:  # in this process, as one process
                monkeypatch.chdir(root)
                {"impressionist.sample": sample, "impressionist.reference": reference,
                 "impressionist.evaluate": evaluate}[stage[0]].main(stage[1:])
                continue
            result = subprocess.run([sys.executable, "-m", *stage], cwd=root, capture_output=True, text=True,
                                    timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
            assert "launching 2 processes (CPU, gloo)" in result.stdout, result.stdout[-2000:]
        runs[count] = files_of(root)
    one, two = runs[1], runs[2]
    assert len([f for f in one if f.endswith(".png") and "/eval/" in f]) == 3 * 18
    assert "data/reference/features.safetensors" in one and "metrics/eval.json" in one
    assert sorted(two) == sorted(one)
    differ = [name for name in one if one[name] != two[name]]
    assert not differ, f"differ between 1 and 2 processes: {differ}"
