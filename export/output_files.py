"""Atomic output: check the path early, build the files in a staging folder beside it, and move
them into place only once they are validated, so a failed export leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from tokdrop.export.errors import ExportError
from tokdrop.files import write_atomically


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (before an expensive export) when `path` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"output path {path} is a directory; give a file name")
    parent = path.parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ExportError(f"cannot write the output {path}: {ancestor} is not a directory")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.{secrets.token_hex(4)}.probe"
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as err:
        raise ExportError(f"cannot write the output {path}: {err.strerror or err}") from err
    return path


@contextlib.contextmanager
def staging(path: Path) -> Iterator[Path]:
    """A temporary directory beside `path` (same file system, so renames are atomic) in which the
    export writes its files under their final names; removed afterwards, whatever happens."""
    stage = path.parent / f".{path.name}.{secrets.token_hex(6)}.staging"
    stage.mkdir()
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, path: Path) -> list[Path]:
    """Move the files staged at the top of `stage` onto their final places beside `path` (each
    rename atomic); the main file `path` goes last, so it only appears once everything it refers
    to is in place. Subfolders of `stage` hold intermediate files and stay behind."""
    names = sorted((p.name for p in stage.iterdir() if p.is_file()), key=lambda name: (name == path.name, name))
    finals = []
    for name in names:
        final = path.parent / name

        def move(temp: Path, staged: Path = stage / name) -> None:
            os.replace(staged, temp)

        write_atomically(final, move)
        finals.append(final)
    return finals
