"""The sections every GPU stage reads: ``model`` (the base model), ``compute`` (processes and machines)
and ``replicates`` (how many training seeds). No torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import UserError
from . import DTYPE_NAMES, ParamsSection, require_choice, require_int

BUILTIN_TINY_FLUX = "builtin:tiny-flux"


@dataclass(frozen=True)
class ModelParams(ParamsSection):
    """params.yaml ``model``: the base model every stage loads."""

    SECTION: ClassVar[str] = "model"
    pretrained: str
    revision: str | None = None
    dtype: str = "bfloat16"
    device: str = "cuda"

    def __post_init__(self) -> None:
        if not isinstance(self.pretrained, str) or not self.pretrained.strip():
            raise UserError("params.yaml: model.pretrained must be a Hub id, a local diffusers folder or "
                            f"{BUILTIN_TINY_FLUX}")
        if self.revision is not None and not isinstance(self.revision, str):
            self._set("revision", str(self.revision))
        require_choice(self.dtype, DTYPE_NAMES, "model.dtype")
        require_choice(self.device, ["cuda", "cpu"], "model.device")


EVERY_GPU = 0  # train.num_processes: every visible GPU (one process on the CPU)


@dataclass(frozen=True)
class MachinesParams(ParamsSection):
    """params.yaml ``compute.machines``: accelerate's multi-node settings for ``train`` and the
    data-parallel stages. One machine (the default) launches as before."""

    SECTION: ClassVar[str] = "compute.machines"
    OPTIONAL: ClassVar[bool] = True
    num_machines: int = 1
    machine_rank: int = 0             # this machine: 0 (it hosts the rendezvous) .. num_machines - 1
    main_process_ip: str = "127.0.0.1"  # the address of machine 0, reachable from every machine
    main_process_port: int = 29500    # a free TCP port on machine 0 (the same on every machine)
    join_timeout_s: int = 600         # how long machine 0 waits for the others (and they for it)

    def __post_init__(self) -> None:
        for name in ("num_machines", "main_process_port", "join_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"params.yaml: compute.machines.{name}={value!r} must be a whole number >= 1")
        rank = self.machine_rank
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.num_machines:
            raise UserError(f"params.yaml: compute.machines.machine_rank={rank!r} must be 0 .. "
                            f"{self.num_machines - 1} (compute.machines.num_machines={self.num_machines})")
        if not isinstance(self.main_process_ip, str) or not self.main_process_ip:
            raise UserError("params.yaml: compute.machines.main_process_ip must be the address of machine 0")

    @property
    def several(self) -> bool:
        return self.num_machines > 1

    def launch_args(self) -> list[str]:
        """``accelerate launch`` arguments for these machines."""
        if not self.several:
            # a free port: two runs on one machine do not collide
            return ["--num_machines", "1", "--main_process_port", "0"]
        return ["--num_machines", str(self.num_machines), "--machine_rank", str(self.machine_rank),
                "--main_process_ip", self.main_process_ip, "--main_process_port", str(self.main_process_port),
                "--rdzv_backend", "static", "--rdzv_conf", f"timeout={self.join_timeout_s}"]


AUTO_PROCESSES = "auto"


@dataclass(frozen=True)
class ComputeParams(ParamsSection):
    """params.yaml ``compute``: how many processes the inference stages run as."""

    SECTION: ClassVar[str] = "compute"
    OPTIONAL: ClassVar[bool] = True
    num_processes: int | str = AUTO_PROCESSES  # auto: every visible GPU (1 on the CPU); or a count >= 1
    machines: MachinesParams = field(default_factory=MachinesParams)

    def __post_init__(self) -> None:
        n = self.num_processes
        if n != AUTO_PROCESSES and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise UserError(f"params.yaml: compute.num_processes={n!r} must be '{AUTO_PROCESSES}' (every visible GPU, "
                            "one process on the CPU) or a whole number >= 1")


def check_split(processes: int, accumulation: int) -> None:
    """``processes`` ranks can share each step's ``accumulation`` micro-batches evenly."""
    if accumulation % processes:
        raise UserError(f"train.gradient_accumulation_steps={accumulation} micro-batches per step cannot be "
                        f"split over {processes} processes; make it a multiple of {processes} (the recipe "
                        "counts micro-batches over all processes)")


@dataclass(frozen=True)
class ReplicateParams(ParamsSection):
    """params.yaml ``replicates``: how many LoRAs of the recipe are trained (``count``, R)."""

    SECTION: ClassVar[str] = "replicates"
    OPTIONAL: ClassVar[bool] = True
    count: int = 1

    def __post_init__(self) -> None:
        require_int(self.count, "replicates.count", minimum=1)
