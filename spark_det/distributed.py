"""Processes of a run: torchrun's and SLURM's launch environment, the process group, and the few
collectives every part of spark-det coordinates ranks with (the data index, checkpoints, the run
folder). Nothing here patches builtins: logging is gated by ``DistInfo.is_main``."""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import EXIT_NO_RENDEZVOUS, ConfigError, DistributedSetupError, SparkDetError, first_line


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else from SLURM's when ``srun``
    starts one task per GPU itself (then MASTER_ADDR must name the first node), else (0, 1, 0)."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        if "MASTER_ADDR" not in env:
            raise ConfigError("launched by srun without torchrun: set MASTER_ADDR to the first node, e.g. "
                              "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)")
        env.setdefault("MASTER_PORT", "29500")
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return 0, 1, 0


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Initialise from torchrun's (or SLURM's) environment: NCCL on GPUs, gloo on CPU; single
    process otherwise. ``timeout_s`` bounds the rendezvous and every collective, so a stuck
    restart fails (and torchrun retries) instead of hanging for torch's default 30 minutes."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    rank, world, local_rank = launch_environment()
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: torch sees no CUDA GPU here (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); use --device cpu, or auto for a GPU when there "
                          "is one")
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(f"rank {rank} has LOCAL_RANK {local_rank}, but this node has {torch.cuda.device_count()} "
                          "GPU(s): start at most that many processes per node (--nproc_per_node)")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        where = f"rank {rank} of {world} could not join the process group at {os.environ.get('MASTER_ADDR')}:" \
                f"{os.environ.get('MASTER_PORT')} within {timeout_s:g} s"
        # Gloo's connect can wait on the launcher's store past the timeout given here (seen after
        # torchrun restarts); a watchdog ends such a process so that torchrun can try again.
        watchdog = threading.Timer(timeout_s + 5, _give_up_rendezvous, args=(where,))
        watchdog.daemon = True
        watchdog.start()
        try:
            dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:  # DistStoreError and friends: the rendezvous failed
            raise DistributedSetupError(f"{where} ({first_line(exc)})") from exc
        finally:
            watchdog.cancel()
    return DistInfo(rank, world, local_rank, dev)


def _give_up_rendezvous(where: str) -> None:
    print(f"error: {where} (hung; exiting so that the launcher can restart)", file=sys.stderr, flush=True)
    os._exit(EXIT_NO_RENDEZVOUS)


T = TypeVar("T")


def on_main_rank(work: Callable[[], T], info: DistInfo) -> T | None:
    """Run ``work`` on the main rank only. A user error it raises is raised on every rank (the
    other ranks' copies are marked ``reported_by_main``, so only one line is printed), so no rank
    is left waiting in a collective for a rank that has stopped. Returns ``work``'s result on
    the main rank, None elsewhere."""
    result, error = None, None
    if info.is_main:
        try:
            result = work()
        except SparkDetError as exc:
            error = exc
    if info.distributed:
        box = [(type(error), str(error)) if error is not None else None]
        dist.broadcast_object_list(box, src=0)  # pickles the error class: our own process group, not a file
        if box[0] is not None and error is None:
            error = box[0][0](box[0][1])
            error.reported_by_main = True
    if error is not None:
        raise error
    return result


def gather_from_every_rank(obj: T, info: DistInfo) -> list[T]:
    """``obj`` of every rank, on every rank (a list indexed by rank; ``[obj]`` in one process)."""
    if not info.distributed:
        return [obj]
    everyone: list = [None] * info.world_size
    dist.all_gather_object(everyone, obj)
    return everyone


def require_same_on_every_rank(facts: dict, info: DistInfo) -> None:
    """Raise :class:`ConfigError` on every rank when the ranks were given different recipes,
    overrides or data (nodes launched with different command lines or mounts)."""
    if not info.distributed:
        return
    everyone = gather_from_every_rank(facts, info)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            keys = sorted(k for k in set(theirs) | set(everyone[0]) if theirs.get(k) != everyone[0].get(k))
            if "config" in keys:
                keys.remove("config")
                keys += sorted(k for k in set(theirs["config"]) | set(everyone[0]["config"])
                               if theirs["config"].get(k) != everyone[0]["config"].get(k))
            error = ConfigError(f"rank {rank} was launched differently from rank 0 (differs in {', '.join(keys)}): "
                                "give every node the same recipe, overrides and data")
            error.reported_by_main = not info.is_main
            raise error


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (one tiny all-reduce when distributed)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([0 if flag else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value)
    return int(value.item()) == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
