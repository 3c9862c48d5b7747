"""torchrun DDP with a single-process fallback: the same code runs on a laptop and on a cluster."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import ConfigError
from .files import error_chain


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this call created the process group, so its cleanup destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(name: str) -> str:
    """'auto' as the device this machine has (cuda, else cpu); any other name as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def init_distributed(device: str = "auto", timeout: timedelta | None = None) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (RANK/WORLD_SIZE set); otherwise one process.

    A group that already exists (a pilot runs several trainings in one job) is reused and left for its creator
    to destroy. `timeout` bounds every collective, barriers included: a job whose other ranks wait while rank 0
    evaluates needs it longer than the default. `device` may name one device (cuda:1): its family decides (under
    torchrun each rank takes cuda:LOCAL_RANK; alone the caller uses the device as given).
    """
    family = device.partition(":")[0]
    if family == "cuda" and not torch.cuda.is_available():
        # Asked for explicitly: running on the CPU instead would cost days without a word.
        raise ConfigError(f"device 'cuda' requested but CUDA is not available (torch {torch.__version__}); use "
                          f"device 'cpu' or 'auto'")
    use_cuda = torch.cuda.is_available() and family in ("auto", "cuda")
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", **kwargs)
    return DistInfo(rank, world, local_rank, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"), owns)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        # On the group's device: an NCCL group has no CPU backend, so a CPU tensor would fail there.
        x = x.detach().to(info.device, copy=True)
        dist.all_reduce(x)
        x /= info.world
    return x


def all_reduce_max_each(values: torch.Tensor, info: DistInfo) -> list[float]:
    """Element-wise maxima of `values` (flattened) over all ranks, on every rank: decisions that every rank must
    take together, agreed with one collective and one host sync. Reduced on the group's device."""
    values = values.detach().reshape(-1)
    if not info.enabled:
        return [float(v) for v in values.tolist()]
    x = values.to(device=info.device, dtype=torch.float64, copy=True)  # reduced in place
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.tolist()


def raise_on_every_rank(error: BaseException | None, info: DistInfo, what: str) -> None:
    """Raise on every rank when rank 0, alone doing `what` (e.g. writing a checkpoint), got `error`: rank 0 its own
    error, the others an OSError with the same errno, so every rank reports the same one line; a rank left
    waiting in the next collective would hang, or die with a connection error. One collective when distributed."""
    code = next((e.errno for e in error_chain(error) if isinstance(e, OSError) and e.errno), 0)
    if info.enabled:
        failed, code = all_reduce_max_each(torch.tensor([float(error is not None), float(code)]), info)
    else:
        failed = error is not None
    if error is not None:
        raise error
    if failed:
        raise OSError(int(code), f"rank 0 failed while {what}; its error says why")


def shard_range(n: int, info: DistInfo) -> range:
    """This rank's contiguous share of n items; shares differ in size by at most one, in rank order."""
    per, extra = divmod(n, info.world)
    start = info.rank * per + min(info.rank, extra)
    return range(start, start + per + (info.rank < extra))


def all_gather_list(items: list, info: DistInfo) -> list:
    """Every rank's `items`, concatenated in rank order, on every rank (picklable objects, arrays included: pickled
    between the job's own processes; everything is held in memory on every rank)."""
    if not info.enabled:
        return list(items)
    parts: list = [None] * info.world
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def cleanup(info: DistInfo) -> None:
    if info.enabled and info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
