"""No lost concept: one writer per bank at a time, and nothing discarded when a bank changed.

Every process that changes a bank (train, remove, lease, merge; CLI, ComfyUI, the tab) does it
inside :class:`BankSession`:

1. it takes an advisory lock on ``.<bank name>.lock`` beside the bank (``flock`` on POSIX,
   ``msvcrt.locking`` on Windows; the OS releases it when the process dies, so there are no
   stale locks; temp files a writer killed mid-save left of this bank are removed then). A second
   writer waits (``wait=True``, the CLI's ``--wait``) or is refused with
   one sentence naming the holder (:class:`BankBusy`). On POSIX the holder removes the lock file
   as it releases it (no empty ``.lock`` file is left beside a bank): it unlinks the file while
   still holding the lock, and a writer that then gets the lock of that unlinked file sees that
   the path no longer names the file it locked and locks the file now there instead, so two
   writers never hold "the" lock at once. (On Windows an open file cannot be unlinked; the empty
   file stays, and a ``.lock`` file is never listed as a bank.)
2. it reads the bank under the lock and remembers the file's identity (device, inode, size,
   modification time);
3. ``commit`` checks, still under the lock, that the file on disk is the one it read; if not (a
   writer that does not lock: an old version, a sync tool, a copy by hand) it re-reads the disk and
   saves only when it still holds the same concepts (ids and content hashes) and outstanding
   leases, so a concept added or removed meanwhile is neither dropped nor brought back; it also
   refuses to write a bank that lacks a concept it read, unless the operation removes that one
   on purpose. Otherwise the result is written beside the bank as
   ``<stem>.pending-<time>-<hex>.safetensors`` and :class:`PendingWrite` says how to merge it:
   the trained concept is never discarded.

The lock is advisory: it protects SeqLoRA writers from each other, on a local disk. Network file
systems may not honour it; the identity check in ``commit`` still catches their changes.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from ..errors import BankError, SeqLoRAError
from .atomic import remove_stale_temps, why
from .provenance import now_iso


class BankBusy(SeqLoRAError):
    """Another process holds the bank's lock."""


class PendingWrite(SeqLoRAError):
    """The bank changed under us; the result went to a pending file instead."""

    def __init__(self, message: str, pending: Path):
        super().__init__(message)
        self.pending = pending


def lock_path_for(bank: Path) -> Path:
    return bank.with_name(f".{bank.name}.lock")


def file_identity(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (BlockingIOError, PermissionError):
        return False


def _still_named(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``: a holder that released the lock
    unlinked it, and its lock then guards nothing (the next writer creates a new file there).
    Always True on Windows, where lock files are never unlinked."""
    if os.name == "nt":
        return True
    try:
        on_path = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_path.st_dev, on_path.st_ino)


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text() or "{}")
        return f"{info.get('purpose') or 'a change'} by process {info.get('pid')} since {info.get('since')}"
    except (OSError, ValueError, AttributeError):
        return "another process"


class BankLock:
    """The advisory lock of one bank file (a context manager)."""

    def __init__(self, bank: str | os.PathLike, wait: bool = False, purpose: str = "",
                 poll_s: float = 0.2, timeout_s: float | None = None):
        self.bank = Path(bank)
        self.path = lock_path_for(self.bank)
        self.wait, self.purpose, self.poll_s, self.timeout_s = wait, purpose, poll_s, timeout_s
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, then remove what a writer killed mid-save left of this bank (its stale
        temp files: no other SeqLoRA writer of the bank can be running while we hold the lock).
        A place where the lock file cannot be created (a full disk, a read-only or absent folder)
        is one BankError sentence."""
        start = time.monotonic()
        while True:
            fd = self._open()
            if _try_lock(fd):
                if _still_named(fd, self.path):
                    break
                os.close(fd)  # the last holder removed that file as it released it: lock the one there now
                continue
            os.close(fd)
            timed_out = self.timeout_s is not None and time.monotonic() - start > self.timeout_s
            if not self.wait or timed_out:
                raise BankBusy(f"{self.bank.name} is in use ({_holder(self.path)}); try again when it is "
                               "done, or pass --wait to wait for it.")
            time.sleep(self.poll_s)
        self._fd = fd
        self._write_holder()
        remove_stale_temps(self.bank)

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise BankError(f"Cannot use {self.bank} as a bank: no lock file can be created beside it "
                            f"({why(exc)}); the bank was left as it was.") from None

    def _write_holder(self) -> None:
        """Who holds the lock, for a refused second writer's message; best effort: a full disk
        must not stop a writer that already holds the lock (its saves say so themselves)."""
        info = json.dumps({"pid": os.getpid(), "purpose": self.purpose, "since": now_iso()}).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.write(self._fd, info)
        except OSError:
            pass

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.name == "nt":
                os.ftruncate(self._fd, 0)
            else:
                os.unlink(self.path)  # still under the lock: see _still_named
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases flock / msvcrt locks
        self._fd = None

    def __enter__(self) -> "BankLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class BankSession:
    """Locked read-modify-write of one bank: ``with BankSession(path) as s: ... s.commit(new)``.

    ``s.bank`` is the bank read under the lock (None when the file does not exist yet).
    """

    def __init__(self, path: str | os.PathLike, wait: bool = False, purpose: str = "",
                 timeout_s: float | None = None):
        self.path = Path(path)
        self.lock = BankLock(self.path, wait, purpose, timeout_s=timeout_s)
        self.identity = None
        self.bank = None

    def __enter__(self) -> "BankSession":
        from .format import load_bank

        self.lock.acquire()
        try:
            self.identity = file_identity(self.path)
            self.bank = load_bank(self.path) if self.identity is not None else None
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def commit(self, new_bank, removed: set[str] = frozenset(), what: str = "the result") -> Path:
        """Save ``new_bank`` over the bank, or beside it as a pending file when the bank on disk
        is no longer the one this session read (see the module docstring), or when ``new_bank``
        lacks one of its concepts other than ``removed`` (ids this operation drops on purpose)."""
        ours = {c.id for c in new_bank.concepts}
        lost = {c.id for c in (self.bank.concepts if self.bank else []) if c.id not in removed} - ours
        if not lost and (file_identity(self.path) == self.identity or self._disk_unchanged()):
            new_bank.save(self.path)
            self.identity = file_identity(self.path)
            return self.path
        self.write_pending(new_bank, what)

    def write_pending(self, new_bank, what: str = "the result"):
        """Save ``new_bank`` beside the bank and raise :class:`PendingWrite` saying how to merge it."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        pending = self.path.with_name(f"{self.path.stem}.pending-{stamp}-{secrets.token_hex(3)}{self.path.suffix}")
        new_bank.save(pending)
        raise PendingWrite(
            f"{self.path.name} changed on disk while this ran, so it was left as it is and {what} was "
            f"saved to {pending}; bring it in with: python -m seqlora_core bank merge --out {self.path} "
            f"{self.path} {pending} --rebase", pending)

    def _disk_unchanged(self) -> bool:
        """The file was rewritten (new identity) but holds what this session read: same concepts
        (ids and content hashes) and the same outstanding leases."""
        from .format import load_bank
        from ..errors import BankError

        if file_identity(self.path) is None:
            return self.bank is None
        if self.bank is None:
            return False
        try:
            disk = load_bank(self.path)
        except BankError:
            return False

        def content(bank):
            return ({(c.id, c.hash) for c in bank.concepts}, {l.id for l in bank.active_leases})

        return content(disk) == content(self.bank)
