"""What a bank file on disk holds right now, read cheaply, for hosts that keep banks in memory.

A host such as ComfyUI caches a loaded bank and may save a bank built from it much later, after
someone else (another queue run, another artist, the command line) has added concepts to the same
file. This module tells a host that the file changed; ``bank.lock`` makes sure a save never drops
a concept that the file holds (the result goes to a pending file instead):

* :func:`file_identity` changes whenever the file's bytes change (size, modification time and a
  content hash, the hash cached per (size, mtime) so repeated checks of an unchanged file cost one
  ``stat``; the cache keeps the 32 most recently checked files); a host's change check compares it to decide whether to load again.
* :func:`concepts_in_file` lists a file's concepts from its header alone (the concept picker).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

from safetensors import safe_open


# (path, inode, size, mtime_ns) → sha256, least recently used first. Bounded: a host polls the few
# banks its workflows use, but every rewrite of a bank makes a new key, so an unbounded cache grew
# by one entry per save for the life of the process.
_HASHES: "OrderedDict[tuple[str, int, int, int], str]" = OrderedDict()
_HASHES_SIZE = 32


def file_identity(path: str | os.PathLike) -> tuple[int, int, str] | None:
    """(size, mtime_ns, sha256) of the file, or None when there is no file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _HASHES:
        _HASHES.move_to_end(key)
    else:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
        while len(_HASHES) > _HASHES_SIZE:
            _HASHES.popitem(last=False)
    return st.st_size, st.st_mtime_ns, _HASHES[key]


def concepts_in_file(path: str | os.PathLike) -> list[dict]:
    """The concept entries (id, token, created, …) in a bank file's header; no tensor is read."""
    with safe_open(str(path), framework="pt") as f:
        entries = json.loads((f.metadata() or {}).get("concepts", "[]"))
    return [e for e in entries if isinstance(e, dict) and "id" in e]
