#!/usr/bin/env python3
"""Hand-picked mutations of the trainer's inputs (train.py, flux_math.py, batch_order.py, ema.py,
encode.py), the export (export.py, the LoRA target presets in params/training.py), the captions (describe.py, caption.py), the sampling (sample.py, data_parallel.py), the evaluation (stats.py,
image_features.py, evaluate.py, report.py, replicates.py, replicate_seeds.py) and the pipeline's data
deps (dvc.yaml): does some test notice each one, and does that test run the mutated code at all?

For every mutation the working tree (tracked and untracked, non-ignored files) is copied to a
temporary folder, one textual replacement is applied to one file there, and the mutation's test
files run against that copy (``pytest -x``). A mutation is *killed* when a test fails, and
*survives* when they all pass. The unmutated copy is run first (the baseline): it must pass, or no
kill would mean anything. A mutation whose text is no longer in its file is reported *stale*
(exit status 2): update it together with the code.

Each mutation is also checked to be *reached*: in the same run, a probe goes into the mutated copy
that touches a marker file when the mutated code runs. In a Python file the probe is a statement
inserted just before the innermost statement holding each replacement (so it runs whenever that
statement does, in any process the tests start); in any other file (dvc.yaml) it is an audit hook
of the pytest process that sees the file opened. A kill without a reach means the tests failed for
another reason than the planted bug; a survivor without one means its tests never run that code.

    python tools/mutation_check.py                 # everything (~30 min on 2 cores)
    python tools/mutation_check.py --list
    python tools/mutation_check.py --only caption_dropout_ignored --only train_guidance_ignored --no-baseline

``--only NAME`` takes an exact mutation name (repeatable); a name that is no mutation's selects
every mutation whose name contains it. Exit status: 0 when every chosen mutation is killed and
reached, 1 when one survives or is not reached, 2 when one is stale.

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
TRAIN, ENCODE, EMA, BATCH_ORDER = ("src/impressionist/train.py", "src/impressionist/encode.py",
                                   "src/impressionist/ema.py", "src/impressionist/batch_order.py")
IMAGE_FEATURES, DVC_YAML = "src/impressionist/image_features.py", "dvc.yaml"
TRAIN_INPUT_TESTS, EMA_TESTS, ENCODE_TESTS, MULTIRES_TESTS, DVC_DEPS_TESTS = (
    ("tests/test_train_inputs.py",), ("tests/test_ema.py",), ("tests/test_encode.py",),
    ("tests/test_multiresolution.py",), ("tests/test_dvc_deps.py",))
DESCRIBE, DESCRIBE_TESTS = "src/impressionist/describe.py", ("tests/test_describe.py",)
DOWNLOAD, DOWNLOAD_TESTS = "src/impressionist/download.py", ("tests/test_download.py",)
FLUX_MATH_TESTS, SAMPLE_TESTS, CAPTION_TESTS = ("tests/test_flux_math.py",), ("tests/test_sample.py",), \
    ("tests/test_caption.py",)
DATA_PARALLEL, DATA_PARALLEL_TESTS = "src/impressionist/data_parallel.py", ("tests/test_data_parallel.py",)
EXPORT = "src/impressionist/export.py"
TRAINING_PARAMS = "src/impressionist/params/training.py"  # the lora and train sections, their presets
CLIENT_TESTS = ("tests/test_clients.py",)
STATS, EVALUATE, REPORT = "src/impressionist/stats.py", "src/impressionist/evaluate.py", "src/impressionist/report.py"
REPLICATES, REPLICATE_SEEDS = "src/impressionist/replicates.py", "src/impressionist/replicate_seeds.py"
REPLICATES_TESTS = ("tests/test_replicates.py",)
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
             '    if sampling.method == "style":\n        return style_sigmas(batch_size, generator)',
             '    if sampling.method != "flux_shift":\n        return torch.rand(batch_size, generator=generator)\n'
             '    if sampling.method == "style":\n        return style_sigmas(batch_size, generator)',
             FLUX_MATH_TESTS + ("tests/test_style_timesteps.py",),
             "every sampler except flux_shift (style included) draws torch.rand"),
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
    # --- train.py: what the trainer feeds the transformer and the loss
    Mutation("caption_dropout_ignored", TRAIN, "torch.rand(len(samples), generator=generator) < caption_dropout",
             "torch.rand(len(samples), generator=generator) < 0.0", TRAIN_INPUT_TESTS,
             "train.caption_dropout never drops a caption"),
    Mutation("train_guidance_ignored", TRAIN, "flow_matching_loss(transformer, guidance_scale=train.guidance_scale,",
             "flow_matching_loss(transformer, guidance_scale=1.0,", TRAIN_INPUT_TESTS,
             "the trainer passes guidance 1.0 whatever train.guidance_scale says"),
    Mutation("train_sampler_params_dropped", TRAIN,
             "TimestepSampling(train.timestep_sampling, train.logit_mean, train.logit_std, train.mode_scale)",
             "TimestepSampling(train.timestep_sampling)", TRAIN_INPUT_TESTS,
             "train.logit_mean, logit_std and mode_scale never reach the sampler"),
    Mutation("train_sampler_ignored", TRAIN, "TimestepSampling(train.timestep_sampling, ",
             'TimestepSampling("logit_normal", ', TRAIN_INPUT_TESTS,
             "the trainer samples logit_normal whatever train.timestep_sampling says"),
    Mutation("train_loss_weighting_ignored", TRAIN, "weighting=train.loss_weighting, **batch)",
             'weighting="none", **batch)', TRAIN_INPUT_TESTS, "train.loss_weighting never weights the loss"),
    # --- batch_order.py, ema.py, encode.py: what the trainer trains on and what it saves
    Mutation("resolution_mix_ignored", BATCH_ORDER,
             "weights = {r: Fraction(self.streams[r].batches_per_epoch) if not mix else mix[r] for r in used}",
             "weights = {r: Fraction(self.streams[r].batches_per_epoch) for r in used}", MULTIRES_TESTS,
             "train.resolution_mix's weights ignored (each resolution by its batch count)"),
    Mutation("bucket_order_unshuffled", BATCH_ORDER,
             "order = [members[i] for i in torch.randperm(len(members), generator=generator)]",
             "order = list(members)",
             ("tests/test_train_inputs.py::test_a_buckets_images_are_batched_together_differently_every_epoch",),
             "a bucket's images batched in cache order, the same batches every epoch"),
    Mutation("ema_decay_inverted", EMA, "get_ema_multi_avg_fn(self.decay)", "get_ema_multi_avg_fn(1.0 - self.decay)",
             EMA_TESTS, "the EMA keeps 1 - decay of the average: it follows the last steps"),
    Mutation("ema_not_restored", EMA, "                    param.copy_(saved)", "                    pass",
             EMA_TESTS, "after applied() the model trains on from the averaged weights"),
    Mutation("encode_samples_the_posterior", ENCODE, "latent_dist.mode()", "latent_dist.sample()",
             ENCODE_TESTS, "the cache holds a random VAE sample, not the posterior mean"),
    Mutation("encode_unshifted", ENCODE, "(vae.encode(pixels).latent_dist.mode() - shift) * scale",
             "vae.encode(pixels).latent_dist.mode() * scale", ENCODE_TESTS,
             "latents cached without FLUX's VAE shift factor"),
    Mutation("encode_flip_not_flipped", ENCODE, "im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images",
             "im for im in images", ENCODE_TESTS, "encode.flip caches unflipped copies"),
    # --- sample.py: which image is drawn from what
    Mutation("all_seed_0", SAMPLE, "manual_seed(int(noise))", "manual_seed(0)",
             SAMPLE_TESTS, "every image drawn with seed 0"),
    Mutation("all_first_prompt", SAMPLE, "draw(pipe, show, prompt, noise)", "draw(pipe, show, prompt_list[0][0], noise)",
             SAMPLE_TESTS, "every image drawn from the first prompt"),
    Mutation("lora_noise_differs", SAMPLE, "draw(pipe, show, prompt, noise)", "draw(pipe, show, prompt, noise + int(lora_scale > 0))",
             SAMPLE_TESTS, "LoRA images start from other noise than the base images of their row"),
    Mutation("seed_not_recorded", SAMPLE, '"seed": int(seed),', '"seed": 0,',
             SAMPLE_TESTS, "samples.csv records the wrong seed"),
    Mutation("lora_scale_ignored", INFERENCE, "adapter_weights=[float(scale)]", "adapter_weights=[1.0]",
             SAMPLE_TESTS, "every LoRA scale samples at 1.0"),
    Mutation("val_captions_dropped", SAMPLE, "[(c, VAL_CAPTION) for c in validation_captions(cfg.val_captions, captions_path)]",
             "[]", SAMPLE_TESTS, "sample.val_captions adds nothing to the prompt set"),
    Mutation("val_captions_unsorted", SAMPLE, '.sort_values("id", kind="stable")', "",
             SAMPLE_TESTS, "validation captions taken in file order, not by image id"),
    # --- data_parallel.py: the stages' work split over processes
    Mutation("order_not_restored", DATA_PARALLEL, "ordered = sorted(pairs, key=lambda pair: pair[0])",
             "ordered = pairs", DATA_PARALLEL_TESTS, "rank 0 writes the ranks' results in arrival order"),
    Mutation("seed_per_rank", SAMPLE, "manual_seed(int(noise))",
             "manual_seed(int(noise) + data_parallel.is_main() - 1)", DATA_PARALLEL_TESTS,
             "an image's noise depends on the rank that draws it"),
    # --- the evaluation set (sample.py), its statistics (stats.py), the stage and the PR report
    Mutation("eval_set_one_seed", SAMPLE, "draw(pipe, ev, prompt, noise)", "draw(pipe, ev, prompt, 0)",
             EVAL_SET_TESTS, "every evaluation image drawn with seed 0"),
    Mutation("eval_noise_shared", SAMPLE, "noise = noise_seed(key, seed)  #", "noise = int(seed)  #",
             EVAL_SET_TESTS, "every subject at seed s starts from the same noise: a seed effect no interval sees"),
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
    Mutation("reference_ids_unchecked", IMAGE_FEATURES, "    if recorded != current:", "    if False:",
             EVALUATE_TESTS, "reference features of other paintings scored against new data without a word"),
    Mutation("reference_config_unchecked", IMAGE_FEATURES, 'if info.get("features") != feature_config(cfg):',
             "if False:", EVALUATE_TESTS, "reference features of other feature networks used as they are"),
    Mutation("top_left_crop", IMAGE_FEATURES, "top, left = (new_h - size) // 2, (new_w - size) // 2",
             "top, left = 0, 0", EVALUATE_TESTS, "feature preprocessing crops the top-left, not the centre"),
    Mutation("reference_data_dep_removed", DVC_YAML,
             "      - data/filtered\n    params:\n      - evaluate.fid_features",
             "    params:\n      - evaluate.fid_features", DVC_DEPS_TESTS,
             "the reference stage does not re-run when data/filtered changes"),
    Mutation("evaluate_data_dep_removed", DVC_YAML, "      - data/reference\n      - data/filtered\n",
             "      - data/reference\n", DVC_DEPS_TESTS,
             "evaluate does not re-run (and re-check the reference's ids) when data/filtered changes"),
    Mutation("delta_reversed", EVALUATE, "paired_difference(per_image[0.0][name], per_image[top][name]",
             "paired_difference(per_image[top][name], per_image[0.0][name]", EVALUATE_TESTS,
             "delta is base - LoRA"),
    Mutation("unpaired_score_delta", EVALUATE,
             "deltas[name] = paired_difference(per_image[0.0][name], per_image[top][name], clusters, **kwargs)",
             'deltas[name] = __import__("impressionist.stats", fromlist=["stats"]).difference_of_independent('
             "results[0.0][name], results[top][name], confidence)", EVALUATE_TESTS,
             "per-image score deltas not paired: base and LoRA intervals combined as if independent"),
    Mutation("clip_against_prompt", EVALUATE, 'list(table["subject"])', 'list(table["prompt"])', EVALUATE_TESTS,
             "the CLIP score rewards the trigger word, not the subject"),
    Mutation("degenerate_not_redrawn", STATS, "        if not len(bad):\n            return counts, redrawn",
             "        if True:\n            return counts, redrawn", STATS_TESTS,
             "a replicate that draws one real painting n times is kept: KID divides 0 by 0, evaluate crashes"),
    Mutation("nan_covers_zero", REPORT, "    if not change.finite():  # a NaN interval neither covers nor excludes 0\n        return NOT_JUDGED\n",
             "", STATS_TESTS, "a NaN interval reads as \"no significant change\""),
    Mutation("no_bonferroni", REPORT, "level = bonferroni(confidence, sum(judged_here(n) for n in entries))",
             "level = confidence",
             REPORT_TESTS, "a dozen verdicts at 95% each: noise reads as a change"),
    Mutation("never_paired", REPORT, "        if not self.possible:\n            return None, self.reason",
             "        if True:\n            return None, self.reason", REPORT_TESTS,
             "per-image scores never paired across commits"),
    Mutation("direction_flipped", REPORT, "BETTER if (change.value < 0) == (way == LOWER) else WORSE",
             "WORSE if (change.value < 0) == (way == LOWER) else BETTER", REPORT_TESTS,
             "a lower KID reads as worse"),
    # --- training-seed replicates (replicate_seeds.py, replicates.py) and the report's recipe verdicts
    Mutation("replicate_variance_dropped", REPLICATES,
             "[(v_subjects, subjects - 1), (v_replicates, replicates - 1)]", "[(v_subjects, subjects - 1)]",
             REPLICATES_TESTS, "the recipe interval leaves training noise out: two seeds read as a change"),
    Mutation("recipe_change_without_training_noise", REPLICATES, "    for side in (old, new):",
             "    for side in ():", REPLICATES_TESTS,
             "a recipe change's interval counts only the subjects, not the two sides' training seeds"),
    Mutation("weight_level_always_judged", REPORT, "and (weight_level_verdicts or not weight_level(name)))",
             ")", REPLICATES_TESTS + REPORT_TESTS,
             "R = 1 verdicts called better/worse for the recipe without --weight-level"),
    Mutation("replicate_seed_is_train_seed", REPLICATE_SEEDS, "    if k == 0:\n", "    if True:\n",
             REPLICATES_TESTS, "every replicate trained from train.seed: R copies of one weight draw"),
    # --- caption.py: what the captions say
    Mutation("sidecar_ignored", CAPTION, "if sidecar is not None:", "if False:",
             CAPTION_TESTS, "kohya sidecar captions never override the template"),
    Mutation("truncation_off_by_one", CAPTION, "n > max_tokens", "n >= max_tokens",
             CAPTION_TESTS, "a caption of exactly max_sequence_length tokens flagged as truncated"),
    Mutation("particles_capitalised", CAPTION, "if index > 0 and word in NAME_PARTICLES:", "if False:",
             CAPTION_TESTS, "'Vincent Van Gogh'"),
    Mutation("no_end_of_sequence", "src/impressionist/tokens.py", "add_special_tokens=True", "add_special_tokens=False",
             CAPTION_TESTS, "T5 token counts without </s>"),
    Mutation("mojibake_kept", CAPTION, 'return candidate.encode("latin-1").decode("utf-8")', "return text",
             CAPTION_TESTS, "WikiArt's mis-decoded names stay garbled"),
    Mutation("raw_artist_slug", CAPTION, "artist=readable_artist(artist)", "artist=artist",
             CAPTION_TESTS, "captions say 'claude-monet'"),
    # --- describe.py: the scrub and the resume
    Mutation("scrub_off", DESCRIBE, '    cleaned = re.sub(pattern, " ", text, flags=re.IGNORECASE)',
             "    cleaned = text", DESCRIBE_TESTS, "style words and artist names stay in the descriptions"),
    Mutation("resume_redoes_everything", DESCRIBE, "if not all(item.id in done for item in batch)", "if True",
             DESCRIBE_TESTS, "a rerun after a kill describes every image again"),
    Mutation("resume_forgets_rows", DESCRIBE, 'rows[row["id"]] = row["raw"]', "pass",
             DESCRIBE_TESTS, "the finished batches of a killed run are thrown away"),
    Mutation("raw_cache_discarded", DESCRIBE, "    _write(result, out_dir, metrics_path, metrics)\n",
             "    _write(result, out_dir, metrics_path, metrics)\n    shutil.rmtree(raw_rows_dir)\n", DESCRIBE_TESTS,
             "a scrub or tokenizer change runs the VLM over every image again"),
    # --- download.py: every dropped file named
    Mutation("dropped_copy_unlisted", DOWNLOAD, "            progress.drop(origin, DUPLICATE, original)\n",
             "            pass\n", DOWNLOAD_TESTS, "a byte-identical copy is dropped without its name"),
    Mutation("reread_row_listed_as_copy", DOWNLOAD, 'if original["origin"] != origin:', "if True:",
             DOWNLOAD_TESTS, "a row read again after a crash is listed as a copy of itself"),
    Mutation("sidecar_loses_to_description", CAPTION, "if sidecar is not None:", "if sidecar is not None and not described:",
             DESCRIBE_TESTS, "a hand-written sidecar is ignored where the VLM described the image"),
    # --- export.py / params/training.py: every client loads the LoRA whole and at the trained strength
    Mutation("strength_not_baked", EXPORT, 'layers[f"{module}.lora_B.weight"] = (up * scale).contiguous()',
             'layers[f"{module}.lora_B.weight"] = up.contiguous()', CLIENT_TESTS,
             "ComfyUI (scale 1, no metadata) applies the diffusers file at r/alpha times its strength"),
    Mutation("blocks_preset_adds_final_layer", TRAINING_PARAMS, r'BLOCK_LINEAR_REGEX = (r"(transformer_blocks|single_transformer_blocks)\.\d+\.("',
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


PROBE_PLUGIN = "mutation_reach_probe"  # a pytest plugin written next to each copy (non-Python files)
PROBE_PLUGIN_TEXT = """\
import os
import sys

_watched = os.path.realpath(os.environ["MUTATION_WATCHED_FILE"])
_marker = os.environ["MUTATION_REACHED_MARKER"]


def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        try:
            if os.path.realpath(os.fsdecode(args[0])) == _watched and not os.path.exists(_marker):
                with open(_marker, "w"):
                    pass
        except (OSError, TypeError, ValueError):
            pass


sys.addaudithook(_hook)
"""


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float,
              extra_env: dict[str, str] | None = None, plugin: bool = False) -> tuple[bool, str, float]:
    """(passed, the first failing test or the error, seconds) of ``pytest -x tests`` in ``copy``."""
    path = [str(copy / "src"), os.environ.get("PYTHONPATH")]
    if plugin:
        path.insert(0, str(copy.parent / "probe"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)), DVC_NO_ANALYTICS="1", **(extra_env or {}))
    started = time.perf_counter()
    try:
        # -n 0: one pytest process (the suite's addopts say -n 2), so -x stops at the first failure
        # and the reach probe runs in the process that runs the tests
        result = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-x", "-q", "-rf", "-p", "no:cacheprovider",
                                 *(["-p", PROBE_PLUGIN] if plugin else []),
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


def replace_all(text: str, old: str, new: str) -> tuple[str, list[int]]:
    """``text`` with every ``old`` replaced by ``new``, and each replacement's offset in the result."""
    pieces, offsets, position, out_length = [], [], 0, 0
    while (found := text.find(old, position)) >= 0:
        pieces.append(text[position:found])
        out_length += found - position
        offsets.append(out_length)
        pieces.append(new)
        out_length += len(new)
        position = found + len(old)
    pieces.append(text[position:])
    return "".join(pieces), offsets


def innermost_statement_lines(source: str, lines: list[int]) -> list[int]:
    """For each 1-based line, the first line of the innermost statement that holds it (its first
    decorator for a decorated definition), where a probe statement can go just before."""
    import ast

    statements = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.stmt)]
    starts = []
    for line in lines:
        holding = [n for n in statements if n.lineno <= line <= n.end_lineno]
        if not holding:
            raise ValueError(f"line {line} lies in no statement")
        node = min(holding, key=lambda n: (n.end_lineno - n.lineno, -n.lineno))
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        text = source.splitlines()[first - 1].lstrip()
        if text.startswith(("elif", "else", "except", "finally")):
            raise ValueError(f"line {line}: a probe cannot go before `{text.split()[0]}`; target another text")
        starts.append(first)
    return starts


def with_python_probes(source: str, offsets: list[int], marker: Path) -> str:
    """``source`` with a statement touching ``marker`` before the statement of each offset."""
    line_of = [source.count("\n", 0, offset) + 1 for offset in offsets]
    lines = source.splitlines(keepends=True)
    for start in sorted(set(innermost_statement_lines(source, line_of)), reverse=True):
        indent = re.match(r"[ \t]*", lines[start - 1]).group(0)
        lines.insert(start - 1, f"{indent}__import__('pathlib').Path({str(marker)!r}).touch()  # mutation reach probe\n")
    return "".join(lines)


def check(mutation: Mutation, timeout: float) -> tuple[str, bool, str, float]:
    """(killed | survived | stale, reached, the first failure, seconds)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        copy = copy_tree(REPO, Path(tmp) / "repo")
        path = copy / mutation.file
        text = path.read_text()
        if mutation.old not in text:
            return "stale", False, f"text not found in {mutation.file}", 0.0
        mutated, offsets = replace_all(text, mutation.old, mutation.new)
        marker = Path(tmp) / "reached"
        extra_env, plugin = {}, False
        if path.suffix == ".py":
            mutated = with_python_probes(mutated, offsets, marker)
        else:
            probe = Path(tmp) / "probe"
            probe.mkdir()
            (probe / f"{PROBE_PLUGIN}.py").write_text(PROBE_PLUGIN_TEXT)
            extra_env = {"MUTATION_WATCHED_FILE": str(path), "MUTATION_REACHED_MARKER": str(marker)}
            plugin = True
        path.write_text(mutated)
        passed, detail, seconds = run_tests(copy, mutation.tests, timeout, extra_env, plugin)
        reached = marker.exists()
    return ("survived" if passed else "killed"), reached, detail, seconds


def choose(names: list[str]) -> list[Mutation]:
    """Mutations by exact name; a name that is none selects those whose name contains it."""
    if not names:
        return list(MUTATIONS)
    by_name = {m.name for m in MUTATIONS}
    return [m for m in MUTATIONS if any(m.name == n if n in by_name else n in m.name for n in names)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[],
                        help="run this mutation (exact name; otherwise every name containing it); repeatable")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        print(f"error: mutation names used twice: {', '.join(twice)}", file=sys.stderr)
        return 1
    chosen = choose(args.only)
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:30} {m.file:36} {m.what}")
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
        status, reached, detail, seconds = check(mutation, args.timeout)
        results.append((status, reached))
        print(f"{status.upper():9} reached {'yes' if reached else 'NO ':3} {mutation.name:30} {seconds:5.0f} s  "
              f"{mutation.file}: {mutation.what}" + (f"  <- {detail}" if detail else ""), flush=True)
    scored = [(s, r) for s, r in results if s != "stale"]
    killed = sum(s == "killed" for s, _ in scored)
    reached = sum(r for _, r in scored)
    stale = len(results) - len(scored)
    print(f"\nkill rate: {killed}/{len(scored)} = {killed / max(len(scored), 1):.0%}; "
          f"reached: {reached}/{len(scored)}" + (f" ({stale} stale)" if stale else ""))
    if stale:
        return 2
    return 0 if killed == reached == len(scored) else 1


if __name__ == "__main__":
    sys.exit(main())
