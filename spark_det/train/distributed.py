"""torchrun / DDP helpers. Nothing here patches builtins: logging is gated by ``is_main``."""

from __future__ import annotations

import copy
import os
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import EXIT_NO_RENDEZVOUS, ConfigError, DistributedSetupError, SparkDetError, first_line
from ..sparse.convert import enable_sparse_sync_batchnorm
from ..sparse.layers import SparseLayer, retype
from ..sparse.norms import sparse_batch_norm


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


class DenseSyncBatchNorm2d(nn.BatchNorm2d):
    """SyncBatchNorm that also runs on CPU/gloo (torch's needs a GPU): the shared visible-position
    core with every position visible, all-reduced across ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = True if dist.is_initialized() and dist.get_world_size() > 1 else None
        return sparse_batch_norm(x, None, self, group)


def unsynchronised_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` whose BatchNorms compute their statistics locally: one rank can run
    it alone (the leak audit) without waiting in a collective for the others."""
    copy_ = copy.deepcopy(model).cpu()
    enable_sparse_sync_batchnorm(copy_, None)
    for parent in copy_.modules():
        for name, child in parent.named_children():
            if isinstance(child, (nn.SyncBatchNorm, DenseSyncBatchNorm2d)) and not isinstance(child, SparseLayer):
                setattr(parent, name, retype(child, nn.BatchNorm2d))
    return copy_


class StillSparseError(RuntimeError):
    """A module that ran sparsely was replaced: the model would no longer be SparK."""


def sparse_layer_types(model: nn.Module) -> dict[str, type]:
    """Name -> class of every sparse layer (what DDP preparation must leave in place)."""
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, SparseLayer)}


def assert_still_sparse(model: nn.Module, before: dict[str, type]) -> None:
    """Raise :class:`StillSparseError` naming every sparse layer of ``before`` that is gone or changed."""
    now = dict(model.named_modules())
    lost = [f"{name} ({cls.__name__} -> {type(now[name]).__name__ if name in now else 'missing'})"
            for name, cls in before.items() if type(now.get(name)) is not cls]
    if lost:
        raise StillSparseError(f"{len(lost)} sparse layer(s) were replaced, e.g. {lost[:3]}: their statistics "
                               "would include masked positions")


def _replace_dense_batchnorms(module: nn.Module, make: Callable[[nn.BatchNorm2d], nn.Module]) -> None:
    for name, child in module.named_children():
        if isinstance(child, SparseLayer):
            continue  # sparse layers (and the dense parameter holders inside row blocks) stay as they are
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, make(child))
        else:
            _replace_dense_batchnorms(child, make)


def sync_batchnorms(model: nn.Module, use_torch_sync: bool) -> nn.Module:
    """Synchronise every BatchNorm across ranks, in place: the sparse ones all-reduce their
    visible-position statistics (the shared core, NCCL or gloo); the dense ones (the decoder's)
    become ``nn.SyncBatchNorm`` on GPUs (``use_torch_sync``) or :class:`DenseSyncBatchNorm2d`.

    Never replaces a sparse layer (unlike ``nn.SyncBatchNorm.convert_sync_batchnorm`` on the whole
    model, which turns every BatchNorm subclass into a dense one), and checks that afterwards.
    """
    before = sparse_layer_types(model)
    enable_sparse_sync_batchnorm(model)
    make = nn.SyncBatchNorm.convert_sync_batchnorm if use_torch_sync else (
        lambda bn: retype(bn, DenseSyncBatchNorm2d))
    _replace_dense_batchnorms(model, make)
    assert_still_sparse(model, before)
    return model


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
