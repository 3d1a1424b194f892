"""One run at a time per folder: an exclusive lock on a lock file, which the kernel releases when
the holder ends, however it ends (also by SIGKILL), so no stale lock is ever left to clean up.

A POSIX record lock (lockf), not flock: forked DataLoader workers do not inherit it, and they
outlive a killed run by seconds."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from tokdrop.pretrain.settings import path_problem


@contextlib.contextmanager
def exclusive_use(lock_file: Path, what: str, advice: str) -> Iterator[None]:
    """Hold `lock_file` for the block, or raise a ValueError saying that `what` is in use by the
    process that holds it, and `advice`."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(descriptor, 256, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(f"{what} is in use by another run (process {holder}); {advice}") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)


def run_lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """The lock of a run's output directory: two runs would interleave their metrics and checkpoints."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} {path_problem(out, 'a directory')}")
    return exclusive_use(out / ".pretrain.lock", f"--out {out}", "wait for it to end, or choose another --out")


def shard_directory_lock(directory: Path) -> contextlib.AbstractContextManager[None]:
    """The lock of a shard directory while it is checked or built (beside it, since it may not exist yet)."""
    return exclusive_use(
        directory.parent / f".{directory.name}.lock",
        f"shard directory {directory}",
        "wait until it is built, then run again, or choose another --shard-dir",
    )


__all__ = ["exclusive_use", "run_lock", "shard_directory_lock"]
