"""``python -m impressionist.publish``: the LoRA, its kohya/ComfyUI twin, the sample grid and a
model card to a Hugging Face Hub model repo.

Not a DVC stage (it needs the network and a token, and its result lives on the Hub): run it after
``dvc repro``. The upload folder is built first, the same way for ``--dry-run`` (which writes it to
``--out``, default ``build/hub/``, and uploads nothing) and for a real upload (which builds it in a
temporary folder), so the dry run shows exactly what would be uploaded.

The token comes only from the environment (``HF_TOKEN``) or ``hf auth login`` via
``huggingface_hub.get_token()``; it is never read from params, never printed, never written. A
real upload checks the token and the connection (``whoami``) before it creates anything; if the
upload itself fails, a repo this command just created is deleted again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError, atomic_dir, first_line, stage_main
from .hub import BUILTIN_PREFIX, CARD_FILE, TOKEN_HINT, check_access
from .layout import DATA_METRICS, EVAL_METRICS, EXPORT_DIR, EXPORT_MANIFEST, LORA_DIR, LORA_WEIGHTS, TRAINING_CONFIG
from .layout import SAMPLE_GRID as GRID
from .model_card import build_card
from .params import DEFAULT_PARAMS, load_params
from .params.model import ModelParams
from .params.shipping import PublishParams

HUB_DIR = Path("build/hub")
GRID_IN_REPO = "images/samples_grid.png"


def publish_params(params: Mapping[str, Any], repo_id: str | None = None) -> PublishParams:
    """The ``publish`` section (all of it optional); ``repo_id`` (from ``--repo-id``) overrides it."""
    given = dict(params.get("publish") or {})
    if repo_id:
        given["repo_id"] = repo_id
    cfg = PublishParams.of(given)
    if not cfg.repo_id:
        raise UserError("no Hub repo to publish to: set publish.repo_id in params.yaml or pass "
                        "--repo-id, e.g. --repo-id your-name/impressionist-flux-lora")
    return cfg


def _read_json(path: Path, producer: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object another stage wrote, with the ``required`` keys; one line if it is not."""
    if not path.is_file():
        raise UserError(f"{path} not found; run `{producer}` first")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise UserError(f"{path} is not readable JSON ({first_line(err, 120)}); run `{producer}` again") from err
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object; run `{producer}` again")
    missing = [key for key in required if key not in data]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; run `{producer}` again")
    return data


def build_folder(params: dict[str, Any], cfg: PublishParams, out: Path, lora_dir: Path = LORA_DIR,
                 export_dir: Path = EXPORT_DIR, grid: Path = GRID, eval_metrics: Path = EVAL_METRICS,
                 data_metrics: Path = DATA_METRICS) -> list[str]:
    """Write the upload folder to ``out`` (atomically) and return its files, relative to it."""
    lora_dir, export_dir, grid = Path(lora_dir), Path(export_dir), Path(grid)
    if not (lora_dir / LORA_WEIGHTS).is_file():
        raise UserError(f"no LoRA at {lora_dir / LORA_WEIGHTS}; run `dvc repro train` first")
    training = _read_json(lora_dir / TRAINING_CONFIG, "dvc repro train")
    manifest = _read_json(export_dir / EXPORT_MANIFEST, "dvc repro export", required=("kohya_file",))
    kohya = export_dir / str(manifest["kohya_file"])
    if not kohya.is_file():
        raise UserError(f"{kohya} not found; run `dvc repro export` again")
    # The export's diffusers-format file: alpha/r baked into lora_B, so readers that ignore
    # lora_adapter_metadata (ComfyUI: scale 1) apply the trained strength too.
    diffusers_file = export_dir / LORA_WEIGHTS
    if "diffusers_file" not in manifest or not diffusers_file.is_file():
        raise UserError(f"{diffusers_file} (the scale-1 diffusers file) not found; run `dvc repro export` again")
    if not grid.is_file():
        raise UserError(f"no sample grid at {grid}; run `dvc repro sample` first")
    metrics = _read_json(Path(eval_metrics), "dvc repro evaluate")
    data = _read_json(Path(data_metrics), "dvc repro filter") if Path(data_metrics).is_file() else None
    card = build_card(repo_id=cfg.repo_id, params=params, training=training, metrics=metrics,
                      publish=cfg, lora_file=LORA_WEIGHTS, kohya_file=kohya.name,
                      grid_file=GRID_IN_REPO, data_metrics=data)
    with atomic_dir(out) as tmp:
        shutil.copy2(diffusers_file, tmp / LORA_WEIGHTS)
        shutil.copy2(kohya, tmp / kohya.name)
        (tmp / GRID_IN_REPO).parent.mkdir(parents=True)
        shutil.copy2(grid, tmp / GRID_IN_REPO)
        card.save(tmp / CARD_FILE)
    return sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file())


def hub_token() -> str:
    """The token from HF_TOKEN or the ``hf auth login`` file; never from params."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError(f"no Hugging Face token found; {TOKEN_HINT} (a token with write access)")
    return token


def upload(params: dict[str, Any], cfg: PublishParams, base: str, **paths) -> str:
    """Create the repo (if needed) and upload the folder in one commit; returns the repo URL.

    ``base`` is the base model the LoRA was trained on (:func:`base_model`).
    """
    from huggingface_hub import HfApi

    if base.startswith(BUILTIN_PREFIX):
        raise UserError(f"this LoRA was trained on {base}, the offline demo's random-weight model; "
                        "publish a LoRA trained on FLUX.1-dev (`dvc repro` with params.yaml), or use "
                        "--dry-run to see the upload folder")
    repo_id = cfg.repo_id
    with tempfile.TemporaryDirectory(prefix="impressionist-hub-") as tmp:
        folder = Path(tmp) / "upload"
        build_folder(params, cfg, folder, **paths)  # missing inputs stop here, before any Hub call
        token = hub_token()
        api = HfApi()
        check_access(api, token)
        try:
            existed = api.repo_exists(repo_id, token=token)
            url = api.create_repo(repo_id, private=cfg.private, exist_ok=True, token=token)
        except Exception as err:  # e.g. no write access to that namespace
            raise UserError(f"cannot create the Hub repo {repo_id} ({type(err).__name__}: "
                            f"{first_line(err, 160)}); check the name and the token's write access") from err
        try:
            api.upload_folder(repo_id=repo_id, folder_path=folder, token=token,
                              commit_message=cfg.commit_message)
        except Exception as err:
            if not existed:  # leave no empty repo behind
                try:
                    api.delete_repo(repo_id, token=token, missing_ok=True)
                except Exception:
                    pass
            raise UserError(f"upload to {repo_id} failed ({type(err).__name__}); nothing was "
                            "committed; check the network and try again") from err
    return str(url)


def base_model(params: dict[str, Any]) -> str:
    """``model.pretrained``: what the LoRA was trained on (the model card and the demo check need it)."""
    return ModelParams.check(params).pretrained


def run(params: dict[str, Any], repo_id: str | None = None, dry_run: bool = False,
        out: Path = HUB_DIR, **paths) -> list[str] | str:
    cfg = publish_params(params, repo_id)
    base = base_model(params)  # a params file without model.pretrained stops here, before any work
    if dry_run:
        files = build_folder(params, cfg, Path(out), **paths)
        print(f"publish --dry-run: {len(files)} files for {cfg.repo_id} -> {out} "
              f"({', '.join(files)}); nothing uploaded")
        return files
    url = upload(params, cfg, base, **paths)
    print(f"publish: uploaded to {url}")
    return url


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Publish the LoRA, its kohya/ComfyUI file, the sample grid and a model card to the Hub")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--repo-id", help="Hub model repo, e.g. your-name/impressionist-flux-lora "
                        "(default: publish.repo_id)")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the upload folder to --out and upload nothing")
    parser.add_argument("--out", default=str(HUB_DIR), help="where --dry-run writes the folder")
    args = parser.parse_args(argv)
    run(load_params(args.params), args.repo_id, args.dry_run, Path(args.out))


if __name__ == "__main__":
    main()
