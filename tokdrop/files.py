"""Files that are either the old version or the new one, never half-written."""

from __future__ import annotations

import os
import secrets
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
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
