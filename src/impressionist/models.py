"""Where the base model comes from and how it is loaded: the one place every stage goes through.

``model.pretrained`` is a Hub id (FLUX.1-dev), a local diffusers folder, or ``builtin:tiny-flux``
(built locally, see :mod:`impressionist.tiny_flux`). All three end in the same
``from_pretrained(folder)`` calls.

Each is identified by a ``commit`` (:class:`BaseModel`), which the stages record and fingerprint:
a Hub ``model.revision`` (a branch, tag or commit) is resolved to its commit when a stage first needs
the model, and exactly that snapshot is loaded; a local folder is identified by a hash of its
content, the builtin model by its builder version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import DEMO_HINT, UserError, atomic_dir, atomic_write_text, first_line
from .hub import BUILTIN_PREFIX
from .params import DTYPE_NAMES, require_choice
from .params.model import BUILTIN_TINY_FLUX, ModelParams

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the names params accept, as torch dtypes
# Only the diffusers-format subfolders: the Hub repo also holds a 23 GB single-file checkpoint.
DIFFUSERS_PATTERNS = ["model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*",
                      "tokenizer/*", "tokenizer_2/*", "transformer/*", "vae/*"]


def cache_root() -> Path:
    """Folder for locally built artefacts (tiny models); ``IMPRESSIONIST_CACHE`` overrides it."""
    return Path(os.environ.get("IMPRESSIONIST_CACHE", Path.cwd() / ".cache" / "impressionist"))


def resolve_device(model: ModelParams) -> torch.device:
    name = model.device
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "model.device is 'cuda' but no CUDA GPU is visible; the FLUX.1-dev recipe needs one "
            f"(or set model.device: cpu at your own risk); {DEMO_HINT}")
    return torch.device(name)


def resolve_dtype(model: ModelParams) -> torch.dtype:
    return DTYPES[model.dtype]


@dataclass(frozen=True)
class BaseModel:
    """The base model a stage loads: a local diffusers ``folder`` and the ``commit`` that names its
    content (a Hub commit, ``sha256:<hash>`` of a local folder, or ``builtin:tiny-flux-v<N>``)."""

    name: str
    folder: str
    commit: str


def resolve_pretrained(name: str, revision: str | None = None) -> str:
    """Return a local diffusers folder for ``name``, building or downloading it if needed."""
    return resolve_base_model(name, revision).folder


def resolve_base_model(name: str, revision: str | None = None) -> BaseModel:
    """The folder to load ``name`` from and its commit; a Hub ``revision`` is resolved to its commit
    first, and that commit's snapshot is what gets loaded."""
    if name == BUILTIN_TINY_FLUX:
        folder = _tiny_flux_folder()
        return BaseModel(name, str(folder), f"{BUILTIN_PREFIX}{folder.name}")
    if name.startswith(BUILTIN_PREFIX):
        raise UserError(f"model.pretrained={name!r}: the only builtin model is {BUILTIN_TINY_FLUX}")
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise UserError(f"model.pretrained={name}: folder has no model_index.json "
                            "(expected a diffusers pipeline folder)")
        return BaseModel(name, str(local), folder_digest(local))
    commit = hub_commit(name, revision)
    return BaseModel(name, _hub_snapshot(name, commit), commit)


def base_model_of_cache(name: str, revision: str | None, recorded: str | None) -> BaseModel:
    """The base model a stage after ``encode`` must use: the one its cache was made with.

    A Hub model is loaded at the recorded commit even if ``model.revision`` has moved on since; a
    local folder or builtin model whose content changed stops with one line.
    """
    if recorded is None:  # a cache from before commits were recorded
        return resolve_base_model(name, revision)
    is_hub_commit = not recorded.startswith(("sha256:", BUILTIN_PREFIX))
    base = resolve_base_model(name, recorded if is_hub_commit else revision)
    if base.commit != recorded:
        raise UserError(f"data/cache was encoded with {name} at {recorded}, but it is now {base.commit}; "
                        "re-run encode (`dvc repro -f encode_latents encode_text`)")
    return base


def hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit ``revision`` (a branch, tag or commit; default main) of a Hub model names now, or,
    offline or with the Hub unreachable, the one the local Hugging Face cache last recorded."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError,
                                        RevisionResolutionError)

    from .hub import hub_offline

    revision = revision or "main"
    hint = (f"accept its licence on the Hub, set HF_TOKEN (or run `hf auth login`) and check the "
            f"network, or set model.pretrained to a local diffusers folder; {DEMO_HINT}")
    try:
        return HfApi().resolve_revision(repo_id, revision=revision, local_files_only=hub_offline()).resolved
    except RevisionNotFoundError as err:
        raise UserError(f"model {repo_id} has no revision {revision!r} on the Hub; set model.revision to one "
                        "of its branches, tags or commits (default: main)") from err
    except (GatedRepoError, RepositoryNotFoundError) as err:
        raise UserError(f"no access to model {repo_id} on the Hugging Face Hub "
                        f"({type(err).__name__}); {hint}") from err
    except RevisionResolutionError as err:
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub cannot be reached"
        raise UserError(f"model {repo_id} at {revision} is not in the local Hugging Face cache and {why}; "
                        f"{hint}") from err
    except Exception as err:  # a proxy error, an HTTP error of another kind
        raise UserError(f"cannot resolve model {repo_id} at {revision} on the Hugging Face Hub "
                        f"({type(err).__name__}: {first_line(err, 160)}); {hint}") from err


def folder_digest(folder: Path | str) -> str:
    """``sha256:<hash>`` of every file under ``folder`` (relative names and contents; hidden files and
    folders, such as a download's .cache, skipped).

    Each file's hash is remembered under :func:`cache_root` by path, size and modification time, so a
    33 GB FLUX.1-dev folder is read once, not in every stage.
    """
    folder = Path(folder).resolve()
    memo_file = cache_root() / "folder-digests" / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    whole, seen = hashlib.sha256(), {}
    for path in files:
        relative, stat = path.relative_to(folder).as_posix(), path.stat()
        key = f"{relative}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in memo:
            with path.open("rb") as handle:
                memo[key] = hashlib.file_digest(handle, "sha256").hexdigest()
        seen[key] = memo[key]
        whole.update(f"{relative}\0{memo[key]}\n".encode())
    with contextlib.suppress(OSError):  # a read-only cache only costs the re-reading
        atomic_write_text(memo_file, json.dumps(seen))
    return "sha256:" + whole.hexdigest()


def built_once(folder: Path, marker: str, build) -> Path:
    """``folder`` (complete when it holds ``marker``), built by ``build(tmp)`` the first time.

    Several processes may ask at once (DDP ranks, parallel test workers): one builds, the others
    wait and reuse it (atomic_dir would otherwise remove a build in progress as a leftover)."""
    from filelock import FileLock

    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if not (folder / marker).is_file():
            with atomic_dir(folder) as tmp:
                build(tmp)
    return folder


def _tiny_flux_folder() -> Path:
    from .tiny_flux import BUILDER_VERSION, save_tiny_flux

    return built_once(cache_root() / f"tiny-flux-v{BUILDER_VERSION}", "model_index.json", save_tiny_flux)


def _hub_snapshot(repo_id: str, commit: str) -> str:
    """The local snapshot of ``repo_id`` at ``commit`` (a commit hash), downloaded if not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:  # already in the local Hub cache: no network needed
        return snapshot_download(repo_id, revision=commit, allow_patterns=DIFFUSERS_PATTERNS,
                                 local_files_only=True)
    except Exception:
        pass
    hint = (f"accept its licence on the Hub, set HF_TOKEN (or run `hf auth login`) and check the "
            f"network, or set model.pretrained to a local diffusers folder; {DEMO_HINT}")
    from .hub import hub_offline

    if hub_offline():
        raise UserError(f"model {repo_id} at {commit} is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                        f"is set; {hint}")
    try:
        return snapshot_download(repo_id, revision=commit, allow_patterns=DIFFUSERS_PATTERNS)
    except (GatedRepoError, RepositoryNotFoundError) as err:
        raise UserError(f"no access to model {repo_id} on the Hugging Face Hub "
                        f"({type(err).__name__}); {hint}") from err
    except Exception as err:  # connection refused, DNS, timeouts: all mean "cannot download"
        raise UserError(f"cannot download model {repo_id} from the Hugging Face Hub "
                        f"({type(err).__name__}); {hint}") from err


# Library messages a user cannot act on, by logger: FLUX feeds the full prompt to T5 and only its
# first 77 tokens to CLIP by design (the caption stage reports T5 truncation, which does matter),
# and diffusers tokenizes the prompt once untruncated to find what CLIP drops, which transformers
# reports as a too-long sequence; the LoRA holds transformer layers only, so loading it finds none
# for the text encoders.
THIRD_PARTY_NOISE = {
    "diffusers.pipelines.flux.pipeline_flux": "The following part of your input was truncated because CLIP",
    "transformers.tokenization_utils_base": "Token indices sequence length is longer than the specified",
    "diffusers.loaders.lora_base": "No LoRA keys associated to",
    "diffusers.loaders.peft": "No LoRA keys associated to",
}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def without_third_party_noise() -> Iterator[None]:
    """Drop exactly the messages of ``THIRD_PARTY_NOISE`` while the block (or decorated call) runs;
    every other message of those loggers still shows."""
    filters = [(logging.getLogger(name), _DropMessage(prefix)) for name, prefix in THIRD_PARTY_NOISE.items()]
    for logger, message_filter in filters:
        logger.addFilter(message_filter)
    try:
        yield
    finally:
        for logger, message_filter in filters:
            logger.removeFilter(message_filter)


def load_pipeline(folder: str, dtype: torch.dtype, **components):
    """The full FluxPipeline (components may be overridden, e.g. ``transformer=None``)."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(folder, dtype=dtype, **components)


def load_text_pipeline(folder: str, dtype: torch.dtype):
    """A FluxPipeline with only the tokenizers and text encoders loaded, for ``encode_prompt``."""
    return load_pipeline(folder, dtype, transformer=None, vae=None)


def load_vae(folder: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype)


@torch.no_grad()
def encode_prompts(folder: str, dtype: torch.dtype, device: torch.device, prompts: Sequence[str],
                   max_sequence_length: int, batch_size: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """T5 and pooled CLIP embeddings of ``prompts``, yielded in order one batch at a time as CPU
    tensors ``(prompt_embeds, pooled_prompt_embeds)``, so a caller can write them out as they come.

    The text encoders are loaded for this alone and freed (with the device's cache) after the last
    batch, so they never sit in memory beside the VAE or the transformer.
    """
    from diffusers.training_utils import free_memory

    pipe = load_text_pipeline(folder, dtype).to(device)
    try:
        for start in range(0, len(prompts), batch_size):
            with without_third_party_noise():
                outputs = pipe.encode_prompt(prompt=list(prompts[start:start + batch_size]), prompt_2=None,
                                             device=device, max_sequence_length=max_sequence_length)
            yield outputs[0].cpu(), outputs[1].cpu()
            del outputs
    finally:
        del pipe
        free_memory()


BASE_QUANTIZATIONS = ("none", "nf4", "fp8")


def require_package(package: str, setting: str) -> None:
    """Refuse ``setting`` (e.g. ``train.optimizer=adamw8bit``) before any model loads when its
    package is missing or cannot be imported here."""
    import importlib

    try:
        importlib.import_module(package)
    except ImportError as err:
        raise UserError(f"{setting} needs {package}: pip install {package}") from err
    except Exception as err:  # e.g. bitsandbytes without its CUDA libraries
        raise UserError(f"{setting} needs {package}, which fails to import here: {first_line(err)}") from err


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of ``device`` when it is a CUDA GPU, else None: the one question the
    GPU-only checks (here, in train and in inference) ask of the machine."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: L4, RTX 4090, H100


def check_quantization(quantization: str, device: torch.device) -> str:
    """NF4 (bitsandbytes) and fp8 (torchao) are for CUDA kernels: refuse them elsewhere early."""
    require_choice(quantization, BASE_QUANTIZATIONS, "train.base_quantization")
    capability = cuda_capability(device) if quantization != "none" else None
    if quantization != "none" and capability is None:
        raise UserError(f"train.base_quantization={quantization} needs a CUDA GPU "
                        f"({'bitsandbytes' if quantization == 'nf4' else 'torchao float8'} kernels); "
                        "use none on CPU")
    if quantization == "fp8" and capability < FP8_MIN_CAPABILITY:
        raise UserError("train.base_quantization=fp8 needs FP8 tensor cores (compute capability 8.9+: "
                        "L4, RTX 4090, H100); use nf4 on older GPUs")
    package = {"nf4": "bitsandbytes", "fp8": "torchao"}.get(quantization)
    if package:
        require_package(package, f"train.base_quantization={quantization}")
    return quantization


# diffusers' attention dispatcher; "native" is PyTorch SDPA, which picks flash or memory-efficient
# kernels on CUDA by itself. These also run on a CPU.
CPU_ATTENTION_BACKENDS = ("native", "_native_math", "_native_flash")


def check_attention_backend(name: str, device: torch.device, setting: str = "train.attention_backend") -> str:
    """Refuse an unknown backend, a GPU-only one on the CPU, or one whose package is missing."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    require_choice(name, [backend.value for backend in AttentionBackendName], setting)
    if device.type != "cuda" and name not in CPU_ATTENTION_BACKENDS:
        raise UserError(f"{setting}={name} needs a CUDA GPU; use one of {', '.join(CPU_ATTENTION_BACKENDS)} on CPU")
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as err:  # e.g. flash-attn, sageattention or kernels not installed
        raise UserError(f"{setting}={name}: {first_line(err)}") from err
    return name


def use_attention_backend(model: torch.nn.Module, name: str) -> None:
    if name != "native":  # native is diffusers' default: nothing to set
        model.set_attention_backend(name)


# NF4 makes the transformer blocks' Linears 4-bit and keeps the input embedders (image, T5 and
# timestep/guidance/pooled-CLIP) and the final AdaLN modulation in 16 bit: they are 0.5% of
# FLUX.1-dev's weights (64M of 11.9B: 0.1 GiB more than 4-bit), but every token and every block's
# modulation passes through them, so their rounding error reaches the whole model (QLoRA keeps its
# output head 16-bit for the same reason). The blocks are what fp8 converts too. diffusers'
# BitsAndBytesConfig would quantise every Linear; its skip list matches a module by its own name
# as well as its path, so the 64-wide output projection `proj_out` (0.2M weights) stays 4-bit: a
# skip entry for it would also keep every single block's `proj_out` 16-bit.
NF4_KEPT_16BIT = ("x_embedder", "context_embedder", "time_text_embed", "norm_out")


def nf4_config(dtype: torch.dtype, double_quant: bool):
    """diffusers' bitsandbytes NF4 config, the one place training and inference set it:
    ``double_quant`` (QLoRA's 8-bit absmax) for training, where it saves about 0.5 GiB."""
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=double_quant,
                              llm_int8_skip_modules=list(NF4_KEPT_16BIT))  # a copy: diffusers extends it


def load_nf4_transformer(folder: str, dtype: torch.dtype, device: torch.device, double_quant: bool,
                         subfolder: str | None = "transformer"):
    """The Flux transformer with NF4 block weights, quantised straight onto ``device`` (without
    a device map diffusers picks the current CUDA device itself)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(folder, subfolder=subfolder, dtype=dtype,
                                                  quantization_config=nf4_config(dtype, double_quant),
                                                  device_map={"": torch.device(device)})


def prepare_nf4_for_training(transformer: torch.nn.Module) -> torch.nn.Module:
    """peft's QLoRA preparation: freezes the base and casts every parameter that is not 4-bit
    (the embedders, norm_out, norms, biases) from 16-bit to fp32; checkpointing is the trainer's
    choice."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(transformer, use_gradient_checkpointing=False)


def load_transformer(folder: str, dtype: torch.dtype, quantization: str = "none",
                     device: torch.device | str = "cpu"):
    """The Flux transformer; ``nf4`` loads its block weights 4-bit onto ``device`` through
    diffusers' bitsandbytes integration (QLoRA), ``fp8`` swaps them for torchao Float8Linear for
    fp8 matmuls. The caller moves an unquantized (or fp8) model to its device."""
    from diffusers import FluxTransformer2DModel

    if quantization == "nf4":
        return prepare_nf4_for_training(load_nf4_transformer(folder, dtype, device, double_quant=True))
    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=dtype)
    if quantization == "fp8":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(transformer, module_filter_fn=fp8_block_linear,
                                   config=Float8LinearConfig(pad_inner_dim=True))
    return transformer


def fp8_block_linear(module: torch.nn.Module, name: str) -> bool:
    """The Linears fp8 converts (training and inference alike): the blocks' base weights whose
    sides are multiples of 16 (fp8 GEMMs need them); embedders, the output head and LoRA factors
    stay 16-bit."""
    return (isinstance(module, torch.nn.Linear) and "transformer_blocks" in name and "lora_" not in name
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)
