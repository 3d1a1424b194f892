"""The process group of a torchrun job and the collectives a run needs beyond those of DDP/FSDP2.
Every function also works in a single process, where it does no communication."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

_T = TypeVar("_T")


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the torchrun job when there is one: NCCL on GPUs, gloo on CPUs. Returns (rank, world
    size, this rank's device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world_size, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce(tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
    """Sum (or reduce with `op`) `tensor` over the ranks, in place."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    return tensor


def all_ranks_ok(ok: bool) -> bool:
    """True on every rank when `ok` is true on every rank."""
    if not is_distributed():
        return ok
    flag = torch.tensor([int(ok)], device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def on_rank_zero(work: Callable[[], _T]) -> _T:
    """Run `work` on rank 0 only and hand its result (or its ValueError) to every rank, so that no
    rank waits forever for a rank that failed."""
    outcome: list[Any] = [None, None]  # result, error message
    if rank() == 0:
        try:
            outcome[0] = work()
        except ValueError as err:
            outcome[1] = str(err)
    if is_distributed():
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise ValueError(outcome[1])
    return outcome[0]


__all__ = ["all_ranks_ok", "all_reduce", "init_distributed", "is_distributed", "on_rank_zero", "rank", "shutdown"]
