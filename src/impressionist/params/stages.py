"""Which params sections each stage reads, so ``python -m impressionist <stage>`` (the command of every
dvc.yaml stage, and ``impressionist <stage>``) refuses a bad value in a fraction of a second, before
the stage module imports torch and diffusers.

A stage still checks its sections itself (and what needs a model or a library's registry: the names of
an explicit ``lora.targets`` list, open_clip model names, the GPU count); this is the cheap part, done
first. Only sections the stage reads on every run with those options are listed (tests/test_stage_entry.py
finds each one checked in the stage's code), so the early check never refuses a run the stage itself
would accept; it only refuses sooner.
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping, Sequence

from . import DEFAULT_PARAMS, ParamsSection, load_params
from .data import CaptionParams, DescribeParams, DownloadParams, EncodeParams, FilterParams
from .evaluation import EvaluateParams, SampleParams
from .model import ComputeParams, MachinesParams, ModelParams, ReplicateParams
from .shipping import ExportParams
from .training import LoraParams, TrainParams

# The sections of each stage's plain run (`sample --base` reads the same as `sample`).
STAGE_SECTIONS: dict[str, tuple[type[ParamsSection], ...]] = {
    "download": (DownloadParams,),
    "filter": (FilterParams,),
    "describe": (ModelParams, DescribeParams),
    "caption": (ModelParams, CaptionParams),
    "encode": (ModelParams, CaptionParams, EncodeParams),
    "train": (ModelParams, LoraParams, TrainParams, MachinesParams),
    "export": (ModelParams, ExportParams),
    "sample": (ModelParams, CaptionParams, SampleParams, ComputeParams),
    "reference": (EvaluateParams, ComputeParams),
    "evaluate": (EvaluateParams, ComputeParams),
    "generate": (ModelParams, SampleParams),
}
# An option that changes what a stage reads: `--replicates` (train_replicates, sample_replicates) reads
# `replicates` first and, with count 1, nothing else; with more it checks the rest itself.
OPTION_SECTIONS: dict[tuple[str, str], tuple[type[ParamsSection], ...]] = {
    ("train", "--replicates"): (ReplicateParams,),
    ("sample", "--replicates"): (ReplicateParams,),
}


def params_file(argv: Sequence[str]) -> str:
    """The ``--params`` a stage's command line names (every stage takes it; default params.yaml)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    return parser.parse_known_args(list(argv))[0].params


def sections_read(stage: str, argv: Sequence[str] = ()) -> tuple[type[ParamsSection], ...]:
    """The sections ``stage`` run with ``argv`` reads whatever its params say."""
    for (name, option), sections in OPTION_SECTIONS.items():
        if name == stage and option in argv:
            return sections
    return STAGE_SECTIONS.get(stage, ())


def check_stage(stage: str, params: Mapping[str, Any], argv: Sequence[str] = ()) -> None:
    """Every section ``stage`` (with ``argv``) reads, checked (one UserError line for the first bad value)."""
    for section in sections_read(stage, argv):
        section.check(params)


def check_stage_args(stage: str, argv: Sequence[str]) -> None:
    """:func:`check_stage` on the params file ``argv`` names. ``--help`` is left to the stage."""
    if stage in STAGE_SECTIONS and not {"-h", "--help"} & set(argv):
        check_stage(stage, load_params(params_file(argv)), argv)
