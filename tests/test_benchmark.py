"""The benchmark script runs and reports both steps (figures themselves are not asserted)."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_profile_prints_a_row_per_case(tmp_path):
    out = tmp_path / "results.md"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_train_step.py"), "--profile", "cpu",
                             "--steps", "1", "--warmup", "0", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if re.match(r"\| \d+px", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["64px", "128px", "128px+ckpt"]
    for row in rows:
        speedup, ours, baseline = (cell.strip() for cell in row.split("|")[2:5])
        assert float(ours) > 0 and float(baseline) > 0
        # the printed times are rounded to 4 decimals: allow that much disagreement
        ratio = float(baseline) / float(ours)
        assert abs(float(speedup.rstrip("x")) - ratio) / ratio < 0.05


def test_gpu_profile_without_gpu_is_one_line():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_train_step.py"), "--profile", "gpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: --profile gpu needs a CUDA GPU")
