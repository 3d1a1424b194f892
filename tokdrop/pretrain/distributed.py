"""The process group of a torchrun job, the collectives a run needs beyond those of DDP/FSDP2, and
what a rank says when another one stops answering. Every function also works in a single process,
where it does no communication.

No rank waits forever: a collective gives up after --collective-timeout seconds, and a rank that
waits for rank 0 to finish work of its own (tokenising a corpus can take hours) gives up once rank 0
has sent no heartbeat for that long. A failed collective (a timeout, or gloo's "Connection closed by
peer" when a rank died) then becomes one message that names the ranks missing from a roll call on
the job's key-value store.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

_T = TypeVar("_T")
_POLL_SECONDS = 0.1
_ROLL_CALL_SECONDS = 10  # at most; how long the ranks that noticed a failure wait for each other
# What gloo and NCCL say when a peer is gone or late; their errors are plain RuntimeErrors.
_PEER_FAILURE = re.compile(r"gloo|nccl|connection (closed|reset) by peer", re.IGNORECASE)


class RankFailure(RuntimeError):
    """Another rank stopped answering or failed, so this one cannot go on."""


@dataclass
class _Job:
    store: dist.Store
    rank: int
    world_size: int
    timeout: float  # seconds
    calls: Iterator[int] = field(default_factory=itertools.count)  # keys of on_rank_zero, the same on every rank


_job: _Job | None = None


def init_distributed(timeout: float) -> tuple[int, int, torch.device]:
    """Join the torchrun job when there is one: NCCL on GPUs, gloo on CPUs, every collective bounded
    by `timeout` seconds. Returns (rank, world size, this rank's device)."""
    global _job
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # The store of the job's rendezvous, kept for the roll call and on_rank_zero's heartbeat.
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=dist.PrefixStore("default_pg", store),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    _job = _Job(dist.PrefixStore("tokdrop", store), rank, world_size, timeout)
    return rank, world_size, device


def shutdown() -> None:
    global _job
    if dist.is_initialized():
        dist.destroy_process_group()
    _job = None


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
    """Run `work` on rank 0 only and hand its JSON-able result, or its ValueError, to every rank.
    The other ranks wait as long as rank 0's heartbeat goes on, and raise RankFailure when it
    stops for --collective-timeout seconds or `work` fails otherwise."""
    if _job is None:
        return work()
    key = f"rank-zero/{next(_job.calls)}"
    if _job.rank == 0:
        outcome: dict[str, Any]
        try:
            with _heartbeat(_job, f"{key}/heartbeat"):
                outcome = {"result": work()}
        except ValueError as err:
            outcome = {"error": str(err)}
            raise
        except BaseException as err:
            outcome = {"failed": f"{type(err).__name__}: {err}"}
            raise
        finally:
            _job.store.set(key, json.dumps(outcome))
        return outcome["result"]
    outcome = json.loads(_wait_for_rank_zero(_job, key))
    if "error" in outcome:
        raise ValueError(outcome["error"])
    if "failed" in outcome:
        raise RankFailure(f"rank 0 failed: {outcome['failed']}")
    return outcome["result"]


@contextlib.contextmanager
def _heartbeat(job: _Job, key: str) -> Iterator[None]:
    """Count up `key` on the store while the block runs, so that waiting ranks know rank 0 lives."""
    stopped = threading.Event()

    def beat() -> None:
        while not stopped.wait(min(1.0, job.timeout / 4)):
            job.store.add(key, 1)

    thread = threading.Thread(target=beat, name="tokdrop-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()


def _wait_for_rank_zero(job: _Job, key: str) -> bytes:
    beats, last_beat = -1, time.monotonic()
    while not job.store.check([key]):
        now, count = time.monotonic(), job.store.add(f"{key}/heartbeat", 0)
        if count != beats:
            beats, last_beat = count, now
        elif now - last_beat > job.timeout:
            raise RankFailure(f"no heartbeat of rank 0 for {job.timeout:g} s")
        time.sleep(_POLL_SECONDS)
    return job.store.get(key)


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` says that another rank is gone or late, rather than what this rank did wrong."""
    if isinstance(error, (RankFailure, dist.DistError)):
        return True
    return isinstance(error, RuntimeError) and _job is not None and bool(_PEER_FAILURE.search(str(error)))


def describe_peer_failure(error: BaseException) -> str | None:
    """The message for a peer failure, naming the ranks that miss the roll call; None on every rank
    but the lowest one that answers it, so that the job says it once."""
    job = _job
    if job is None:
        raise RuntimeError("describe_peer_failure needs a process group")
    missing = _roll_call(job)
    detail = _first_sentence(str(error))
    if missing is None:
        who = f"the job's store cannot be reached ({detail})"
    elif missing:
        who = f"rank {missing[0]} does not" if len(missing) == 1 else f"ranks {missing} do not"
        who += f" answer ({detail})"
    else:
        who = f"every rank answers, but a collective failed ({detail})"
    speaker = min(set(range(job.world_size)) - set(missing or ()))
    if job.rank != speaker:
        return None
    return f"rank {job.rank} of {job.world_size}: {who}; collectives wait --collective-timeout={job.timeout:g} s"


def _roll_call(job: _Job) -> list[int] | None:
    """The ranks that do not check in on the store within a few seconds, or None when the store
    cannot be reached."""
    names = [f"roll-call/{r}" for r in range(job.world_size)]
    deadline = time.monotonic() + min(job.timeout, _ROLL_CALL_SECONDS)
    try:
        job.store.set(names[job.rank], "here")
        while True:
            present = {r for r, name in enumerate(names) if job.store.check([name])}
            if len(present) == job.world_size or time.monotonic() > deadline:
                return [r for r in range(job.world_size) if r not in present]
            time.sleep(_POLL_SECONDS)
    except (RuntimeError, dist.DistError):  # DistStoreError, or a store that lived on a dead rank
        return None


def _first_sentence(message: str) -> str:
    """A backend error in short: gloo's starts with "[/path/to/pair.cc:537] " and ends with advice."""
    line = message.strip().split("\n", 1)[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", line).split(". ", 1)[0][:300]


__all__ = [
    "RankFailure",
    "all_ranks_ok",
    "all_reduce",
    "describe_peer_failure",
    "init_distributed",
    "is_distributed",
    "is_peer_failure",
    "on_rank_zero",
    "rank",
    "shutdown",
]
