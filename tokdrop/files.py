"""Files and directories that are either the old version or the new one, never half-written."""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any


def write_atomically(path: Path, write: Any) -> None:
    """Call write(temp_path) and rename the result onto `path`, so a crash leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # An ordinary file's mode (0o666 less the umask), kept even if `write` replaces the file
    # (safetensors' save_file leaves 0o600, as mkstemp would).
    os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = os.stat(temp).st_mode
        write(temp)
        os.chmod(temp, mode)
        fsync(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def fsync(path: Path) -> None:
    """Flush a file or directory to disk, so a power cut cannot leave a renamed but empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_directory_atomically(directory: Path, write: Callable[[Path], None], replaced: Collection[str]) -> None:
    """Call write(temp_dir) and make the result `directory` in one step: a kill at any point leaves
    the old directory or the new one, never a mix.

    The directory's other entries (those not named in `replaced`) are carried over, as hard links.
    Temporaries of saves that were killed are removed first.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    temp = directory.with_name(f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        if directory.is_dir():
            shutil.copytree(directory, temp, copy_function=os.link, ignore=lambda _, names: _dropped(names, replaced))
        else:
            temp.mkdir()
        write(temp)
        for path in temp.iterdir():
            if path.is_file():
                fsync(path)
        fsync(temp)
        if directory.exists():
            _swap(temp, directory)
        else:
            os.rename(temp, directory)
        fsync(directory.parent)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # after a swap it holds the old contents


def _dropped(names: list[str], replaced: Collection[str]) -> list[str]:
    """The entries a new version does not carry over: those it replaces, and write_atomically's
    temporaries left by a kill."""
    return [n for n in names if n in replaced or (n.startswith(".") and n.endswith(".tmp"))]


def _swap(new: Path, old: Path) -> None:
    """Exchange two directories atomically (Linux renameat2), or, where the file system cannot,
    move the old one aside and the new one in (a kill between the two leaves the old one aside,
    under a temporary name that the next save restores)."""
    if _exchange(new, old):
        return
    aside = old.with_name(f".{old.name}.{os.getpid()}.{secrets.token_hex(4)}.old")
    os.rename(old, aside)
    os.rename(new, old)
    os.rename(aside, new)  # removed with the other temporaries


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _remove_stale_temporaries(directory: Path) -> None:
    """Remove the temporaries of killed saves of `directory`; restore an old version set aside by a
    save killed between its two renames, if the directory itself is gone."""
    if not directory.parent.is_dir():
        return
    for path in directory.parent.glob(f".{directory.name}.*.*"):
        parts = path.name[len(directory.name) + 2 :].split(".")
        if len(parts) != 3 or parts[2] not in ("tmp", "old") or not parts[0].isdigit():
            continue
        if _alive(int(parts[0])):
            continue  # another process's save in progress
        if parts[2] == "old" and not directory.exists():
            os.rename(path, directory)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process saves one directory at a time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
