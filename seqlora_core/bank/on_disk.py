"""What a bank file on disk holds right now, read cheaply, for hosts that keep banks in memory.

A host such as ComfyUI caches a loaded bank and may save a bank built from it much later, after
someone else (another queue run, another artist, the command line) has added concepts to the same
file. Two guards, each a small function that a file lock can wrap:

* :func:`file_identity` changes whenever the file's bytes change (size, modification time and a
  content hash, the hash cached per (size, mtime) so repeated checks of an unchanged file cost one
  ``stat``); a host's change check compares it to decide whether to load again.
* :func:`refuse_dropping_concepts` refuses to replace a file with a bank that lacks a concept the
  file holds (same id and creation time), so overwriting never loses a concept silently.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import safe_open

from ..errors import BankError

_HASHES: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime_ns) → sha256


def file_identity(path: str | os.PathLike) -> tuple[int, int, str] | None:
    """(size, mtime_ns, sha256) of the file, or None when there is no file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return st.st_size, st.st_mtime_ns, _HASHES[key]


def concepts_in_file(path: str | os.PathLike) -> list[dict]:
    """The concept entries (id, token, created, …) in a bank file's header; no tensor is read."""
    with safe_open(str(path), framework="pt") as f:
        entries = json.loads((f.metadata() or {}).get("concepts", "[]"))
    return [e for e in entries if isinstance(e, dict) and "id" in e]


def refuse_dropping_concepts(path: str | os.PathLike, bank) -> None:
    """Raise BankError if replacing ``path`` by ``bank`` would lose a concept the file holds now."""
    if not os.path.exists(path):
        return
    try:
        on_disk = concepts_in_file(path)
    except Exception:  # noqa: BLE001 - not a readable bank: nothing of ours to lose by name
        raise BankError(f"{Path(path).name} exists but is not a readable bank; save under another name.") from None
    kept = {(c.id, c.created) for c in bank.concepts} | set(getattr(bank, "removed", ()))
    lost = [e for e in on_disk if (e["id"], e.get("created", "")) not in kept]
    if lost:
        tokens = ", ".join(e.get("token", e["id"]) for e in lost)
        raise BankError(f"{Path(path).name} now holds {tokens}, which this bank lacks (the file changed after it "
                        "was loaded); load it again and retrain, or save under another name.")
