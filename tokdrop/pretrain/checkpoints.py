"""Training checkpoints that a kill, a full disk or a flipped bit cannot turn into lost work.

A checkpoint is a directory ``<root>/step-00000100`` holding

    .metadata, *.distcp   model (importance table included) and optimizer state, written with
                          torch.distributed.checkpoint: each rank writes its own shards (FSDP2),
                          replicated state (DDP, one process) is written once
    rng-rank00000.pt ...  each rank's torch RNG states
    trainer.json          step, data position, scheduler, grad scaler, the run's settings
    manifest.json         size and CRC-32 of every file above; written last

It is assembled in ``<root>/.step-00000100.tmp`` and renamed into place once complete and synced,
so a crash or a failed write during a save leaves the earlier checkpoints as they were (the next
successful save removes a stale ``.tmp``). Loading checks the manifest first and names the first file
that is missing, truncated or corrupt. The functions are collective: every rank calls them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from tokdrop.pretrain.disk import free_space
from tokdrop.pretrain.distributed import all_ranks_ok, is_peer_failure, on_rank_zero, rank
from tokdrop.pretrain.settings import path_problem

CHECKPOINTS = "checkpoints"  # the folder of a run's checkpoints, in --out
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.json"
_STEP_DIR = re.compile(r"step-(\d{8})")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the earlier ones are intact."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_directories(root: Path) -> list[Path]:
    """Every checkpoint directory under `root`, oldest first: also one that lost its manifest, which
    cannot be loaded but still marks how far the run got."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()), key=lambda p: p.name)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root` (those with a manifest), oldest first."""
    return [p for p in step_directories(root) if (p / MANIFEST).is_file()]


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` under `root` and keep only the newest `keep_last` ones.

    Raises CheckpointSaveError (on every rank) when any rank fails to write; the partial checkpoint
    is removed and the earlier ones are untouched.
    """
    final = root / checkpoint_name(step)
    temp = root / f".{final.name}.tmp"

    def prepare() -> None:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)

    def write_state() -> None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        with _single_process_is_intended():
            dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=temp)
        torch.save(_rng_states(), temp / _rng_name(rank()))

    def seal() -> None:
        (temp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        files = sorted(p for p in temp.iterdir() if p.is_file())
        for path in files:
            _fsync(path)
        manifest = {p.name: {"bytes": p.stat().st_size, "crc32": _crc32(p)} for p in files}
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync(temp / MANIFEST)
        _fsync(temp)
        os.replace(temp, final)
        _fsync(root)

    for work, everyone in ((prepare, False), (write_state, True), (seal, False)):
        failure = None
        if everyone or rank() == 0:
            try:
                work()
            # DCP wraps each rank's OSError in a CheckpointException, which is no Exception.
            except (Exception, CheckpointException) as err:
                if is_peer_failure(err):  # the vote below would wait for the missing rank again
                    raise
                failure = err
        if not all_ranks_ok(failure is None):
            # Measured before the clean-up: torch.save reports a full disk as "unexpected pos", without errno.
            cause = "another rank failed to write" if failure is None else f"{_cause(failure)} ({free_space(root)})"
            if rank() == 0:
                shutil.rmtree(temp, ignore_errors=True)
            raise CheckpointSaveError(
                f"could not save checkpoint {final}: {cause}; {newest_checkpoint_note(root)}"
            ) from failure
    if rank() == 0:
        stale = [p for p in root.iterdir() if p.name.startswith(".step-") and p.name.endswith(".tmp")]
        for old in step_directories(root)[:-keep_last] + stale:  # stale: saves cut short by a kill
            shutil.rmtree(old)
    return final


def newest_checkpoint_note(root: Path) -> str:
    """Which checkpoint under `root` a run can continue from, as a clause for an error message."""
    intact = list_checkpoints(root)
    return f"the newest intact checkpoint is {intact[-1]}" if intact else f"there is no intact checkpoint in {root}"


def _cause(error: BaseException) -> str:
    """What failed, in one line: DCP's CheckpointException holds each failing rank's exception (and
    its str() their tracebacks)."""
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {rank}: {failure}" for rank, (failure, _) in sorted(error.failures.items()))
    return str(error)


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file of checkpoint `path` against its manifest (on rank 0; the others get the
    outcome) and return its trainer state. A ValueError names the first bad file."""

    def check() -> dict[str, Any]:
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise ValueError(f"checkpoint {path} {path_problem(path, 'a checkpoint directory')}")
        if not manifest_path.is_file():
            raise ValueError(f"checkpoint {path} is incomplete: {MANIFEST} is missing")
        manifest = _read_json(manifest_path)
        for name, expected in manifest.items():
            file = path / name
            if not isinstance(expected, dict) or not {"bytes", "crc32"} <= expected.keys():
                raise ValueError(f"checkpoint file {manifest_path} is corrupt: bad entry for {name!r}")
            if not file.is_file():
                raise ValueError(f"checkpoint file {file} is missing")
            if file.stat().st_size != expected["bytes"]:
                raise ValueError(
                    f"checkpoint file {file} is truncated or overwritten: "
                    f"{file.stat().st_size} bytes, the manifest says {expected['bytes']}"
                )
            if _crc32(file) != expected["crc32"]:
                raise ValueError(f"checkpoint file {file} is corrupt: its CRC-32 differs from the manifest")
        return _read_json(path / TRAINER_STATE)

    return on_rank_zero(check)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load model and optimizer state and this rank's RNG states from a verified checkpoint."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        with _single_process_is_intended():
            dcp.load({"model": model_state, "optim": optimizer_state}, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
        rng = torch.load(path / _rng_name(rank()), weights_only=True)
    except Exception as err:  # DCP and torch.load raise many kinds on bad data
        raise ValueError(f"cannot load checkpoint {path}: {err}") from err
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group: one process is a valid run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _rng_name(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint file {path} is unreadable: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"checkpoint file {path} must hold a JSON object")
    return value


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk, so a power cut cannot leave a renamed but empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "CHECKPOINTS",
    "CheckpointSaveError",
    "checkpoint_name",
    "list_checkpoints",
    "newest_checkpoint_note",
    "load_checkpoint",
    "save_checkpoint",
    "step_directories",
    "verify_checkpoint",
]
