"""Several training processes from inside the train stage, so ``dvc repro`` uses every GPU.

The stage's command stays ``python -m impressionist.train``. When ``train.num_processes`` asks for
more than one process (0, the default, means every visible GPU; one process on the CPU) and this
process is not already a rank of a launch, the stage hands itself to accelerate's launcher (the
code behind ``accelerate launch --multi_gpu --num_processes N -m impressionist.train``), which
starts the ranks and waits for them: DVC sees one command, and ``dvc.lock`` records the run.

Ranks split the micro-batches of a step, not the recipe: ``train.gradient_accumulation_steps`` is
the number of micro-batches per optimizer step over all ranks, so the number of processes must
divide it, and any number of processes trains the same LoRA (up to float rounding), only faster.
On the CPU (``model.device: cpu``) an explicit ``num_processes`` > 1 runs gloo ranks
(``ACCELERATE_USE_CPU=1``), which is how the tests check this path.

Under a launch started by hand (``accelerate launch --config_file ...``, e.g. several machines or
FSDP) the stage trains as the launcher says and launches nothing.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import torch

from .errors import UserError

AUTO = 0
# Set for every rank by torchrun / accelerate's launchers (accelerate's single-process launcher
# sets only the last one).
LAUNCHER_ENV = ("LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION")


def under_launcher(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return any(name in environ for name in LAUNCHER_ENV)


def largest_divisor_up_to(number: int, limit: int) -> int:
    return max(d for d in range(1, max(min(number, limit), 1) + 1) if number % d == 0)


def processes_to_launch(requested: int, accumulation: int, device: torch.device,
                        log: Callable[[str], None] = print) -> int:
    """How many processes ``train.num_processes`` (``requested``) asks for here, with
    ``train.gradient_accumulation_steps`` (``accumulation``); both as ``TrainParams`` checked them
    (an explicit count splits the micro-batches, see :func:`check_split`).

    Auto uses the most visible GPUs that split a step's micro-batches evenly, and says so when that
    leaves GPUs idle; an explicit count that cannot run here is one line.
    """
    visible = torch.cuda.device_count() if device.type == "cuda" else 0
    if requested == AUTO:
        if visible <= 1:
            return 1
        usable = largest_divisor_up_to(accumulation, visible)
        if usable < visible:
            log(f"train: {usable} of {visible} GPUs: train.gradient_accumulation_steps={accumulation} "
                f"micro-batches per step split evenly over at most {usable}; raise it to a multiple of "
                f"{visible} to use them all")
        return usable
    if device.type == "cuda" and requested > visible:
        raise UserError(f"train.num_processes={requested} but {visible} GPU(s) are visible; set it to "
                        f"at most {visible}, or 0 for every visible GPU")
    return requested


def check_split(processes: int, accumulation: int) -> None:
    """``processes`` ranks can share each step's ``accumulation`` micro-batches evenly."""
    if accumulation % processes:
        raise UserError(f"train.gradient_accumulation_steps={accumulation} micro-batches per step cannot be "
                        f"split over {processes} processes; make it a multiple of {processes} (the recipe "
                        "counts micro-batches over all processes)")


def relaunch(module: str, argv: list[str], processes: int, mixed_precision: str, cpu: bool,
             stage: str = "train") -> None:
    """Run ``module`` as ``processes`` ranks through accelerate's launcher and wait for them (also
    the data-parallel inference stages' launch, :mod:`data_parallel`)."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "1"  # gloo ranks on the CPU
    args = launch_command_parser().parse_args(
        ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
         "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
         "--main_process_port", "0",  # a free port: two runs on one machine do not collide
         "-m", module, *argv])
    print(f"{stage}: launching {processes} processes ({'CPU, gloo' if cpu else 'GPU'})", flush=True)
    try:
        launch_command(args)
    except Exception as err:  # torch.distributed.elastic's ChildFailedError: a rank failed
        raise UserError(f"a {stage} process failed ({type(err).__name__}); its own error is above") from err
