"""``impressionist pin-model``: write the commit that ``model.revision`` names now into params.yaml.

``model.revision: main`` is resolved to a commit whenever a stage loads the base model (the encode
cache and the LoRA's training_config.json record it), but the Hub's ``main`` moves: a later run,
or a fresh machine, may get another commit and so re-encode and retrain. Pinning the commit in
params.yaml makes every run load the same files, and DVC sees the pin as a params change. Only
the ``model.revision`` line is rewritten; comments and the rest of the file stay as they are.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml

from .errors import UserError, atomic_write_text, stage_main
from .params import DEFAULT_PARAMS, load_params

REVISION_LINE = re.compile(r"^(?P<key>[ \t]+revision:[ \t]*)(?P<value>[^#\n]*?)(?P<rest>[ \t]*(#.*)?)$")


def set_model_revision(text: str, commit: str) -> str:
    """``text`` (params.yaml) with the value of ``model.revision`` replaced by ``commit``."""
    lines = text.splitlines(keepends=True)
    in_model = False
    for number, line in enumerate(lines):
        if line[:1] not in (" ", "\t", "#", "\n", ""):  # a top-level key starts a section
            in_model = line.startswith("model:")
            continue
        match = REVISION_LINE.match(line.rstrip("\r\n")) if in_model else None
        if match:
            ending = line[len(line.rstrip("\r\n")):]
            lines[number] = f"{match['key']}{commit}{match['rest']}{ending}"
            return "".join(lines)
    raise UserError("params.yaml has no model.revision line; add `  revision: main` under `model:` first")


def pin(params_path: Path | str = DEFAULT_PARAMS, revision: str | None = None) -> str | None:
    """Pin ``model.revision`` (or ``revision``) to its commit in ``params_path``; returns the commit,
    or None when the model is not a Hub model (nothing to pin)."""
    from .hub import is_hub_id
    from .models import ModelParams, hub_commit

    params_path = Path(params_path)
    model = ModelParams.check(load_params(params_path))
    name = model.pretrained
    if not is_hub_id(name):
        print(f"pin-model: model.pretrained={name} is not a Hub model: nothing to pin (stages record its "
              "content hash, or the builtin model's version, in data/cache/latents/index.json)")
        return None
    wanted = revision or model.revision or "main"
    commit = hub_commit(name, wanted)
    text = set_model_revision(params_path.read_text(), commit)
    if (yaml.safe_load(text) or {}).get("model", {}).get("revision") != commit:  # never write a wrong file
        raise UserError(f"could not rewrite model.revision in {params_path}; set it to {commit} by hand")
    atomic_write_text(params_path, text)
    print(f"pin-model: model.revision {wanted} -> {commit} ({name}) in {params_path}")
    return commit


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="impressionist pin-model", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    parser.add_argument("--revision", help="branch, tag or commit to pin (default: model.revision)")
    args = parser.parse_args(argv)
    pin(args.params, args.revision)


if __name__ == "__main__":
    main()
