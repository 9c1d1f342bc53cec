"""Where a concept came from: its content hash, its author, and the bank's history of changes.

When banks travel between artists, ids are not enough to tell two concepts apart (two people can
both train ``<dog>``) nor to tell that a concept arrived unchanged. So every concept carries

* ``hash``: sha256 over what determines its effect — rank, method, init word, training settings,
  and the bytes of every A, B (float32, little-endian, layers in sorted order) and the token
  embedding. Its id, token, time, author, lease and activation statistics are *not* hashed, so a
  renamed concept keeps its hash and a rebased one gets a new one;
* ``author``: ``--author`` on the command line, else the ``SEQLORA_AUTHOR`` environment
  variable, else none.

The bank keeps a history: one entry per append, remove, lease, return, rebase, rename and merge,
each ``{"time", "action", "concepts": [{"id", "hash"}], ...}`` (plus ``lease``, ``author``,
``note`` where they apply). Merges take the union of their inputs' histories.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from datetime import datetime, timezone

import numpy as np
import torch
from torch import Tensor

AUTHOR_ENV = "SEQLORA_AUTHOR"
_LITTLE = np.dtype(np.float32).byteorder == "=" and np.little_endian
ACTIONS = ("append", "remove", "lease", "return", "rebase", "rename", "merge")


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def author_or_env(explicit: str | None = None) -> str | None:
    """The author recorded with new concepts and history entries."""
    name = explicit if explicit is not None else os.environ.get(AUTHOR_ENV)
    name = (name or "").strip()
    return name[:200] or None


def _tensor_bytes(t: Tensor) -> np.ndarray:
    """The float32 little-endian values, as a buffer ``hashlib`` reads in place: no copy for a
    float32 CPU tensor (a bank just read holds only those), one conversion otherwise."""
    t = t.detach()
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        t = t.to("cpu", torch.float32).contiguous()
    arr = t.numpy()
    return arr if _LITTLE else np.ascontiguousarray(arr.astype("<f4"))


def _shape_bytes(shape) -> bytes:
    return struct.pack(f"<{len(shape)}q", *shape)  # int64 little-endian, as np.asarray(shape, "<i8")


def content_hash(rank: int, method: str, init_word: str, settings: dict,
                 A: dict[str, Tensor], B: dict[str, Tensor], embedding: Tensor) -> str:
    """sha256 hex digest of a concept's effect (see the module docstring)."""
    digest = hashlib.sha256()
    header = {"rank": rank, "method": method, "init_word": init_word, "settings": settings}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name in sorted(A):
        digest.update(name.encode())
        digest.update(_shape_bytes(A[name].shape))
        digest.update(_tensor_bytes(A[name]))
        digest.update(_shape_bytes(B[name].shape))
        digest.update(_tensor_bytes(B[name]))
    digest.update(_shape_bytes(embedding.shape))
    digest.update(_tensor_bytes(embedding))
    return digest.hexdigest()


def bank_digest(data_sha256, meta: dict[str, str]) -> str:
    """A bank file's digest (metadata ``data_sha256``): the sha256 of its data region (every
    tensor's bytes as stored, ``data_sha256`` a hashlib object over them) continued over its
    ``concepts`` metadata value (ids, settings, recorded hashes). One hash over bytes in file
    order, so a reader computes it in one pass, where the content hashes interleave each layer's
    name and shape with its bytes (30,000 small updates for a 192-concept bank)."""
    digest = data_sha256.copy()
    digest.update(meta.get("concepts", "").encode("utf-8"))
    return digest.hexdigest()


def history_entry(action: str, concepts: list[tuple[str, str]] = (), author: str | None = None,
                  **extra) -> dict:
    """One history record; ``concepts`` as (id, hash) pairs."""
    entry = {"time": now_iso(), "action": action,
             "concepts": [{"id": i, "hash": h} for i, h in concepts]}
    if author:
        entry["author"] = author
    entry.update({k: v for k, v in extra.items() if v is not None})
    return entry


def valid_history(value) -> bool:
    """Whether a loaded ``history`` value has the documented shape (lists of small dicts)."""
    if not isinstance(value, list):
        return False
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("time"), str) \
                or entry.get("action") not in ACTIONS or not isinstance(entry.get("concepts"), list):
            return False
        for c in entry["concepts"]:
            if not isinstance(c, dict) or not isinstance(c.get("id"), str) or not isinstance(c.get("hash"), str):
                return False
    return True


def merged_history(histories: list[list[dict]]) -> list[dict]:
    """Union of several banks' histories, each entry once, in time order (ties by content), so
    that merging in any order gives the same history."""
    seen: dict[str, dict] = {}
    for history in histories:
        for entry in history:
            seen.setdefault(json.dumps(entry, sort_keys=True), entry)
    return [seen[k] for k in sorted(seen, key=lambda k: (seen[k]["time"], k))]
