"""Several training processes from inside the train stage, so ``dvc repro`` uses every GPU.

The stage's command stays ``python -m impressionist train``. When ``train.num_processes`` asks for
more than one process (0, the default, means every visible GPU; one process on the CPU) and this
process is not already a rank of a launch, the stage hands itself to accelerate's launcher (the
code behind ``accelerate launch --multi_gpu --num_processes N -m impressionist.train``), which
starts the ranks and waits for them: DVC sees one command, and ``dvc.lock`` records the run.

Ranks split the micro-batches of a step, not the recipe: ``train.gradient_accumulation_steps`` is
the number of micro-batches per optimizer step over all ranks, so the number of processes must
divide it, and any number of processes trains the same LoRA (up to float rounding), only faster.
On the CPU (``model.device: cpu``) an explicit ``num_processes`` > 1 runs gloo ranks
(``ACCELERATE_USE_CPU=1``), which is how the tests check this path.

Several machines (``compute.machines``, :class:`MachinesParams`): with ``num_machines`` > 1 the
stage is started on every machine with its own ``machine_rank``, and the launch becomes accelerate's
multi-node launch (``--num_machines --machine_rank --main_process_ip --main_process_port``, torchrun's
static rendezvous underneath), ``num_processes`` per machine. A machine that does not join within
``join_timeout_s`` (the rendezvous ``timeout``) stops every machine with one ``error:`` line.

Under a launch started by hand (``accelerate launch --config_file ...``, torchrun, SLURM's ``srun``)
the stage runs as the launcher says and launches nothing.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import torch

from .errors import UserError
from .params.model import EVERY_GPU, MachinesParams

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
    if requested == EVERY_GPU:
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


def relaunch(module: str, argv: list[str], processes: int, mixed_precision: str, cpu: bool,
             stage: str = "train", machines: MachinesParams | None = None) -> None:
    """Run ``module`` as ``processes`` ranks on this machine (on each of ``machines``) through
    accelerate's launcher and wait for them (also the data-parallel inference stages' launch,
    :mod:`data_parallel`)."""
    machines = machines or MachinesParams()
    from accelerate.commands.launch import launch_command, launch_command_parser

    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "1"  # gloo ranks on the CPU
    args = launch_command_parser().parse_args(
        ["--multi_gpu", "--num_processes", str(processes * machines.num_machines), *machines.launch_args(),
         "--mixed_precision", mixed_precision, "--dynamo_backend", "no", "-m", module, *argv])
    where = (f" on machine {machines.machine_rank} of {machines.num_machines}, "
             f"{processes * machines.num_machines} in all" if machines.several else "")
    print(f"{stage}: launching {processes} processes{where} ({'CPU, gloo' if cpu else 'GPU'})", flush=True)
    try:
        launch_command(args)
    except Exception as err:  # torch.distributed.elastic's ChildFailedError: a rank failed
        if machines.several and _never_joined(err):
            raise UserError(f"{stage}: the {machines.num_machines} machines did not all join at "
                            f"{machines.main_process_ip}:{machines.main_process_port} within "
                            f"compute.machines.join_timeout_s={machines.join_timeout_s} s") from err
        raise UserError(f"a {stage} process failed ({type(err).__name__}); its own error is above") from err


def _never_joined(err: BaseException) -> bool:
    """The rendezvous timed out (a machine never came), not a rank's own failure."""
    while err is not None:
        text = f"{type(err).__name__} {err}".lower()
        if "timeout" in text or "timed out" in text or "rendezvous" in text:
            return True
        err = err.__cause__ or err.__context__
    return False
