"""Train on Google Colab and survive runtime disconnects: everything a rerun needs lives on Drive.

A Colab runtime that disconnects comes back with an empty local disk, so the notebook
(``notebooks/train_colab.ipynb``) clones the repository again into fast local disk on every
session. What DVC needs to skip finished stages, and what training needs to resume, is kept in a
project folder on Google Drive instead (:class:`DriveLayout`):

- ``dvc-cache/``: the DVC cache (``dvc cache dir --local``). DVC copies every cached output into it
  as each stage finishes, so finished outputs are on Drive before ``dvc.lock`` says so.
- ``checkpoints/``: ``.cache/checkpoints`` (the trainer's checkpoint root, one folder per run
  hash) is a symlink to it, so each ``accelerator.save_state`` checkpoint is written straight to
  Drive.
- ``state/``: a mirror of ``dvc.lock`` and of the outs DVC does not cache (metrics, plots,
  ``dvclive/``), copied while the run goes on (:class:`StateMirror`) and restored into a fresh clone.
  ``dvc.lock`` is what tells DVC that a stage has finished; the run-cache cannot replace it, since
  DVC keeps no run-cache for stages with ``persist`` outs (download).
- ``logs/``: the full output of every run (the notebook's own output is lost with the runtime).
- ``recipe.json``: the recipe the first run chose for its GPU (:func:`keep_first_recipe`). A runtime
  after a disconnect may get another GPU; choosing afresh would change params that shape training
  (``model.dtype``, ``train.base_quantization``, ``train.optimizer``, ``train.mixed_precision``) and
  silently start training over, so later runs keep the first recipe's training params (memory
  settings follow the GPU at hand) or stop with one line when this GPU cannot run them.

The run writes the overrides into ``params.yaml`` exactly as ``dvc exp run -S`` would, then runs
``dvc repro --pull --allow-missing``: a finished stage whose outputs are only in the cache is skipped
without copying them back (``--allow-missing``), and a stage that has to run gets its missing inputs
checked out of the cache first (``--pull``; a resumed train needs only ``data/cache``).

Why ``dvc repro`` and not ``dvc exp run``: the run is one line of work per Drive project, not an
experiment to compare, and ``--pull --allow-missing`` skips finished stages whose outputs are only
on Drive. (Checkpoints would survive ``dvc exp run`` too: they are not a DVC output.)

Why not keep the whole working copy on Drive: Drive's FUSE mount is slow and unreliable with
thousands of small files in one folder (``data/raw/images``), git and DVC would keep their lock and
index files on it, and every output would be stored twice on Drive (workspace and cache).

Choices are functions, so they are tested: :func:`gpu_overrides` (which recipe for which GPU),
:func:`keep_first_recipe`, :class:`DriveLayout` (where things go on Drive), :func:`repro_command`,
:func:`state_paths`.

Local test mode: ``IMPRESSIONIST_COLAB_LOCAL=/some/folder`` makes that folder stand in for Google
Drive, skips the Hub login (no token) and the package installs, so the notebook runs headless
on CPU (``tests/test_colab.py``). ``IMPRESSIONIST_REPO=/path/to/checkout`` makes the notebook use
an existing checkout instead of cloning (its first cell reads it, before this package can be
imported).
"""

from __future__ import annotations

import codecs
import getpass
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from .cli import apply_overrides, demo_overrides, hydra_value
from .dvc_cli import dvc_environment, dvc_executable, run_dvc
from .errors import UserError, atomic_write_bytes, atomic_write_text, first_line
from .hub import is_hub_id
from .layout import CHECKPOINT_ROOT, EVAL_METRICS, SAMPLE_GRID, TRAIN_METRICS

ENV_LOCAL = "IMPRESSIONIST_COLAB_LOCAL"  # a folder standing in for Drive: local test mode
DRIVE_MOUNT = Path("/content/drive")
DRIVE_HOME = DRIVE_MOUNT / "MyDrive"
DEFAULT_PROJECT = "impressionist"
CHECKPOINTS = CHECKPOINT_ROOT  # the trainer's checkpoint root
PREPARED_MARKER = Path(".dvc/tmp/impressionist-colab.json")  # .dvc/tmp is git-ignored
TOKEN_SECRET = "HF_TOKEN"
# DVC logs this right before it rewrites dvc.lock after a stage: the mirror then syncs soon.
LOCK_UPDATE = re.compile(r"(Updating|Generating) lock file 'dvc\.lock'")


def _say(message: str) -> None:
    print(f"colab: {message}", flush=True)


# --------------------------------------------------------------------------- environment, Drive

@dataclass(frozen=True)
class Environment:
    """Where the notebook runs: on Colab with Google Drive, or in local test mode."""

    on_colab: bool
    drive_root: Path  # MyDrive on Colab; the IMPRESSIONIST_COLAB_LOCAL folder in test mode

    @property
    def local_test(self) -> bool:
        return not self.on_colab


def detect_environment(environ: dict[str, str] | None = None) -> Environment:
    environ = os.environ if environ is None else environ
    local = environ.get(ENV_LOCAL, "").strip()
    if local:
        return Environment(on_colab=False, drive_root=Path(local).expanduser().resolve())
    try:
        import google.colab  # noqa: F401
    except ImportError:
        raise UserError(f"this is not a Google Colab runtime; to try the notebook elsewhere set "
                        f"{ENV_LOCAL}=/a/folder (it stands in for Google Drive, no Hub login)") from None
    return Environment(on_colab=True, drive_root=DRIVE_HOME)


@dataclass(frozen=True)
class DriveLayout:
    """The project folder on Drive and what each subfolder holds (see the module docstring)."""

    root: Path

    @classmethod
    def under(cls, drive_root: Path | str, project: str = DEFAULT_PROJECT) -> "DriveLayout":
        if not project or Path(project).is_absolute() or ".." in Path(project).parts:
            raise UserError(f"PROJECT={project!r} must be a folder name inside your Drive, e.g. "
                            f"{DEFAULT_PROJECT!r}")
        return cls(Path(drive_root) / project)

    @property
    def dvc_cache(self) -> Path:
        return self.root / "dvc-cache"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def recipe(self) -> Path:
        """The first run's recipe (:func:`keep_first_recipe`); beside ``state/``, which mirrors repo files."""
        return self.root / "recipe.json"

    def create(self) -> "DriveLayout":
        for folder in (self.dvc_cache, self.checkpoints, self.state, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def mount_drive(env: Environment, project: str = DEFAULT_PROJECT) -> DriveLayout:
    """Mount Google Drive (Colab asks for permission once) and create the project folder."""
    if env.on_colab and not DRIVE_HOME.is_dir():
        from google.colab import drive

        drive.mount(str(DRIVE_MOUNT))
    elif env.local_test:
        env.drive_root.mkdir(parents=True, exist_ok=True)
    layout = DriveLayout.under(env.drive_root, project).create()
    _say(f"project folder {layout.root} ({'Google Drive' if env.on_colab else 'local test mode'})")
    return layout


# --------------------------------------------------------------------------- Hub login

def login(env: Environment, model: str | None = None, *, token: str | None = None,
          prompt: Callable[[str], str] = getpass.getpass) -> None:
    """Make a Hugging Face token available to the pipeline, never echoing or saving it.

    The token comes from the Colab secret ``HF_TOKEN`` or a hidden prompt, is checked against the
    Hub (and against ``model``'s gate, e.g. FLUX.1-dev's licence) and is put in this process's
    environment only, where the ``dvc`` child processes inherit it. Nothing is written to disk
    (``huggingface_hub.login`` would store it under ~/.cache). Skipped in local test mode.
    """
    if env.local_test:
        _say("local test mode: no Hugging Face login")
        return
    token = (token or _colab_secret(TOKEN_SECRET)
             or prompt("Hugging Face token (input hidden; add a Colab secret HF_TOKEN to skip this): "))
    token = (token or "").strip()
    if not token:
        raise UserError("no Hugging Face token: add a Colab secret named HF_TOKEN (key icon on the "
                        "left) with a token that has accepted the FLUX.1-dev licence, or paste one")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    api = HfApi()
    try:
        user = api.whoami(token=token)["name"]
    except Exception as err:  # never format the exception: some echo request headers
        raise UserError(f"the Hugging Face Hub refused this token or cannot be reached "
                        f"({type(err).__name__}); create a read token at "
                        "https://huggingface.co/settings/tokens") from None
    if model and is_hub_id(model):
        try:
            api.auth_check(model, token=token)
        except (GatedRepoError, RepositoryNotFoundError) as err:
            raise UserError(f"your token has no access to {model} ({type(err).__name__}); accept its "
                            f"licence at https://huggingface.co/{model} and run this cell again") from None
        except Exception as err:
            raise UserError(f"could not check access to {model} on the Hub ({type(err).__name__}); "
                            "check the network and run this cell again") from None
    os.environ["HF_TOKEN"] = token
    _say(f"logged in to the Hugging Face Hub as {user} (the token stays in this runtime's memory)")


def _colab_secret(name: str) -> str | None:
    try:
        from google.colab import userdata

        return userdata.get(name)
    except Exception:  # no secret, access not granted, or not on Colab: fall back to the prompt
        return None


# --------------------------------------------------------------------------- GPU -> recipe

@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (8, 0) for A100


# FLUX.1-dev's transformer has 11.9B parameters: 23.8 GB in bf16, about 6.7 GB in NF4. Text encoders
# and VAE never load while training (encode caches their outputs). Thresholds, in GiB of GPU memory:
LARGE_GIB = 70.0  # 80 GB cards (A100-80GB, H100): bf16 weights plus the activations of the recipe's
                  # 1024 px batches *without* gradient checkpointing (47.8 GiB of tensors estimated
                  # with an attention LoRA, benchmarks/RESULTS.md; somewhat more for all-linear) fit.
BF16_GIB = 35.0   # A100-40GB, L40S, A6000: bf16 weights fit; activations need gradient checkpointing
                  # (the recipe's peak, 1024 px, all-linear LoRA + EMA: 25.6 GiB estimated).
MIN_GIB = 14.0    # T4 (15 GiB): NF4 weights + checkpointing at the recipe's 1024 px: 9.4 GiB estimated
                  # (with fp32 AdamW; the recipe's 8-bit AdamW needs less).
SAMPLE_ON_GPU_GIB = 70.0  # the whole sampling pipeline (transformer + 9.5 GB T5 + CLIP + VAE) stays
                          # on the GPU; below, sample moves each model in only while it runs.
SAMPLE_MIN_GIB = 26.0     # with model offload the 16-bit transformer alone (23.8 GB) must fit;
                          # below, sequential offload streams the weights layer by layer (slow).
OFFLOAD_RAM_GIB = 40.0    # model offload holds the whole bf16 pipeline (~34 GB) in system RAM.
# GPUs without bf16 tensor cores (compute capability < 8.0) train in fp16 instead.
NO_BF16_NAMES = ("T4", "V100", "P100", "P4", "K80")
# How often to checkpoint: a disconnect loses at most this many steps (params.yaml's 250 could be an
# hour on a T4); NF4 steps are slower, so more often. A checkpoint (LoRA + optimizer state, a few
# hundred MB) takes seconds to write to Drive. checkpoint_every does not shape training, so
# changing it keeps existing checkpoints valid.
CHECKPOINT_EVERY_BF16 = 100
CHECKPOINT_EVERY_NF4 = 50


def has_bf16(name: str, capability: tuple[int, int] | None = None) -> bool:
    if capability is not None:
        return tuple(capability) >= (8, 0)
    return not any(re.search(rf"\b{tag}\b", name, re.IGNORECASE) for tag in NO_BF16_NAMES)


# The overrides that shape what training learns (the trainer hashes them into its checkpoints'
# run hash): a rerun on another GPU must keep the first run's, or training starts over. The others
# (memory_overrides) only trade memory for speed and follow the GPU at hand.
TRAINING_KEYS = ("model.device", "model.dtype", "train.mixed_precision", "train.base_quantization",
                 "train.optimizer")


def training_overrides(bf16: bool, quantized: bool) -> dict[str, Any]:
    """The GPU recipe's params that shape training (:data:`TRAINING_KEYS`)."""
    return {
        "model.device": "cuda",
        "model.dtype": "bfloat16" if bf16 else "float16",
        "train.mixed_precision": "bf16" if bf16 else "fp16",
        "train.base_quantization": "nf4" if quantized else "none",
        "train.optimizer": "adamw8bit" if quantized else "adamw",
    }


def memory_overrides(memory_gib: float, quantized: bool) -> dict[str, Any]:
    """The GPU recipe's memory and speed settings for a GPU of ``memory_gib`` GiB."""
    return {
        "train.gradient_checkpointing": memory_gib < LARGE_GIB,
        "train.checkpoint_every": CHECKPOINT_EVERY_NF4 if quantized else CHECKPOINT_EVERY_BF16,
        "sample.offload": ("none" if memory_gib >= SAMPLE_ON_GPU_GIB else
                           "model" if memory_gib >= SAMPLE_MIN_GIB else "sequential"),
    }


def gpu_overrides(name: str, memory_gib: float,
                  capability: tuple[int, int] | None = None) -> dict[str, Any]:
    """The params overrides for training FLUX.1-dev on one GPU of this name and memory (GiB).

    Training: >= 70 GiB: bf16 base, no gradient checkpointing; 35-70: bf16 + checkpointing; 14-35
    (L4, T4, V100 32 GB): NF4 base (QLoRA) + checkpointing + 8-bit AdamW; fp16 where the GPU has no
    bf16. Sampling (``sample.offload``): >= 70 GiB none; 26-70 model; below 26 sequential.
    """
    if memory_gib < MIN_GIB:
        raise UserError(f"the GPU {name} has {memory_gib:.1f} GiB; training FLUX.1-dev needs at least "
                        f"{MIN_GIB:.0f} GiB (a T4 or better): pick another runtime type")
    quantized = memory_gib < BF16_GIB
    return {**training_overrides(has_bf16(name, capability), quantized),
            **memory_overrides(memory_gib, quantized)}


@dataclass(frozen=True)
class Recipe:
    name: str
    overrides: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    gpu: Gpu | None = None  # the GPU it was chosen for (None: no GPU)
    demo: bool = False      # the offline demo (configs/demo.yaml) rather than a GPU recipe

    def describe(self) -> str:
        lines = [f"recipe: {self.name}"] + [f"  {k} = {v}" for k, v in self.overrides.items()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def choose_recipe(gpu: Gpu | None, demo: dict[str, Any], *, profile: str = "auto",
                  ram_gib: float | None = None) -> Recipe:
    """``profile`` "auto": the GPU recipe, or the offline demo without a GPU; "demo": always the demo."""
    if profile not in ("auto", "demo"):
        raise UserError(f"PROFILE={profile!r} must be 'auto' or 'demo'")
    if profile == "demo" or gpu is None:
        why = "PROFILE='demo'" if gpu is not None else "no GPU in this runtime"
        return Recipe("offline demo (configs/demo.yaml)", dict(demo), [
            f"{why}: the tiny random-weight Flux model on SYNTHETIC images, on CPU; its metrics say "
            "nothing about real paintings. For the real run pick a GPU runtime (Runtime > Change "
            "runtime type)."], gpu=gpu, demo=True)
    overrides = gpu_overrides(gpu.name, gpu.memory_gib, gpu.capability)
    return Recipe(f"{gpu.name} ({gpu.memory_gib:.0f} GiB): {_training_kind(overrides)}", overrides,
                  _sampling_notes(overrides, gpu, ram_gib), gpu=gpu)


def _training_kind(overrides: dict[str, Any]) -> str:
    return ("NF4 base (QLoRA) + 8-bit AdamW" if overrides["train.base_quantization"] == "nf4"
            else "bf16 base" if overrides["model.dtype"] == "bfloat16" else "fp16 base")


def _sampling_notes(overrides: dict[str, Any], gpu: Gpu, ram_gib: float | None) -> list[str]:
    notes = []
    if overrides["sample.offload"] == "sequential":
        notes.append(f"the 16-bit FLUX.1-dev transformer (23.8 GB) does not fit this GPU's "
                     f"{gpu.memory_gib:.0f} GiB: sampling streams its weights layer by layer "
                     "(sample.offload: sequential), which is slow")
    if overrides["sample.offload"] != "none" and ram_gib is not None and ram_gib < OFFLOAD_RAM_GIB:
        notes.append(f"sampling with model offload holds the pipeline (~34 GB) in system RAM but this "
                     f"runtime has {ram_gib:.0f} GiB: enable High-RAM (Runtime > Change runtime type)")
    return notes


def keep_first_recipe(path: Path | str, recipe: Recipe, ram_gib: float | None = None) -> Recipe:
    """The recipe for this run of a Drive project whose first run chose ``path``'s recipe.

    The first run saves its recipe to ``path``. A later run on a runtime that chose ``recipe`` (it
    may have another GPU, or none) keeps the first recipe's training params (:data:`TRAINING_KEYS`,
    which the trainer's run hash covers: another value would start training over) with memory
    settings for its own GPU, or stops with one line saying how to reset when it cannot run them.
    """
    path = Path(path)
    reset = (f"or start over with this runtime's recipe: delete {path} (training restarts from step 0) "
             "or set PROJECT to a new folder")
    if not path.is_file():
        record = {"name": recipe.name, "demo": recipe.demo, "gpu": recipe.gpu.name if recipe.gpu else None,
                  "training": {} if recipe.demo else {k: recipe.overrides[k] for k in TRAINING_KEYS}}
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
        return recipe
    try:
        first = json.loads(path.read_text())
        name, was_demo, training = str(first["name"]), bool(first["demo"]), dict(first["training"])
        if not was_demo and set(training) != set(TRAINING_KEYS):
            raise ValueError(f"training params {sorted(training)}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a recipe this notebook wrote ({first_line(err, 120)}); delete it to "
                        "choose the recipe afresh (training restarts from step 0)") from err
    if was_demo or recipe.demo:
        if was_demo and recipe.demo:
            return recipe
        now = ("the offline demo (" + ("PROFILE='demo')" if recipe.gpu else "no GPU in this runtime)")
               if recipe.demo else f"a {recipe.gpu.name}")
        raise UserError(f"this PROJECT's first run used the recipe {name!r} but this runtime gets {now}; "
                        f"run it on a runtime like the first one (Runtime > Change runtime type), {reset}")
    if {k: recipe.overrides[k] for k in TRAINING_KEYS} == training:
        return recipe
    gpu = recipe.gpu
    quantized = training["train.base_quantization"] != "none"
    lacks = []
    if training["model.dtype"] == "bfloat16" and not has_bf16(gpu.name, gpu.capability):
        lacks.append("bf16")
    if gpu.memory_gib < (MIN_GIB if quantized else BF16_GIB):
        lacks.append(f"{MIN_GIB if quantized else BF16_GIB:.0f} GiB")
    if lacks:
        raise UserError(f"this PROJECT trains with the recipe of its first run ({name}), which needs "
                        f"{' and '.join(lacks)} that this runtime's {gpu.name} ({gpu.memory_gib:.0f} GiB) "
                        f"lacks; another recipe would restart training. Pick a runtime with a GPU like the "
                        f"first one (Runtime > Change runtime type), {reset}")
    overrides = {**training, **memory_overrides(gpu.memory_gib, quantized)}
    notes = _sampling_notes(overrides, gpu, ram_gib) + [
        f"kept the training params of this PROJECT's first run ({name}) so that training resumes; "
        f"memory settings for this {gpu.name}"]
    return Recipe(f"{gpu.name} ({gpu.memory_gib:.0f} GiB): {_training_kind(overrides)}, as the first run",
                  overrides, notes, gpu=gpu)


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


def select_recipe(repo: Path | str, profile: str = "auto", layout: DriveLayout | None = None) -> Recipe:
    """The recipe for this runtime: detect the GPU and RAM, read the demo overrides from the repo.

    With ``layout``, the Drive project's first recipe is kept (:func:`keep_first_recipe`).
    """
    ram_gib = system_ram_gib()
    recipe = choose_recipe(detect_gpu(), demo_overrides(Path(repo) / "configs/demo.yaml"),
                           profile=profile, ram_gib=ram_gib)
    return recipe if layout is None else keep_first_recipe(layout.recipe, recipe, ram_gib)


# --------------------------------------------------------------------------- the working copy

def state_paths(dvc_yaml: Path | str) -> list[str]:
    """The outs, metrics and plots that DVC does not cache (``cache: false``), from dvc.yaml.

    DVC keeps no copy of them, and a stage whose uncached out is gone counts as changed: they are
    mirrored to Drive together with dvc.lock.
    """
    stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {})
    paths = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []) or []:
                if isinstance(entry, dict):
                    for path, options in entry.items():
                        if isinstance(options, dict) and options.get("cache") is False:
                            paths.append(path)
    return list(dict.fromkeys(paths))


def _files_under(root: Path, rel: str) -> dict[str, Path]:
    """``{relative path: file}`` for a file or every file below a folder (empty if missing)."""
    base = root / rel
    if base.is_file():
        return {rel: base}
    if base.is_dir():
        return {p.relative_to(root).as_posix(): p for p in sorted(base.rglob("*")) if p.is_file()}
    return {}


def _copy_atomic(source: Path, dest: Path) -> None:
    atomic_write_bytes(dest, source.read_bytes())  # the outs mirrored are small: metrics, plots, logs


class StateMirror:
    """Copies dvc.lock and the uncached outs from the working copy to Drive, every ``interval``
    seconds and right after DVC updates dvc.lock (``poke``), while the pipeline runs.

    Outs are copied before dvc.lock, so the mirror's dvc.lock never names an out it lacks. A path
    that exists locally is mirrored exactly (files gone from a local folder go from the mirror, or
    DVC would see a changed folder); a path missing locally (DVC deletes a stage's outs before it
    re-runs it) keeps its last mirrored version, which matches the mirrored dvc.lock.
    """

    def __init__(self, repo: Path | str, state: Path | str, paths: Iterable[str], interval: float = 2.0):
        self.repo, self.state = Path(repo), Path(state)
        self.paths = [p for p in paths if p != "dvc.lock"] + ["dvc.lock"]
        self.interval = interval
        self._seen: dict[str, tuple[int, int]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def sync(self) -> int:
        """One pass; returns how many files were copied or removed."""
        changes = 0
        for rel in self.paths:
            local = _files_under(self.repo, rel)
            if not local:
                continue
            for name, path in local.items():
                stat = path.stat()
                stamp = (stat.st_size, stat.st_mtime_ns)
                if self._seen.get(name) != stamp or not (self.state / name).is_file():
                    _copy_atomic(path, self.state / name)
                    self._seen[name] = stamp
                    changes += 1
            for name, stale in _files_under(self.state, rel).items():
                if name not in local:
                    stale.unlink()
                    self._seen.pop(name, None)
                    changes += 1
        return changes

    def restore(self) -> list[str]:
        """Copy every mirrored file into the working copy (a fresh clone); returns their paths."""
        restored = []
        for rel in self.paths:
            for name, path in _files_under(self.state, rel).items():
                _copy_atomic(path, self.repo / name)
                restored.append(name)
        return restored

    def poke(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            poked = self._wake.wait(self.interval)
            self._wake.clear()
            if poked:  # DVC logs the lock update just before writing it
                time.sleep(0.3)
            self._safe_sync()

    def _safe_sync(self) -> None:
        try:
            self.sync()
        except OSError as err:  # a Drive hiccup must not stop training; the next pass retries
            self.errors.append(f"{type(err).__name__}: {first_line(err)}")

    def __enter__(self) -> "StateMirror":
        self._thread = threading.Thread(target=self._loop, name="drive-state-mirror", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join()
        self._safe_sync()  # the final state, also after a failure or an interrupt


def link_checkpoints(repo: Path | str, target: Path | str) -> Path:
    """Make ``.cache/checkpoints`` a symlink to ``target`` on Drive, moving any local checkpoints
    there first."""
    link, target = Path(repo) / CHECKPOINTS, Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if link.resolve() == target.resolve():
            return link
        link.unlink()
    elif link.is_dir():
        for entry in sorted(link.iterdir()):
            if not (target / entry.name).exists():
                shutil.move(str(entry), str(target / entry.name))
        shutil.rmtree(link)
    elif link.exists():
        raise UserError(f"{link} is a file; expected the checkpoint folder: remove it and rerun")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve(), target_is_directory=True)
    return link


def drop_incomplete_checkpoints(folder: Path | str, log: Callable[[str], None] = _say) -> list[Path]:
    """Remove checkpoints that a disconnect left incomplete on Drive.

    Drive uploads in the background, so files written just before a disconnect can be missing or
    empty afterwards, and the trainer would fail to load its newest checkpoint on every rerun.
    A checkpoint is incomplete when a file that the metadata lists (``files``: name -> size) has
    another size, or when it lacks, or has empty, a file that another checkpoint of the same run
    has with content. (Unreadable metadata is the trainer's case: it discards those itself.)
    """
    from .checkpoints import list_checkpoints, list_runs

    found = [(path, meta) for run in list_runs(Path(folder))
             for path, meta in list_checkpoints(run) if meta is not None]

    def sizes(path: Path) -> dict[str, int]:
        return {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}

    contents = {path: sizes(path) for path, _ in found}
    removed = []
    for path, meta in found:
        have = contents[path]
        listed = meta.get("files") if isinstance(meta.get("files"), dict) else {}
        expected = {name for other, other_meta in found if other != path
                    and other_meta.get("run_hash") == meta.get("run_hash")
                    for name, size in contents[other].items() if size > 0}
        problem = next((f"{name} missing or truncated" for name, size in listed.items()
                        if have.get(name) != size), None)
        problem = problem or next((f"{name} missing or empty" for name in sorted(expected)
                                   if not have.get(name)), None)
        if problem:
            log(f"removing incomplete checkpoint {path.name} ({problem})")
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def prepare(repo: Path | str, layout: DriveLayout) -> None:
    """Point the working copy at Drive: DVC cache, checkpoint folder, and (in a fresh clone) the
    dvc.lock and uncached outs of the last session."""
    repo = Path(repo).resolve()
    if not (repo / "dvc.yaml").is_file() or not (repo / ".git").exists():
        raise UserError(f"{repo} is not a checkout of the project (no dvc.yaml or .git)")
    layout.create()
    # --local: .dvc/config.local is git-ignored, so the committed config stays as it is. Workspace
    # (local disk) and cache (Drive) are on different filesystems: copy is the only link type.
    run_dvc(repo, "cache", "dir", "--local", str(layout.dvc_cache), env=run_environment(repo))
    run_dvc(repo, "config", "--local", "cache.type", "copy", env=run_environment(repo))
    drop_incomplete_checkpoints(layout.checkpoints)
    link_checkpoints(repo, layout.checkpoints)

    marker = repo / PREPARED_MARKER
    previous = json.loads(marker.read_text()) if marker.is_file() else {}
    if previous.get("drive") == str(layout.root):
        # The same runtime, prepared before: the local files are the newest (the mirror copies them).
        _say(f"working copy {repo} already set up in this runtime")
    else:
        mirror = StateMirror(repo, layout.state, state_paths(repo / "dvc.yaml"))
        restored = mirror.restore()
        if restored:
            _say(f"restored dvc.lock and {len(restored) - ('dvc.lock' in restored)} uncached outputs "
                 f"of the last session from {layout.state}")
        else:
            _say("no earlier session on Drive: starting from scratch")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"drive": str(layout.root)}))
    steps = sorted(p.name for p in layout.checkpoints.glob("*/step-*"))
    _say(f"DVC cache {layout.dvc_cache}; checkpoints {layout.checkpoints} "
         f"({', '.join(steps) if steps else 'none yet'})")


# --------------------------------------------------------------------------- the run

def repro_command() -> list[str]:
    """``dvc repro --pull --allow-missing`` (see the module docstring)."""
    return ["dvc", "repro", "--pull", "--allow-missing"]


def planned_params(repo: Path | str, overrides: dict[str, Any]) -> dict[str, Any]:
    """params.yaml as the run will see it; an override naming no existing param stops here."""
    params = yaml.safe_load((Path(repo) / "params.yaml").read_text()) or {}
    for key, value in overrides.items():
        try:
            apply_overrides(params, {key: value})
        except (UserError, KeyError, TypeError):
            raise UserError(f"override {key}: params.yaml has no such param (update the "
                            "repository, or remove the override)") from None
    return params


def apply_params(repo: Path | str, overrides: dict[str, Any]) -> None:
    """Write the overrides into params.yaml the way ``dvc exp run -S key=value`` does (DVC's own
    Hydra-syntax writer, which keeps the file's comments); unknown keys stop before any write."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    planned_params(repo, overrides)
    if overrides:
        dvc_apply_overrides(Path(repo) / "params.yaml",
                            [f"{key}={hydra_value(value)}" for key, value in overrides.items()])


def run_environment(repo: Path | str) -> dict[str, str]:
    # Stage commands call `python` and import `impressionist`: the interpreter of this kernel (first
    # on PATH), and the checkout's own code (the one DVC hashes as deps), whatever else is installed.
    pythonpath = os.pathsep.join(p for p in [str(Path(repo).resolve() / "src"), os.environ.get("PYTHONPATH", "")]
                                 if p)
    return dvc_environment(PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath)


def run(repo: Path | str, layout: DriveLayout, overrides: dict[str, Any], *,
        mirror_interval: float = 2.0, out=None) -> Path:
    """Set the params and reproduce the pipeline, streaming its output here and to a log on Drive.

    Rerunning after a disconnect (with :func:`prepare` first) skips the finished stages and resumes
    training from the newest checkpoint on Drive. Returns the log's path; a failed run raises
    UserError naming it.
    """
    repo = Path(repo).resolve()
    out = out or sys.stdout
    apply_params(repo, overrides)
    command = repro_command()
    dvc = dvc_executable()  # before any output: no dvc is one line, not a traceback
    log_path = layout.logs / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    layout.logs.mkdir(parents=True, exist_ok=True)
    _say(f"params.yaml: {len(overrides)} overrides set; {' '.join(command)}; full log: {log_path}")
    mirror = StateMirror(repo, layout.state, state_paths(repo / "dvc.yaml"), mirror_interval)
    with mirror, open(log_path, "ab") as log:
        # Its own process group: a stop reaches dvc and the stage it runs, and nothing else.
        process = subprocess.Popen([dvc, *command[1:]], cwd=repo,
                                   env=run_environment(repo), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _stream(process, out, log, mirror)
            code = process.wait()
        except KeyboardInterrupt:  # the notebook's stop button
            _stop(process)
            raise
    if mirror.errors:
        _say(f"warning: copying state to Drive failed {len(mirror.errors)} times "
             f"(last: {mirror.errors[-1]})")
    if code:
        raise UserError(f"the pipeline stopped (dvc exit code {code}); the output above and {log_path} "
                        "say why. Fix it and run the cells again: finished stages are skipped and "
                        "training resumes from its last checkpoint")
    return log_path


def _stream(process: subprocess.Popen, out, log, mirror: StateMirror) -> None:
    """Copy output as it comes (progress bars' carriage returns included) and watch for lock
    updates line by line."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    fd = process.stdout.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        log.write(chunk)
        log.flush()
        text = decoder.decode(chunk)
        out.write(text)
        out.flush()
        pending += text
        *lines, pending = pending.split("\n")
        if any(LOCK_UPDATE.search(line) for line in lines):
            mirror.poke()


def _stop(process: subprocess.Popen, grace: float = 30.0) -> None:
    """Ctrl-C to the whole group, so DVC and the stage stop cleanly; after DVC exits (or ``grace``
    seconds), SIGKILL whatever is left in the group (children that ignore SIGINT)."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the group is empty: everything has ended
            break
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            pass


# --------------------------------------------------------------------------- results, errors

RESULT_FILES = (SAMPLE_GRID.as_posix(), EVAL_METRICS.as_posix(), TRAIN_METRICS.as_posix())


def show_results(repo: Path | str) -> dict[str, Any]:
    """Display the sample grid and the metrics; returns the metrics read."""
    repo = Path(repo)
    missing = [name for name in RESULT_FILES if not (repo / name).is_file()]
    if missing:
        raise UserError(f"no {', '.join(missing)} in {repo}: the pipeline has not finished; run the "
                        "cells above")
    metrics = {name: json.loads((repo / name).read_text()) for name in RESULT_FILES if name.endswith(".json")}
    try:
        from IPython.display import Image, display
    except ImportError:
        display = None
    if display:
        display(Image(filename=str(repo / SAMPLE_GRID)))
    for name, values in metrics.items():
        print(f"{name}:\n{json.dumps(values, indent=1)}")
    return metrics


def enable_one_line_errors() -> None:
    """In a notebook, show a UserError as one ``error: ...`` line instead of a traceback (the
    cell still fails, so "Run all" stops there)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def handler(shell, etype, value, tb, tb_offset=None):
        print(f"error: {value}", file=sys.stderr)

    shell.set_custom_exc((UserError,), handler)
