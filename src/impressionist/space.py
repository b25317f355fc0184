"""``impressionist space``: the Gradio app as a self-contained Hugging Face Space, and its deployment.

The Space folder (``--out``, default ``build/space/``) holds ``app.py``, the package modules it
imports (``src/impressionist/``), a ``params.yaml`` with only what the app reads, a Space-only
``requirements.txt`` (the app's direct needs, pinned to the versions of the repository's tested
``requirements.txt``) and a ``README.md`` whose YAML front matter configures the Space (title, sdk
gradio and its version, app_file, licence, the base model and LoRA under ``models:``, tags).

With ``--dry-run``, or without a Space id, only the folder is written. Otherwise it is built in a
temporary folder and deployed through ``huggingface_hub.HfApi``: ``create_repo`` (a gradio Space,
``exist_ok``), ``upload_folder``, the variables ``IMPRESSIONIST_LORA`` / ``IMPRESSIONIST_BASE_MODEL``
(and ``IMPRESSIONIST_QUANTIZATION`` on 24 GB-class hardware), the secret ``HF_TOKEN`` (the Space
downloads the gated FLUX.1-dev with it) and ``request_space_hardware``. The token comes from
``HF_TOKEN`` in the environment only; it is sent as the secret and never written to a file or log.
On ZeroGPU hardware (``zero-a10g``) the app wraps its generation in ``spaces.GPU``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError, atomic_dir, first_line, stage_main
from .hub import CARD_FILE, check_access
from .params import DEFAULT_PARAMS, load_params
from .params.data import CaptionParams
from .params.model import ModelParams
from .params.shipping import PublishParams, SpaceParams

SPACE_DIR = Path("build/space")
REPO = Path(".")
# What app.py imports, directly or not (tests/test_space.py starts the folder alone to prove it).
MODULES = ("__init__.py", "app.py", "errors.py", "hub.py", "inference.py", "layout.py", "models.py",
           "params/__init__.py", "params/app.py", "params/inference.py", "params/model.py", "prompts.py",
           "tiny_flux.py")
# The app's direct needs, pinned from requirements.txt. gradio is also the Space's sdk_version;
# bitsandbytes serves app.quantization: nf4. `spaces` is preinstalled on ZeroGPU hardware.
PACKAGES = ("torch", "diffusers", "transformers", "tokenizers", "peft", "accelerate", "huggingface_hub",
            "safetensors", "sentencepiece", "protobuf", "numpy", "pillow", "PyYAML", "filelock", "gradio",
            "bitsandbytes")
# GPUs of 24 GB or less cannot hold FLUX.1-dev's transformer in bf16 beside the text encoders:
# the Space gets a 4-bit transformer there (benchmarks/RESULTS.md, inference estimate).
NF4_HARDWARE = {"t4-small", "t4-medium", "l4x1", "l4x4", "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4"}
APP_SECTIONS = {"model": ("pretrained", "revision", "dtype"), "caption": ("trigger",),
                "sample": ("prompts", "steps", "guidance_scale", "resolution")}


def space_params_of(params: Mapping[str, Any], overrides: Mapping[str, Any]) -> SpaceParams:
    """The ``space`` section with command-line overrides (None: not given), checked before any work;
    without a ``lora_repo``, the LoRA is the one ``publish`` uploads."""
    given = {**(params.get("space") or {}), **{k: v for k, v in overrides.items() if v is not None}}
    cfg = SpaceParams.of(given)
    return cfg if cfg.lora_repo else replace(cfg, lora_repo=PublishParams.check(params).repo_id)


def pinned_requirements(requirements: Path) -> list[str]:
    """``name==version`` for every package the app needs, as the tested requirements.txt pins it."""
    if not requirements.is_file():
        raise UserError(f"{requirements} not found; run `impressionist space` from the repository root")
    pins = {}
    for line in requirements.read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)", line)
        if match:
            pins[match[1].lower().replace("_", "-")] = (match[1], match[2])
    missing = [p for p in PACKAGES if p.lower().replace("_", "-") not in pins]
    if missing:
        raise UserError(f"{requirements} pins no version of {', '.join(missing)}, which the Space needs")
    return [f"{name}=={version}" for name, version in (pins[p.lower().replace("_", "-")] for p in PACKAGES)]


def base_model(params: Mapping[str, Any]) -> str:
    """``model.pretrained``, the Space's base model."""
    return ModelParams.check(params).pretrained


def space_variables(params: dict[str, Any], cfg: SpaceParams) -> dict[str, str]:
    """Environment of the Space's app (``IMPRESSIONIST_<KEY>`` overrides of the ``app`` settings)."""
    variables = {"IMPRESSIONIST_BASE_MODEL": base_model(params)}
    if cfg.lora_repo:
        variables["IMPRESSIONIST_LORA"] = cfg.lora_repo
    if cfg.hardware in NF4_HARDWARE:
        variables["IMPRESSIONIST_QUANTIZATION"] = "nf4"
    return variables


def space_params(params: dict[str, Any], cfg: SpaceParams) -> dict[str, Any]:
    """The params.yaml the Space's app reads: only the keys it uses (no data or training settings),
    copied as they are."""
    out: dict[str, Any] = {}
    for name, keys in APP_SECTIONS.items():
        part = params.get(name) or {}
        out[name] = {k: part[k] for k in keys if k in part}
    out["app"] = dict(params.get("app") or {})
    if cfg.lora_repo:
        out["app"]["lora"] = cfg.lora_repo
    return out


def space_card(params: dict[str, Any], cfg: SpaceParams, gradio_version: str) -> str:
    from huggingface_hub import SpaceCardData

    base = base_model(params)
    models = [m for m in (base, cfg.lora_repo) if m and m.count("/") == 1 and not m.startswith("builtin:")]
    data = SpaceCardData(
        title=cfg.title, sdk="gradio", sdk_version=gradio_version, python_version="3.11", app_file="app.py",
        license=PublishParams.check(params).license, models=models,
        tags=["text-to-image", "flux", "lora", "impressionism"] + (["zerogpu"] if cfg.hardware == "zero-a10g" else []),
        emoji="🎨", colorFrom="yellow", colorTo="blue", pinned=False,
        short_description="FLUX.1-dev vs an Impressionism LoRA, same seed",
    )
    trigger = CaptionParams.check(params).trigger
    lora = cfg.lora_repo or "the LoRA in IMPRESSIONIST_LORA"
    return (f"---\n{data.to_yaml()}\n---\n\n# {cfg.title}\n\n"
            f"The base model `{base}` and the LoRA `{lora}` side by side, drawn from the same seed"
            + (f"; start prompts with `{trigger}`" if trigger else "") + ".\n\n"
            "Written by `impressionist space` (the impressionist project). Settings: "
            "`params.yaml` (`app` section) and the Space variables `IMPRESSIONIST_<KEY>` "
            "(e.g. `IMPRESSIONIST_QUANTIZATION=nf4` on a 24 GB GPU). FLUX.1-dev is gated: the Space reads it "
            "with the `HF_TOKEN` secret, a token that has accepted its licence.\n\n"
            "FLUX.1-dev is released under the FLUX.1 [dev] Non-Commercial License; the LoRA inherits its terms.\n")


def build_folder(params: dict[str, Any], cfg: SpaceParams, out: Path, repo: Path = REPO) -> list[str]:
    """Write the self-contained Space folder to ``out``; returns its files (relative paths)."""
    import yaml

    requirements = pinned_requirements(repo / "requirements.txt")
    gradio_version = next(r.split("==")[1] for r in requirements if r.startswith("gradio=="))
    package = Path(__file__).resolve().parent
    with atomic_dir(out) as tmp:
        shutil.copy2(repo / "app.py", tmp / "app.py")
        (tmp / "src" / "impressionist").mkdir(parents=True)
        for name in MODULES:
            (tmp / "src" / "impressionist" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(package / name, tmp / "src" / "impressionist" / name)
        (tmp / "requirements.txt").write_text(
            "# The Space's own needs, pinned to the tested versions of the project's requirements.txt.\n"
            + "\n".join(requirements) + "\n")
        (tmp / DEFAULT_PARAMS).write_text(yaml.safe_dump(space_params(params, cfg), sort_keys=False))
        (tmp / CARD_FILE).write_text(space_card(params, cfg, gradio_version), encoding="utf-8")
    return sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file())


def environment_token() -> str:
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise UserError("HF_TOKEN is not set; export HF_TOKEN=hf_... (a write token that has accepted the "
                        "FLUX.1-dev licence: the Space gets it as its HF_TOKEN secret), or use --dry-run")
    return token


def deploy(params: dict[str, Any], cfg: SpaceParams, repo: Path = REPO) -> str:
    """Create or update the Space and its settings; returns its URL."""
    from huggingface_hub import HfApi

    if not cfg.lora_repo:
        raise UserError("no LoRA repo for the Space: set space.lora_repo or publish.repo_id in params.yaml, or "
                        "pass --lora-repo your-name/impressionist-flux-lora (`impressionist publish` uploads it)")
    space_id = cfg.space_id
    with tempfile.TemporaryDirectory(prefix="impressionist-space-") as tmp:
        folder = Path(tmp) / "space"
        build_folder(params, cfg, folder, repo)  # bad params or files stop here, before any Hub call
        token = environment_token()
        api = HfApi()
        check_access(api, token)
        try:
            url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=cfg.private,
                                  exist_ok=True, token=token)
            api.upload_folder(repo_id=space_id, repo_type="space", folder_path=folder, token=token,
                              commit_message="Update the impressionist Space")
            for key, value in space_variables(params, cfg).items():
                api.add_space_variable(space_id, key, value, token=token)
            api.add_space_secret(space_id, "HF_TOKEN", token, description="reads the gated FLUX.1-dev", token=token)
            api.request_space_hardware(space_id, cfg.hardware, token=token)
        except Exception as err:  # no write access, quota, hardware not allowed, network
            # The message never holds the token: huggingface_hub does not echo it, and first_line cuts.
            raise UserError(f"deploying the Space {space_id} failed ({type(err).__name__}: "
                            f"{first_line(err, 160).replace(token, '***')}); check the id, the token's write "
                            "access and the hardware's availability for your account") from err
    return str(url)


def run(params: dict[str, Any], dry_run: bool = False, out: Path = SPACE_DIR, repo: Path = REPO,
        **overrides) -> list[str] | str:
    cfg = space_params_of(params, overrides)
    base_model(params)  # a params file without model.pretrained stops here, before any work
    if dry_run or not cfg.space_id:
        files = build_folder(params, cfg, Path(out), repo)
        why = "--dry-run" if dry_run else "no space id (space.space_id or --space-id)"
        print(f"space: {len(files)} files -> {out} ({why}: nothing uploaded); try it: cd {out} && python app.py")
        return files
    url = deploy(params, cfg, repo)
    print(f"space: deployed {cfg.space_id} ({cfg.hardware}) -> {url}")
    return url


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the Gradio app as a Hugging Face Space folder, and deploy it")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--dry-run", action="store_true", help="write the Space folder to --out only")
    parser.add_argument("--out", default=str(SPACE_DIR), help="where --dry-run writes the folder")
    parser.add_argument("--space-id", help="your-name/impressionist (default: space.space_id)")
    parser.add_argument("--lora-repo", help="the LoRA's Hub repo (default: space.lora_repo, then publish.repo_id)")
    parser.add_argument("--hardware", help="Space hardware, e.g. zero-a10g, l4x1, a10g-small (default: space.hardware)")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=None)
    visibility.add_argument("--public", dest="private", action="store_false")
    args = parser.parse_args(argv)
    run(load_params(args.params), args.dry_run, Path(args.out), space_id=args.space_id,
        lora_repo=args.lora_repo, hardware=args.hardware, private=args.private)


if __name__ == "__main__":
    main()
