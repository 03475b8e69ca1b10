"""Process-group setup for torchrun and submitit/SLURM jobs, and the few collectives the engine needs.

Single-process runs never initialise torch.distributed, so every helper here also works without a process group.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"  # single | torchrun | submitit

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_dist_env() -> DistEnv:
    """Where this process sits in the job: torchrun's variables, then submitit's JobEnvironment (SLURM), else single.

    A SLURM job inherits the submitting shell's environment (sbatch exports it): RANK or MASTER_ADDR found there
    describe some other process group. In a submitit SLURM job only a torchrun started inside the job counts, and
    the rendezvous always comes from the job's own allocation (a stale MASTER_ADDR would hang every rank).
    """
    in_slurm_job = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if not in_slurm_job or "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun sets it in its workers
            return DistEnv(
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                source="torchrun",
            )
        log.warning("ignoring RANK/WORLD_SIZE inherited from the submitting environment: SLURM gives the ranks")
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        job = submitit.JobEnvironment()
        if in_slurm_job and job.num_tasks > 1:
            set_slurm_rendezvous(job.hostnames[0])
        return DistEnv(job.global_rank, job.num_tasks, job.local_rank, source="submitit")
    return DistEnv()


def set_slurm_rendezvous(first_node: str) -> None:
    """MASTER_ADDR/PORT of a multi-task SLURM job: its first node, and a port derived from the job id.

    The raw SLURM_JOB_ID is unique per array task, so two jobs sharing a node never pick the same port, and a
    requeued job (same id) finds its ranks again on the same port.
    """
    wanted = {"MASTER_ADDR": first_node, "MASTER_PORT": str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)}
    for key, value in wanted.items():
        if os.environ.get(key, value) != value:
            log.warning("%s=%s inherited from the submitting environment replaced by %s", key, os.environ[key], value)
        os.environ[key] = value


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """`auto` picks CUDA when available; each process of a multi-GPU job takes the GPU of its local rank."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected auto | cpu | cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but torch.cuda.is_available() is False")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def init_process_group(env: DistEnv, device: torch.device) -> None:
    """Join the job's process group (nccl on GPU, gloo on CPU); a no-op for single-process runs."""
    if not env.distributed or dist.is_initialized():
        return
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"distributed run (world size {env.world_size}) but {key} is not set in the environment")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size)
    log.info("rank %d/%d joined a %s process group (%s)", env.rank, env.world_size, backend, env.source)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy; the input is left alone)."""
    out = values.detach().clone()
    if is_dist():
        dist.all_reduce(out)
        out /= dist.get_world_size()
    return out


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    out = values.detach().clone()
    if is_dist():
        dist.all_reduce(out)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's value on every rank (used for the W&B run id and the resume decision)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: object) -> list:
    """Every rank's value, in rank order (a one-element list without a process group)."""
    if not is_dist():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
