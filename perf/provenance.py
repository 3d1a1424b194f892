"""Where a benchmark figure came from: the commit and the device, for every results JSON."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> dict[str, str | bool | None]:
    """HEAD's commit and whether tracked files differ from it; None where git cannot tell."""

    def git(*command: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *command],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
                env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},  # read only: no index refresh
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads"
