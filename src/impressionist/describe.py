"""Stage ``describe``: one content description per filtered image, from a vision-language model.

Template captions name the artist and the genre, never what is in the picture; this stage asks a
captioner (``describe.model``, loaded by :mod:`impressionist.captioner`) for the subject alone, with
greedy decoding (the same images give the same text), ``describe.batch_size`` images at a time.
A scrub then removes style words the model still emits (``describe.scrub``, plus each painting's
artist name when ``describe.scrub_artists``): the LoRA should learn the style from the trigger, not
from words in the caption. The caption stage fills ``{description}`` of ``caption.template`` with
the cleaned text.

Resumable and cached: each finished batch of the VLM's raw text is appended to
``.describe-raw/rows.jsonl`` under the checkpoint root (``$IMPRESSIONIST_CHECKPOINTS`` or
``.cache/checkpoints``, which the Colab notebook links to Drive: a disconnect keeps the finished
batches), keyed on the model, its commit, the prompt and the decoding settings, and a rerun
describes only the images not in it: after a kill, the rest; after a change of what comes later
(the scrub, or ``model.pretrained``, whose tokenizers count the tokens), none: the VLM is not even
loaded. Batches are fixed by position in the id-sorted image list, so a resumed run feeds the model
exactly the batches an uninterrupted one would, and writes the same table. ``descriptions.parquet``
is written last; the raw rows stay (they are the cache; other captioner settings replace them).
What this run described versus resumed is in ``metrics/describe.json``, not in the data (a resumed
run must not change the data's hash).

``describe.enabled: false`` writes an empty table without loading any model (captions then come from
the template alone, as before the stage existed).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from .captioner import Generator, check_takes_images, resolve_captioner
from .checkpoints import default_root
from .errors import UserError, atomic_write_bytes, atomic_write_text, first_line, stage_main
from .layout import DESCRIBE_METRICS, DESCRIPTIONS, DESCRIPTIONS_DIR, FILTERED_DIR, RESUME_ROWS, RESUME_STATE
from .models import DTYPES, resolve_device
from .params import DEFAULT_PARAMS, fingerprint, load_params
from .params.data import DescribeParams
from .params.model import ModelParams
from .tables import read_filtered
from .tokens import CLIP_MAX_TOKENS, count_tokens, load_clip_tokenizer, load_t5_tokenizer

# The raw rows live beside the training checkpoints (dot-named: not a run folder for
# clean-checkpoints), not inside the DVC out: on Colab that root is a symlink to Drive, so a
# disconnect that wipes the local disk keeps them, and neither `dvc exp run`'s checkout nor DVC's
# removal of a re-run stage's outs touches them.
RAW_ROWS_DIR = ".describe-raw"
COLUMNS = ("id", "raw", "description", "scrubbed", "t5_tokens", "clip_tokens", "clip_truncated", "model",
           "revision", "prompt_fingerprint", "synthetic_model")
GPU_DTYPES = ("bfloat16", "float16")


def artist_phrases(artist: str) -> list[str]:
    """What a captioner may write for a WikiArt artist slug: "claude-monet" -> the full name and the
    surname ("claude monet", "monet"); hyphenated names also as written ("toulouse-lautrec")."""
    words = [w for w in artist.replace("_", "-").split("-") if w]
    if not words or artist.lower().startswith("unknown"):
        return []
    phrases = [" ".join(words)]
    if len(words) > 1 and len(words[-1]) > 3:
        phrases.append(words[-1])
    return phrases


def scrub(text: str, phrases: list[str]) -> str:
    """``text`` without the ``phrases`` (whole words, any case, with a leading "by" or "in the style
    of"), tidied: no doubled spaces or punctuation left behind."""
    if not phrases:
        return " ".join(text.split())
    alternatives = "|".join(re.escape(p.strip()).replace(r"\ ", r"\s+")
                            for p in sorted(phrases, key=len, reverse=True))
    pattern = rf"(?:\b(?:by|in\s+the\s+style\s+of)\s+)?\b(?:{alternatives})\b"
    cleaned = re.sub(pattern, " ", text, flags=re.IGNORECASE)
    cleaned = " ".join(cleaned.split())
    cleaned = re.sub(r"\s+([,.;:!?])", r"\1", cleaned)
    cleaned = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", cleaned)
    cleaned = re.sub(r"\b(an?|the)\s+(?=[,.;:!?]|$)", "", cleaned, flags=re.IGNORECASE)
    return cleaned.strip(" ,;:")


@dataclass(frozen=True)
class Item:
    """One image to describe: the unit of work (a data-parallel run may split the list of them)."""

    id: str
    file: str
    artist: str


def work_items(table: pd.DataFrame) -> list[Item]:
    return [Item(r.id, r.file, r.artist) for r in table.sort_values("id").itertuples()]


def batches_of(items: list[Item], size: int) -> list[list[Item]]:
    """Fixed by position in the id-sorted list: a resumed run feeds the model the same batches."""
    return [items[start:start + size] for start in range(0, len(items), size)]


class RawRows:
    """The VLM's raw descriptions made so far with one set of settings, in ``folder`` (by default
    ``<checkpoint root>/.describe-raw/``): ``rows.jsonl`` gets one line per image, a batch at a
    time; ``state.json`` names the settings they were made with."""

    def __init__(self, folder: Path, key: str):
        self.dir = Path(folder)
        self.rows_file, self.state_file, self.key = self.dir / RESUME_ROWS, self.dir / RESUME_STATE, key

    def load(self) -> dict[str, str]:
        """id -> raw text of an earlier run with the same settings ({} and a fresh start otherwise)."""
        rows: dict[str, str] = {}
        try:
            if json.loads(self.state_file.read_text()).get("key") == self.key:
                for line in self.rows_file.read_text().splitlines():
                    try:
                        row = json.loads(line)
                    except ValueError:  # a torn last line of a killed run
                        continue
                    rows[row["id"]] = row["raw"]
        except (OSError, ValueError, KeyError):
            rows = {}
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.rows_file, "".join(json.dumps({"id": i, "raw": r}) + "\n" for i, r in rows.items()))
        atomic_write_text(self.state_file, json.dumps({"key": self.key}))
        return rows

    def add(self, rows: list[tuple[str, str]]) -> None:
        with self.rows_file.open("a") as handle:
            handle.write("".join(json.dumps({"id": i, "raw": r}) + "\n" for i, r in rows))
            handle.flush()


def resolve_dtype_for(cfg: DescribeParams, device: torch.device) -> torch.dtype:
    if cfg.dtype in GPU_DTYPES and device.type != "cuda":
        raise UserError(f"describe.dtype={cfg.dtype} is for a GPU, but model.device is {device.type}; "
                        "set describe.dtype: float32 to caption on the CPU (slow for a real captioner), or "
                        "describe.enabled: false")
    return DTYPES[cfg.dtype]


def read_images(filtered_dir: Path) -> pd.DataFrame:
    return read_filtered(filtered_dir, ("id", "file", "artist"))


def describe_all(generator: Generator, items: list[Item], done: dict[str, str], raw_rows: RawRows,
                 batch_size: int, filtered_dir: Path) -> int:
    """Describe every item not in ``done`` (updated in place), a fixed batch at a time; returns how
    many this run described."""
    todo = [batch for batch in batches_of(items, batch_size) if not all(item.id in done for item in batch)]
    count = 0
    with tqdm(total=len(items), initial=len(items) - sum(map(len, todo)), desc="describe", unit="img") as bar:
        for batch in todo:
            images = []
            for item in batch:
                try:
                    with Image.open(filtered_dir / item.file) as image:
                        images.append(image.convert("RGB"))
                except (OSError, ValueError) as err:
                    raise UserError(f"{filtered_dir / item.file} cannot be read as an image ({first_line(err)}); "
                                    "re-run the filter stage (`dvc repro -f filter`)") from err
            texts = generator.describe(images)
            raw_rows.add([(item.id, text) for item, text in zip(batch, texts, strict=True)])
            done.update({item.id: text for item, text in zip(batch, texts)})
            count += len(batch)
            bar.update(len(batch))
    return count


def run(params: Mapping[str, Any], filtered_dir: Path | str = FILTERED_DIR, out_dir: Path | str = DESCRIPTIONS_DIR,
        metrics_path: Path | str = DESCRIBE_METRICS, *, tokenizers=None, raw_rows_dir: Path | str | None = None
        ) -> pd.DataFrame:
    """Write ``out_dir/descriptions.parquet`` (one row per filtered image, none when disabled).
    ``raw_rows_dir`` holds the raw rows made so far (default: ``.describe-raw`` under the checkpoint
    root, ``$IMPRESSIONIST_CHECKPOINTS`` or ``.cache/checkpoints``)."""
    cfg, model = DescribeParams.check(params), ModelParams.check(params)
    filtered_dir, out_dir = Path(filtered_dir), Path(out_dir)
    raw_rows_dir = Path(raw_rows_dir) if raw_rows_dir is not None else default_root() / RAW_ROWS_DIR
    table = read_images(filtered_dir)
    started = time.monotonic()
    if not cfg.enabled:
        result = pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
        _write(result, out_dir, metrics_path, {"enabled": False, "images": 0})
        print("describe: describe.enabled is false: no captioner loaded, captions come from the template alone")
        return result

    device = resolve_device(model)
    dtype = resolve_dtype_for(cfg, device)
    captioner = resolve_captioner(cfg.model, cfg.revision)
    check_takes_images(captioner)
    t5, clip = tokenizers or (load_t5_tokenizer(model), load_clip_tokenizer(model))
    items = work_items(table)
    key = fingerprint(captioner.name, captioner.commit, cfg.prompt, cfg.max_new_tokens, cfg.batch_size, cfg.dtype,
                      device.type)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DESCRIPTIONS.name).unlink(missing_ok=True)  # the completion marker must not outlive a rerun
    raw_rows = RawRows(raw_rows_dir, key)
    done = {i: r for i, r in raw_rows.load().items() if i in {item.id for item in items}}
    resumed = len(done)
    if resumed:
        print(f"describe: {resumed} of {len(items)} images already described with these settings "
              f"({raw_rows_dir}): not described again",
              file=sys.stderr)
    described = 0
    if resumed < len(items):
        generator = Generator(captioner, cfg.prompt, cfg.max_new_tokens, dtype, device)
        described = describe_all(generator, items, done, raw_rows, cfg.batch_size, filtered_dir)

    artists = {item.id: item.artist for item in items}
    raws = [done[item.id] for item in items]
    cleaned = [scrub(raw, cfg.scrub + (artist_phrases(artists[item.id]) if cfg.scrub_artists else []))
               for item, raw in zip(items, raws)]
    clip_tokens = count_tokens(cleaned, clip)
    result = pd.DataFrame({
        "id": [item.id for item in items], "raw": raws, "description": cleaned,
        "scrubbed": [c != " ".join(r.split()) for r, c in zip(raws, cleaned)],
        "t5_tokens": count_tokens(cleaned, t5), "clip_tokens": clip_tokens,
        "clip_truncated": [n > CLIP_MAX_TOKENS for n in clip_tokens],
        "model": captioner.name, "revision": captioner.commit, "prompt_fingerprint": cfg.prompt_fingerprint,
        "synthetic_model": captioner.synthetic,
    })
    n_scrubbed, n_empty = int(result["scrubbed"].sum()), int((result["description"] == "").sum())
    metrics = {"enabled": True, "images": len(result), "described": described, "resumed_from": resumed,
               "scrubbed": n_scrubbed, "empty": n_empty, "synthetic_model": captioner.synthetic,
               "model": captioner.name, "revision": captioner.commit,
               "seconds": round(time.monotonic() - started, 2)}
    _write(result, out_dir, metrics_path, metrics)
    label = " (SYNTHETIC: random-weight tiny VLM, its descriptions are gibberish)" if captioner.synthetic else ""
    print(f"describe: {len(result)} descriptions ({described} described now, {resumed} resumed) by "
          f"{captioner.name} at {captioner.commit}{label}; the scrub changed {n_scrubbed}, {n_empty} empty")
    return result


def _write(result: pd.DataFrame, out_dir: Path, metrics_path: Path | str, metrics: dict[str, Any]) -> None:
    import io

    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    result.to_parquet(buffer, index=False)
    atomic_write_bytes(out_dir / DESCRIPTIONS.name, buffer.getvalue())
    atomic_write_text(Path(metrics_path), json.dumps(metrics, indent=1) + "\n")


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    args = parser.parse_args(argv)
    run(load_params(args.params))


if __name__ == "__main__":
    main()
