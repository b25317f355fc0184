"""The GPU stages at realistic sizes on one device: encode, the sample stages' evaluation set, and
the evaluation's feature extraction, each through the stage's own code (gpu_acceptance.py runs them
on random_flux.py's full-size random weights).

    python benchmarks/bench_gpu_stages.py encode   --work W --model M [--images 16]
    python benchmarks/bench_gpu_stages.py sample   --work W --model M --lora L [--subjects 8]
    python benchmarks/bench_gpu_stages.py features --work W --features F   # the images `sample` drew
    python benchmarks/bench_gpu_stages.py sample-dp --work W --model M [--processes auto] [--subjects 16]

Each prints a Markdown table (``--out`` appends it to a results file) with its n, the spread where
there are several measurements, and the device's peak memory (``torch.cuda.max_memory_allocated``;
on the CPU: none). ``--device cpu --model <tiny folder>`` runs the plumbing anywhere.

``sample-dp`` runs the ``sample_base`` stage's own command (``python -m impressionist sample --base``)
with ``compute.num_processes: 1`` and then N (``auto``: every visible GPU), and reports each run's
wall time per evaluation-set image (launch and model loading included) and whether the two runs
wrote the same bytes; it exits non-zero when they differ.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from bench_encode import write_dataset
from results_file import command_line, publish

REPO = Path(__file__).resolve().parents[1]


def recipe(model: str, device: str, dtype: str) -> dict[str, Any]:
    """params.yaml (the recipe) on ``model``; each stage below changes only its sizes."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(pretrained=model, revision=None, device=device, dtype=dtype)
    params["sample"]["eval_set"]["subjects"] = str(REPO / params["sample"]["eval_set"]["subjects"])
    return params


@contextlib.contextmanager
def device_peak(device: torch.device) -> Iterator[dict[str, float]]:
    """Seconds and peak device memory of the block."""
    out = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize()
    out["seconds"] = time.perf_counter() - start
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def timed_calls(module, name: str, device: torch.device, times: list[float]):
    """Wrap ``module.name`` so each call's seconds (device work included) land in ``times``."""
    real = getattr(module, name)

    def timed(*args, **kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = real(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        return result

    setattr(module, name, timed)
    return real


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f} (n = 1)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def run_encode(args) -> list[str]:
    """The encode stage on SYNTHETIC 1024² JPEGs at the recipe's resolutions and T5 length."""
    from impressionist import encode

    filtered, captions = write_dataset(args.work / "encode-data", args.images, args.side)
    params = recipe(args.model, args.device, args.dtype)
    if args.resolutions:
        params["encode"]["resolution"] = args.resolutions
    with device_peak(torch.device(args.device)) as measured:
        index = encode.run(params, filtered, captions, args.work / "cache")
    latents = len(index["samples"])
    resolutions = params["encode"]["resolution"]
    return [f"| encode | {args.images} {args.side}² images × {resolutions} px, T5 {params['caption']['max_sequence_length']} "
            f"tokens | n = 1 run, {latents} latents | {measured['seconds']:.1f} s ({latents / measured['seconds']:.2f} "
            f"latents/s, model loading included) | {gib(measured['peak_gib'])} |"]


def run_sample(args) -> list[str]:
    """sample_base then sample (the LoRA as an adapter at scale 1): one show image at 1024² and the
    evaluation set (``--subjects`` × 1 seed at the recipe's eval_set size), per-image times."""
    from impressionist import sample

    params = recipe(args.model, args.device, args.dtype)
    params["sample"].update(prompts=["a harbor at sunset"], val_captions=0, seeds=[0], lora_scales=[1.0])
    params["sample"]["eval_set"].update(num_subjects=args.subjects, seeds=[0])
    if args.small:  # the CPU rehearsal: the same code at toy sizes
        params["sample"].update(resolution=32, steps=2, max_sequence_length=16)
        params["sample"]["eval_set"].update(resolution=32, steps=2)
    ev = params["sample"]["eval_set"]
    lines = []
    for label, run in (("sample_base", lambda: sample.run_base(params, args.work / "samples/base")),
                       ("sample", lambda: sample.run_lora(params, Path(args.lora), args.work / "samples/base",
                                                          args.work / "samples/lora", args.work / "grid.png"))):
        times: list[float] = []
        real = timed_calls(sample, "draw", torch.device(args.device), times)
        try:
            with device_peak(torch.device(args.device)) as measured:
                run()
        finally:
            sample.draw = real
        show, eval_set = times[:1], times[1:]  # one show image first, then the evaluation set
        lines.append(f"| {label} | eval set {ev['resolution']}², {ev['steps']} steps; show {params['sample']['resolution']}², "
                     f"{params['sample']['steps']} steps | n = {len(eval_set)} eval images | "
                     f"{spread(eval_set)} s/image (show image {spread(show)} s; stage {measured['seconds']:.1f} s) | "
                     f"{gib(measured['peak_gib'])} |")
    return lines


def run_features(args) -> list[str]:
    """The evaluation's feature extraction (Inception + CLIP ViT-L-14 + CMMD's ViT-L-14-336, random
    weights at their real sizes) over the images ``sample`` drew, timed per batch."""
    from impressionist import image_features
    from impressionist.image_features import EvaluateParams, Extractors

    paths = sorted((args.work / "samples").rglob("eval/*.png"))
    if not paths:
        raise SystemExit(f"error: no evaluation images under {args.work / 'samples'}; run the sample step first")
    features = Path(args.features)
    params = recipe("unused", args.device, args.dtype)
    params["evaluate"].update(inception_weights=str(features / "inception.pth"))
    for key, name in (("clip", args.clip_model), ("cmmd_clip", args.cmmd_clip_model)):
        tiny = name.startswith("builtin:")
        params["evaluate"].update({f"{key}_model": name,
                                   f"{key}_pretrained": "builtin" if tiny else str(features / f"{name}.pt")})
    cfg = EvaluateParams.check(params)
    device = torch.device(args.device)
    with device_peak(device) as loading:
        extractors = Extractors.load(cfg)
    times: list[float] = []
    real = timed_calls(extractors.fid_net, "forward", device, times)  # one call per batch
    with device_peak(device) as measured:
        out = extractors.features(paths)
    extractors.fid_net.forward = real
    per_image = measured["seconds"] / len(paths)
    return [f"| evaluate features | {len(paths)} images, {cfg.image_size}² Inception, {cfg.clip_model} + "
            f"{cfg.cmmd_clip_model}, batches of {image_features.BATCH_SIZE} | n = {len(times)} batches | "
            f"{per_image:.3f} s/image (Inception per batch {spread(times)} s; loading {loading['seconds']:.1f} s; "
            f"features {tuple(out['clip'].shape)}) | {gib(measured['peak_gib'])} |"]


def run_sample_dp(args) -> list[str]:
    """sample_base's own command on 1 process, then on ``--processes``: wall s per evaluation image
    and whether the images are byte-identical."""
    params = recipe(args.model, args.device, args.dtype)
    params["sample"].update(prompts=["a harbor at sunset"], val_captions=0, seeds=[0], lora_scales=[1.0])
    params["sample"]["eval_set"].update(num_subjects=args.subjects, seeds=[0])
    if args.small:
        params["sample"].update(resolution=32, steps=2, max_sequence_length=16)
        params["sample"]["eval_set"].update(resolution=32, steps=2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    processes = args.processes if args.processes != "auto" else str(max(torch.cuda.device_count(), 1))
    runs = {}
    for count in ("1", processes):
        root = args.work / f"sample-dp-{count}"
        root.mkdir(parents=True, exist_ok=True)
        params["compute"] = {"num_processes": int(count)}
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "impressionist", "sample", "--base"], cwd=root, env=env,
                                capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode:
            raise SystemExit(f"error: sample_base on {count} process(es) failed:\n{result.stderr[-3000:]}")
        files = {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "samples").rglob("*")) if p.is_file()}
        runs[count] = (seconds, files)
    (one_s, one), (many_s, many) = runs["1"], runs[processes]
    images = sum(1 for name in one if "/eval/" in name)
    identical = one == many
    if not identical:
        differ = sorted(n for n in set(one) | set(many) if one.get(n) != many.get(n))
        raise SystemExit(f"error: sample_base on {processes} processes wrote other bytes than on 1: {differ[:5]}")
    ev = params["sample"]["eval_set"]
    return [f"| sample_base data-parallel | eval set {ev['resolution']}², {ev['steps']} steps, {images} images "
            f"| n = 1 run each | 1 process {one_s:.1f} s ({one_s / images:.3f} s/image); {processes} processes "
            f"{many_s:.1f} s ({many_s / images:.3f} s/image), ×{one_s / many_s:.2f} (launch and loading included); "
            f"images byte-identical: {'yes' if identical else 'NO'} | n/a |"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["encode", "sample", "features", "sample-dp"])
    parser.add_argument("--work", type=Path, required=True, help="working folder (the stages' outputs)")
    parser.add_argument("--model", help="a diffusers Flux folder (random_flux.py's model/)")
    parser.add_argument("--lora", help="a diffusers LoRA folder (random_flux.py's lora/)")
    parser.add_argument("--features", help="random_flux.py's features/ folder")
    parser.add_argument("--images", type=int, default=16, help="encode: SYNTHETIC images")
    parser.add_argument("--side", type=int, default=1024, help="encode: the images' side")
    parser.add_argument("--resolutions", type=int, nargs="+", help="encode: default the recipe's encode.resolution")
    parser.add_argument("--small", action="store_true", help="sample: 32² images, 2 steps (a CPU rehearsal)")
    parser.add_argument("--clip-model", default="ViT-L-14", help="features: open_clip name (its random "
                        "checkpoint <name>.pt in --features) or builtin:tiny-clip")
    parser.add_argument("--cmmd-clip-model", default="ViT-L-14-336")
    parser.add_argument("--subjects", type=int, default=8, help="sample: evaluation-set subjects (1 seed each)")
    parser.add_argument("--processes", default="auto", help="sample-dp: processes of the second run "
                        "(auto: every visible GPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", help="append the table as Markdown to this file")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = {"encode": run_encode, "sample": run_sample, "features": run_features,
            "sample-dp": run_sample_dp}[args.stage](args)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    text = "\n".join([f"### {args.stage} stage — {device}, {dt.date.today()}",
                      f"`{command_line(__file__)}` (torch {torch.__version__}; random weights; "
                      "times mean ± sample std over n)", "",
                      "| stage | size | n | time | peak GiB |", "|---|---|---|---|---|", *rows]) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
