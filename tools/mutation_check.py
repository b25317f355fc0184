#!/usr/bin/env python3
"""Hand-picked mutations of flux_math.py, sample.py, caption.py, export.py, lora.py and the evaluation (stats.py,
evaluate.py, report.py): does some test notice each one?

For every mutation the working tree (tracked and untracked, non-ignored files) is copied to a
temporary folder, one textual replacement is applied to one source file there, and the mutation's
test files run against that copy (``pytest -x``). A mutation is *killed* when a test fails, and
*survives* when they all pass. The unmutated copy is run first (the baseline): it must pass, or no
kill would mean anything. A mutation whose text is no longer in its file is reported *stale*
(exit status 2): update it together with the code.

    python tools/mutation_check.py                 # everything (~15 min on 2 cores)
    python tools/mutation_check.py --list
    python tools/mutation_check.py --only seed --only sigma_sqrt --no-baseline

Each mutation is a plausible bug, not a random edit; the list says what a kill protects.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLUX_MATH, SAMPLE, CAPTION = ("src/impressionist/flux_math.py", "src/impressionist/sample.py",
                              "src/impressionist/caption.py")
INFERENCE = "src/impressionist/inference.py"
FLUX_MATH_TESTS, SAMPLE_TESTS, CAPTION_TESTS = ("tests/test_flux_math.py",), ("tests/test_sample.py",), \
    ("tests/test_caption.py",)
EXPORT, LORA = "src/impressionist/export.py", "src/impressionist/lora.py"
CLIENT_TESTS = ("tests/test_clients.py",)
STATS, EVALUATE, REPORT = "src/impressionist/stats.py", "src/impressionist/evaluate.py", "src/impressionist/report.py"
STATS_TESTS, EVALUATE_TESTS, REPORT_TESTS, EVAL_SET_TESTS = (
    ("tests/test_stats.py",), ("tests/test_evaluate.py",), ("tests/test_report.py",), ("tests/test_eval_set.py",))


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str       # must occur in the file; every occurrence is replaced
    new: str
    tests: tuple[str, ...]
    what: str      # the bug it stands for


MUTATIONS = [
    # --- flux_math.py: timestep samplers, loss weighting, the objective
    Mutation("samplers_are_uniform", FLUX_MATH,
             "    return compute_density_for_timestep_sampling(",
             "    return torch.rand(batch_size, generator=generator)\n    return compute_density_for_timestep_sampling(",
             FLUX_MATH_TESTS, "every sampler except flux_shift draws torch.rand"),
    Mutation("loss_weights_one", FLUX_MATH, "    per_sample = ",
             "    weights = torch.ones_like(weights)\n    per_sample = ",
             FLUX_MATH_TESTS, "loss weights forced to 1 (sigma_sqrt and cosmap ignored)"),
    Mutation("flux_shift_unshifted", FLUX_MATH, "math.exp(mu) / (math.exp(mu) + (1 / u - 1))", "u",
             FLUX_MATH_TESTS, "flux_shift forgets the resolution shift"),
    Mutation("flux_shift_wrong_sign", FLUX_MATH, "math.exp(mu)", "math.exp(-mu)",
             FLUX_MATH_TESTS, "flux_shift shifts towards low noise"),
    Mutation("logit_std_ignored", FLUX_MATH, "logit_std=sampling.logit_std", "logit_std=1.0",
             FLUX_MATH_TESTS, "train.logit_std has no effect"),
    Mutation("mode_scale_ignored", FLUX_MATH, "mode_scale=sampling.mode_scale", "mode_scale=1.29",
             FLUX_MATH_TESTS, "train.mode_scale has no effect"),
    Mutation("noising_swapped", FLUX_MATH, "(1.0 - s) * latents + s * noise", "s * latents + (1.0 - s) * noise",
             FLUX_MATH_TESTS, "sigma = 1 means clean latents"),
    Mutation("target_sign", FLUX_MATH, "target = pack_latents(noise - latents)",
             "target = pack_latents(latents - noise)", FLUX_MATH_TESTS, "velocity target x - noise"),
    Mutation("guidance_ignored", FLUX_MATH, "torch.full((b,), float(guidance_scale)", "torch.full((b,), 1.0",
             FLUX_MATH_TESTS, "train.guidance_scale never reaches the transformer"),
    # --- sample.py: which image is drawn from what
    Mutation("all_seed_0", SAMPLE, "manual_seed(int(seed))", "manual_seed(0)",
             SAMPLE_TESTS, "every image drawn with seed 0"),
    Mutation("all_first_prompt", SAMPLE, "draw(pipe, show, prompt, seed)", "draw(pipe, show, prompt_list[0][0], seed)",
             SAMPLE_TESTS, "every image drawn from the first prompt"),
    Mutation("lora_noise_differs", SAMPLE, "draw(pipe, show, prompt, seed)", "draw(pipe, show, prompt, seed + int(lora_scale > 0))",
             SAMPLE_TESTS, "LoRA images start from other noise than the base images of their row"),
    Mutation("seed_not_recorded", SAMPLE, '"seed": int(seed),', '"seed": 0,',
             SAMPLE_TESTS, "samples.csv records the wrong seed"),
    Mutation("lora_scale_ignored", INFERENCE, "adapter_weights=[float(scale)]", "adapter_weights=[1.0]",
             SAMPLE_TESTS, "every LoRA scale samples at 1.0"),
    Mutation("val_captions_dropped", SAMPLE, "[(c, VAL_CAPTION) for c in validation_captions(cfg.val_captions, captions_path)]",
             "[]", SAMPLE_TESTS, "sample.val_captions adds nothing to the prompt set"),
    Mutation("val_captions_unsorted", SAMPLE, '.sort_values("id", kind="stable")', "",
             SAMPLE_TESTS, "validation captions taken in file order, not by image id"),
    # --- the evaluation set (sample.py), its statistics (stats.py), the stage and the PR report
    Mutation("eval_set_one_seed", SAMPLE, "draw(pipe, ev, prompt, seed)", "draw(pipe, ev, prompt, 0)",
             EVAL_SET_TESTS, "every evaluation image drawn with seed 0"),
    Mutation("eval_prompt_without_trigger", SAMPLE, "prompt = with_trigger(trigger, subject)", "prompt = subject",
             EVAL_SET_TESTS, "the evaluation set is drawn without the trigger word"),
    Mutation("clusters_ignored", STATS, "np.random.default_rng(seed), clusters)", "np.random.default_rng(seed), None)",
             STATS_TESTS, "seeds of one subject resampled as if independent: intervals too narrow"),
    Mutation("kid_biased", STATS, 'KID = SetDistance("kid", polynomial_kernel, unbiased=True)',
             'KID = SetDistance("kid", polynomial_kernel, unbiased=False)', STATS_TESTS,
             "KID keeps the self-similarity terms (biased)"),
    Mutation("cmmd_sigma", STATS, "CMMD_SIGMA = 10.0", "CMMD_SIGMA = 1.0", STATS_TESTS,
             "CMMD's RBF bandwidth is not the paper's"),
    Mutation("ci_too_narrow", STATS, "tail = (1.0 - confidence) / 2.0", "tail = 0.25", STATS_TESTS,
             "a 50% interval reported as 95%"),
    Mutation("delta_reversed", EVALUATE, "paired_difference(per_image[0.0][name], per_image[top][name]",
             "paired_difference(per_image[top][name], per_image[0.0][name]", EVALUATE_TESTS,
             "delta is base - LoRA"),
    Mutation("clip_against_prompt", EVALUATE, 'list(table["subject"])', 'list(table["prompt"])', EVALUATE_TESTS,
             "the CLIP score rewards the trigger word, not the subject"),
    Mutation("no_bonferroni", REPORT, "level = bonferroni(confidence, len(judged))", "level = confidence",
             REPORT_TESTS, "a dozen verdicts at 95% each: noise reads as a change"),
    Mutation("never_paired", REPORT, "        if not self.possible:\n            return None, self.reason",
             "        if True:\n            return None, self.reason", REPORT_TESTS,
             "per-image scores never paired across commits"),
    Mutation("direction_flipped", REPORT, "BETTER if (change.value < 0) == (way == LOWER) else WORSE",
             "WORSE if (change.value < 0) == (way == LOWER) else BETTER", REPORT_TESTS,
             "a lower KID reads as worse"),
    # --- caption.py: what the captions say
    Mutation("sidecar_ignored", CAPTION, "if sidecar is not None:", "if False:",
             CAPTION_TESTS, "kohya sidecar captions never override the template"),
    Mutation("truncation_off_by_one", CAPTION, "n > max_tokens", "n >= max_tokens",
             CAPTION_TESTS, "a caption of exactly max_sequence_length tokens flagged as truncated"),
    Mutation("particles_capitalised", CAPTION, "if index > 0 and word in NAME_PARTICLES:", "if False:",
             CAPTION_TESTS, "'Vincent Van Gogh'"),
    Mutation("no_end_of_sequence", CAPTION, "add_special_tokens=True", "add_special_tokens=False",
             CAPTION_TESTS, "T5 token counts without </s>"),
    Mutation("mojibake_kept", CAPTION, 'return candidate.encode("latin-1").decode("utf-8")', "return text",
             CAPTION_TESTS, "WikiArt's mis-decoded names stay garbled"),
    Mutation("raw_artist_slug", CAPTION, "artist=readable_artist(artist)", "artist=artist",
             CAPTION_TESTS, "captions say 'claude-monet'"),
    # --- export.py / lora.py: every client loads the LoRA whole and at the trained strength
    Mutation("strength_not_baked", EXPORT, 'layers[f"{module}.lora_B.weight"] = (up * scale).contiguous()',
             'layers[f"{module}.lora_B.weight"] = up.contiguous()', CLIENT_TESTS,
             "ComfyUI (scale 1, no metadata) applies the diffusers file at r/alpha times its strength"),
    Mutation("blocks_preset_adds_final_layer", LORA, r'BLOCK_LINEAR_REGEX = (r"(transformer_blocks|single_transformer_blocks)\.\d+\.("',
             r'BLOCK_LINEAR_REGEX = (r"((transformer_blocks|single_transformer_blocks)\.\d+\.)?("', CLIENT_TESTS,
             "the default targets adapt the final layer: sd-scripts' strict loader refuses the export"),
]


def working_tree_files(repo: Path) -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout
    return [name for name in listed.split("\0") if name and (repo / name).is_file()]


def copy_tree(repo: Path, dest: Path) -> Path:
    for name in working_tree_files(repo):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target)
    return dest


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, str, float]:
    """(passed, the first failing test or the error, seconds) of ``pytest -x tests`` in ``copy``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(copy / "src"), os.environ.get("PYTHONPATH")])),
               DVC_NO_ANALYTICS="1")
    started = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider",
                                 "--basetemp", str(copy.parent / "pytest-tmp"), *tests],
                                cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s", time.perf_counter() - started
    seconds = time.perf_counter() - started
    if result.returncode == 0:
        return True, "", seconds
    failed = re.findall(r"^FAILED (.+?)(?: - .*)?$", result.stdout, flags=re.MULTILINE)
    if failed:
        return False, failed[0], seconds
    tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["?"]
    return False, f"pytest exit {result.returncode}: {tail[0]}", seconds


def check(mutation: Mutation, timeout: float) -> tuple[str, str, float]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        copy = copy_tree(REPO, Path(tmp) / "repo")
        path = copy / mutation.file
        text = path.read_text()
        if mutation.old not in text:
            return "stale", f"text not found in {mutation.file}", 0.0
        path.write_text(text.replace(mutation.old, mutation.new))
        passed, detail, seconds = run_tests(copy, mutation.tests, timeout)
    return ("survived", "", seconds) if passed else ("killed", detail, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    args = parser.parse_args(argv)

    chosen = [m for m in MUTATIONS if not args.only or any(o in m.name for o in args.only)]
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:24} {m.file:34} {m.what}")
        return 0 if args.list else 1

    if not args.no_baseline:
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
            passed, detail, seconds = run_tests(copy_tree(REPO, Path(tmp) / "repo"), tests, args.timeout)
        if not passed:
            print(f"error: the unmutated tests fail ({detail}); fix them before checking mutations", file=sys.stderr)
            return 1
        print(f"baseline: {' '.join(tests)} pass ({seconds:.0f} s)", flush=True)

    results = []
    for mutation in chosen:
        status, detail, seconds = check(mutation, args.timeout)
        results.append(status)
        print(f"{status.upper():9} {mutation.name:24} {seconds:5.0f} s  {mutation.what}"
              + (f"  <- {detail}" if detail else ""), flush=True)
    scored = [r for r in results if r != "stale"]
    killed = results.count("killed")
    print(f"\nkill rate: {killed}/{len(scored)} = {killed / max(len(scored), 1):.0%}"
          + (f" ({results.count('stale')} stale)" if "stale" in results else ""))
    return 2 if "stale" in results else 0


if __name__ == "__main__":
    sys.exit(main())
