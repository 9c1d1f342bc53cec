"""Atomic safetensors writes: a reader sees the old file or the new one, never a mix or a stub.

The temp file lives in the target's folder (so the rename cannot cross file systems), is fsynced
before the rename and the folder after it (so a power cut cannot leave the new name pointing at
nothing), and gets the mode a plain ``open`` would give it (0666 less the user's umask) instead
of ``mkstemp``'s 0600, so banks and exports stay readable to the people the user shares with.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import Tensor


def user_file_mode() -> int:
    """0o666 less the process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_safetensors_atomic(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write to a temp file in the same folder, fsync it, then rename over ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, user_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
