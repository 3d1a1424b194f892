"""Failed writes explained: torch.save and numpy report a full disk without an errno ("unexpected
pos", "196 requested and 0 written"), so messages about a failed write add the free space."""

from __future__ import annotations

import shutil
from pathlib import Path


def free_space(path: Path) -> str:
    """The free space on the filesystem of `path`, e.g. "0 bytes free of 2.0 MiB on its filesystem"."""
    usage = shutil.disk_usage(path)
    return f"{_size(usage.free)} free of {_size(usage.total)} on its filesystem"


def _size(count: float) -> str:
    unit = "bytes"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if count < 1024:
            break
        count, unit = count / 1024, larger
    return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"


__all__ = ["free_space"]
