"""Data-parallel inference stages: one stage command, its work items split over every GPU.

``compute.num_processes`` (``auto``: every visible GPU, one process on the CPU; or a count) decides
how many processes the inference stages (``sample_base``, ``sample``, the feature extraction of
``reference`` and ``evaluate``) run as. The stage launches itself through accelerate as ``train``
does (:func:`launcher.relaunch`), so ``dvc repro`` stays the only command:

1. the stage's ``main`` runs its cheap checks, counts its work items and calls :func:`launch`, which
   decides the process count (one ``error:`` line for a count that cannot run here) and, for more
   than one, starts the ranks and waits for them;
2. each rank loads its models onto its own device (:func:`local_device`) and runs
   :func:`map_in_order` over the work items: accelerate's ``PartialState().split_between_processes``
   gives it a contiguous share, it does (and writes) its share, and the ranks' results travel to rank
   0, which puts them back in the items' order (:func:`assemble`) and writes the stage's outs;
3. files the ranks write go into the one temporary out folder rank 0 opened (:func:`shared_atomic_dir`),
   which appears under its final name only once every rank has finished.

The outs are byte-identical whatever the process count, because nothing an item computes depends on
its rank: each image's generator is seeded by the item's own seed, feature batches are the same
batches (the work items are whole batches), and the order is the items' order. A count that would
leave a rank without any work is refused (explicit count) or lowered (``auto``) before anything
loads; uneven shares (7 items on 2 ranks, or 1 show image on 2 ranks) are fine.

A stage adopts it in a few lines (see docs/gpus.md): ``if data_parallel.launch(stage, module, argv,
params, cuda, [n_items, ...]): return`` in ``main``, ``local_device`` for its device, and
``map_in_order(items, work)`` for its loop (``None`` on ranks other than 0, which write nothing).
``compute`` is not a DVC param of these stages: it cannot change what they write.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch

from . import launcher
from .errors import UserError, atomic_dir
from .params.model import AUTO_PROCESSES as AUTO
from .params.model import ComputeParams

Item = TypeVar("Item")


def processes_for(cfg: ComputeParams, cuda: bool, items: Sequence[int], stage: str,
                  log: Callable[[str], None] = print) -> int:
    """How many processes ``stage`` runs as here, for work lists of ``items`` items each (the lists
    it will split, e.g. one per image set).

    ``auto`` uses every visible GPU, but no more processes than the largest list has items (and
    says so); an explicit count beyond the visible GPUs, or one that would leave a process without
    any work at all, is one line. A smaller list may leave some ranks idle while it runs (a show set
    of 2 images on 8 GPUs): that costs nothing and changes no output.
    """
    visible = torch.cuda.device_count() if cuda else 0
    work = max(items, default=0)
    if cfg.num_processes == AUTO:
        wanted = max(visible, 1)
        if 0 < work < wanted:
            log(f"{stage}: {work} of {wanted} GPUs: its largest work list has {work} item(s)")
            return work
        return wanted
    wanted = int(cfg.num_processes)
    if cuda and wanted > visible:
        raise UserError(f"compute.num_processes={wanted} but {visible} GPU(s) are visible; set it to at most "
                        f"{visible}, or '{AUTO}' for every visible GPU")
    if 0 < work < wanted:
        raise UserError(f"compute.num_processes={wanted} but {stage} has only {work} work item(s) to split, "
                        f"so a process would have nothing to do; set it to at most {work}, or '{AUTO}'")
    return wanted


def launch(stage: str, module: str, argv: Sequence[str], params: Mapping[str, Any], cuda: bool,
           items: Sequence[int]) -> bool:
    """From a stage's ``main``, after its cheap checks: True when this call ran the stage as several
    ranks (then ``main`` returns), False when this process does the work itself (one process, or
    already a rank of a launch)."""
    if launcher.under_launcher():
        return False
    cfg = ComputeParams.check(params)
    processes = processes_for(cfg, cuda, items, stage)
    if processes == 1 and not cfg.machines.several:
        return False
    launcher.relaunch(module, list(argv), processes, "no", cpu=not cuda, stage=stage, machines=cfg.machines)
    return True


def _state():
    """accelerate's process state; gloo ranks on the CPU when the launch asked for them
    (``ACCELERATE_USE_CPU``, as :func:`launcher.relaunch` sets it) or no GPU is visible."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def is_main() -> bool:
    return _state().is_main_process


def local_device(device: torch.device) -> torch.device:
    """This rank's own GPU when ``device`` is CUDA under a launch; ``device`` otherwise."""
    state = _state()
    if device.type == "cuda" and state.num_processes > 1:
        return state.device
    return device


def assemble(shares: Sequence[Sequence[tuple[int, Any]]], count: int) -> list[Any]:
    """Every rank's ``(index, result)`` pairs as one list in the items' order, checked complete."""
    pairs = [pair for share in shares for pair in share]
    ordered = sorted(pairs, key=lambda pair: pair[0])
    if [index for index, _ in ordered] != list(range(count)):
        raise RuntimeError(f"the ranks returned items {sorted(i for i, _ in pairs)}, not 0..{count - 1}")
    return [result for _, result in ordered]


def map_in_order(items: Sequence[Item], work: Callable[[Item], Any]) -> list[Any] | None:
    """``[work(item) for item in items]``, the items split over the processes: on rank 0 the results
    in the items' order, ``None`` on every other rank. ``work`` may write files (into a
    :func:`shared_atomic_dir` folder); every rank must call this with the same items."""
    state = _state()
    if state.num_processes == 1:
        return [work(item) for item in items]
    from accelerate.utils import gather_object

    with state.split_between_processes(list(enumerate(items))) as share:
        mine = [(index, work(item)) for index, item in share]
    shares = gather_object([mine])  # one list per rank, in rank order
    return assemble(shares, len(items)) if state.is_main_process else None


@contextlib.contextmanager
def shared_atomic_dir(final: Path | str) -> Iterator[Path]:
    """:func:`errors.atomic_dir` for every rank: rank 0 opens the temporary folder and tells the
    others its path; it becomes ``final`` when every rank has left the block."""
    state = _state()
    if state.num_processes == 1:
        with atomic_dir(final) as tmp:
            yield tmp
        return
    from accelerate.utils import broadcast_object_list

    if state.is_main_process:
        with atomic_dir(final) as tmp:
            broadcast_object_list([str(tmp)])
            yield tmp
            state.wait_for_everyone()
    else:
        path = broadcast_object_list([None])[0]
        yield Path(path)
        state.wait_for_everyone()
