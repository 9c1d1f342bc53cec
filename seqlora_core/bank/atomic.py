"""Atomic safetensors writes: a reader sees the old file or the new one, never a mix or a stub.

The temp file lives in the target's folder (so the rename cannot cross file systems), is fsynced
before the rename and the folder after it (so a power cut cannot leave the new name pointing at
nothing), and gets the mode a plain ``open`` would give it (0666 less the user's umask) instead
of ``mkstemp``'s 0600, so banks and exports stay readable to the people the user shares with.

Every write failure the user can cause or meet (a full disk, a read-only folder, a name too long
for the file system) becomes one :class:`WriteFailed` sentence saying the file on disk was left as
it was, and the temp file is removed. ``check`` lets a caller read the temp file back before the
rename (banks: the reader must accept what is written). Several files written together (an export:
a LoRA and its embeddings) are all written to temp files first and renamed only when every one was
written, so a failure leaves none of them half done.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from ..errors import SeqLoRAError

TEMP_SUFFIX = ".tmp"
_TEMP_NAME_KEEP = 160  # bytes of the target name kept in its temp name: room for the dot and random part


class WriteFailed(SeqLoRAError):
    """A file could not be written; whatever was on disk under its name is unchanged."""


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


def temp_prefix(path: Path) -> str:
    """``.<name>.`` — the start of every temp file of ``path`` (``mkstemp`` adds a random part and
    ``.tmp``). A long name is cut, so that a target name the file system allows never fails only
    because its temp name is longer; ``stale_temps`` finds them by the same prefix."""
    name = path.name.encode()[:_TEMP_NAME_KEEP].decode(errors="ignore")
    return f".{name}."


def stale_temps(path: Path, older_than_s: float = 60.0) -> list[Path]:
    """Temp files of ``path`` (exactly ``temp_prefix`` + mkstemp's 8 random characters + ``.tmp``,
    so no other file's temp matches) last modified more than ``older_than_s`` ago: what a writer
    killed mid-save (``kill -9``, a power cut) left behind. Only a caller holding the bank's lock
    may remove them (every SeqLoRA writer of a bank saves under it); the age spares a writer that
    does not lock and is writing right now (its temp file's mtime moves while it writes)."""
    pattern = re.compile(re.escape(temp_prefix(path)) + r"[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
    now = time.time()
    found = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    for entry in entries:
        try:
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False) \
                    and now - entry.stat(follow_symlinks=False).st_mtime > older_than_s:
                found.append(Path(entry.path))
        except OSError:
            continue
    return found


def remove_stale_temps(path: Path, older_than_s: float = 60.0) -> list[Path]:
    """Remove ``stale_temps(path)``; returns those removed (a failure to remove one is ignored:
    it is litter, not data)."""
    removed = []
    for tmp in stale_temps(path, older_than_s):
        try:
            os.unlink(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


def name_max(folder: Path) -> int:
    """The longest file name (bytes) ``folder``'s file system allows; 255 where it cannot be asked."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def check_name(path: Path) -> None:
    """ENAMETOOLONG before anything is written: a temp name is cut short (``temp_prefix``), so
    only the final rename would fail, after the other files of a group were renamed."""
    if len(path.name.encode()) > name_max(path.parent):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path.name)


def why(exc: OSError) -> str:
    """An OSError in words a user can act on."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "no space left on the device (free some and run again)"
    if exc.errno == errno.ENAMETOOLONG:
        return "the file name is too long for the file system (choose a shorter name, id or token)"
    return exc.strerror or str(exc)


def _failed(path: Path, exc: OSError, what: str | None = None) -> WriteFailed:
    return WriteFailed(f"Could not write {path.name[:120]}: {why(exc)}; {what or 'the file on disk'} was left as it was.")


def _save_file(tensors: dict[str, Tensor], tmp: Path, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file``, its I/O failures raised as the OSError they are (safetensors
    wraps them in its own error type, "... (os error 28)")."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except Exception as exc:
        code = re.search(r"os error (\d+)", str(exc)) if not isinstance(exc, OSError) else None
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None


def _write_temp(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str],
                check: Callable[[Path], None] | None, seal: Callable[[Path], None] | None = None) -> Path:
    """The file's content, written, sealed (``seal(tmp)`` may rewrite bytes in place, e.g. fill
    in a digest), fsynced and checked under a temp name in its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp)
    try:
        _save_file(tensors, tmp, metadata)
        if seal is not None:
            seal(tmp)
        os.chmod(tmp, user_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _remove(tmp: Path) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


def save_many_atomic(files: list[tuple[dict[str, Tensor], str | os.PathLike, dict[str, str]]],
                     what: str | None = None) -> None:
    """Write every (tensors, path, metadata) to a temp file, then rename them all into place: a
    failure while writing leaves every target as it was and no temp file behind."""
    temps: list[tuple[Path, Path]] = []
    path = Path(files[0][1]) if files else Path(".")
    try:
        for _, target, _ in files:
            path = Path(target)
            check_name(path)
        for tensors, target, metadata in files:
            path = Path(target)
            temps.append((_write_temp(tensors, path, metadata, None), path))
        for tmp, target in temps:
            path = target
            os.replace(tmp, target)
        for folder in {target.parent for _, target in temps}:
            fsync_dir(folder)
    except OSError as exc:
        raise _failed(path, exc, what) from None
    finally:
        for tmp, _ in temps:
            if tmp.exists():
                _remove(tmp)


def save_safetensors_atomic(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str],
                            check: Callable[[Path], None] | None = None, what: str | None = None,
                            seal: Callable[[Path], None] | None = None) -> None:
    """Write to a temp file in the same folder, ``seal`` it (see ``_write_temp``), fsync it,
    ``check`` it (raising keeps the old file), then rename over ``path``. ``what`` names the file
    in the error (default: "the file on disk")."""
    path = Path(path)
    try:
        check_name(path)
        tmp = _write_temp(tensors, path, metadata, check, seal)
        try:
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                _remove(tmp)
        fsync_dir(path.parent)
    except OSError as exc:
        raise _failed(path, exc, what) from None
