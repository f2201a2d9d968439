"""Where this process sits in a multi-process run, and the few collectives the Trainer needs.

The rank, world size and rendezvous address come from the launcher's environment: torchrun
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), SLURM tasks (`SLURM_PROCID`,
`SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_JOB_NODELIST`, `SLURM_JOB_ID`; what `srun` and Hydra's
submitit launcher start), or submitit's local executor (`SUBMITIT_LOCAL_*`). Without any of them
the run is a single process and nothing here communicates.
"""

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from opl.errors import ConfigError


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, e.g. "gpu[01-03,07],login1" -> gpu01, gpu02, gpu03, gpu07, login1."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{number:0{len(first)}d}")
    if not hosts:
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}")
    return hosts


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "none"  # none | torchrun | slurm | submitit_local

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env=None) -> "DistributedContext":
        env = os.environ if env is None else env
        try:
            if "WORLD_SIZE" in env and "RANK" in env:  # torchrun (also sets MASTER_ADDR/PORT)
                return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                           env.get("MASTER_ADDR"), int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None, "torchrun")
            if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
                job = int(env.get("SLURM_JOB_ID", 0))
                return cls(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                           env.get("MASTER_ADDR") or expand_nodelist(env["SLURM_JOB_NODELIST"])[0],
                           int(env.get("MASTER_PORT") or 20000 + job % 20000), "slurm")
            if "SUBMITIT_LOCAL_GLOBALID" in env and int(env.get("SUBMITIT_LOCAL_NTASKS", 1)) > 1:
                job = int(env.get("SUBMITIT_LOCAL_JOB_ID", 0))
                return cls(int(env["SUBMITIT_LOCAL_GLOBALID"]), int(env["SUBMITIT_LOCAL_NTASKS"]),
                           int(env["SUBMITIT_LOCAL_LOCALID"]), "127.0.0.1", 20000 + job % 20000, "submitit_local")
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"incomplete or malformed launcher environment ({type(exc).__name__}: {exc})") from exc
        return cls()

    def device(self, requested: str) -> str:
        """The device of this rank: `cuda:<local rank>` when CUDA is asked for (or auto) in a
        multi-process run, the requested device otherwise."""
        if not self.enabled or requested not in ("auto", "cuda"):
            return requested
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else ("cpu" if requested == "auto" else requested)

    def init(self, device: torch.device, timeout_s: float) -> None:
        """Join the process group (NCCL on CUDA, gloo on CPU); a rank that fails or stops answering
        ends every other rank's collective after `timeout_s` instead of a hang."""
        if not self.enabled or dist.is_initialized():
            return
        if self.master_addr:
            os.environ.setdefault("MASTER_ADDR", self.master_addr)
        if self.master_port:
            os.environ.setdefault("MASTER_PORT", str(self.master_port))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=self.rank,
                                world_size=self.world_size, timeout=timedelta(seconds=timeout_s))

    def close(self, finished: bool = False) -> None:
        """Leave the process group. `finished`: every rank got here in step (the job ended well), so
        wait for all of them first; tearing down gloo's connections while a peer's last messages are
        in flight can abort that peer ("terminate called without an active exception")."""
        if self.enabled and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (rank order), rows per rank may differ; no gradient."""
    rank, size = world()
    if size == 1:
        return tensor
    counts = [torch.zeros((), dtype=torch.int64, device=tensor.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor(tensor.shape[0], device=tensor.device))
    longest = int(max(counts))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(n)] for part, n in zip(parts, counts)])


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (e.g. batch-norm running statistics) in every rank's `module`. DDP sends them
    only at the start of each training forward, so after a step every rank's statistics include its
    own batch; evaluating then would shard the data over slightly different models."""
    if world()[1] == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def broadcast_object(value):
    """Rank 0's `value` on every rank."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
