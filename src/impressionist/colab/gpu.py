"""The runtime's GPU and RAM, read without importing torch (``nvidia-smi``, ``/proc/meminfo``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (8, 0) for A100


# GPUs without bf16 tensor cores (compute capability < 8.0) train in fp16 instead.
NO_BF16_NAMES = ("T4", "V100", "P100", "P4", "K80")


def has_bf16(name: str, capability: tuple[int, int] | None = None) -> bool:
    if capability is not None:
        return tuple(capability) >= (8, 0)
    return not any(re.search(rf"\b{tag}\b", name, re.IGNORECASE) for tag in NO_BF16_NAMES)



def detect_gpu(environ: dict[str, str] | None = None, runner=subprocess.run) -> Gpu | None:
    """The first visible GPU, from ``nvidia-smi`` (the notebook's kernel never imports torch, whose
    version the install cell may just have changed)."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return None
    tool = shutil.which("nvidia-smi")
    if not tool:
        return None
    first = (visible or "").split(",")[0].strip()
    select = ["-i", first] if first.isdigit() else []
    for fields in ("name,memory.total,compute_cap", "name,memory.total"):  # old drivers lack compute_cap
        result = runner([tool, *select, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                        capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            return parse_nvidia_smi(result.stdout)
    return None


def parse_nvidia_smi(text: str) -> Gpu | None:
    """``NVIDIA A100-SXM4-40GB, 40960, 8.0`` (memory in MiB) -> Gpu; the first line only."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    parts = [p.strip() for p in lines[0].split(",")]
    capability = None
    if len(parts) > 2 and re.fullmatch(r"\d+\.\d+", parts[2]):
        major, minor = parts[2].split(".")
        capability = (int(major), int(minor))
    return Gpu(parts[0], float(parts[1]) / 1024, capability)


def system_ram_gib(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", meminfo.read_text())
    except OSError:
        return None
    return int(match.group(1)) / 2**20 if match else None
