"""Atomic safetensors writes: a reader sees the old file or the new one, never a mix or a stub."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import Tensor


def _umask() -> int:
    """The process umask (only readable by setting it; put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors_atomic(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write to a temp file in the same folder, fsync it, then rename over ``path``.

    The temp file is created 0600 (mkstemp); it gets the mode an ordinary new file would have
    (0666 less the umask) before the rename, so banks and exports can be shared like other files.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
