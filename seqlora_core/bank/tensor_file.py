"""A safetensors file in one pass: its header, every tensor, and which tensors hold non-finite values.

Why not ``safetensors.safe_open(...).get_tensor`` per key (what bank loading did before issue 22
item 7): a 192-concept bank holds 30,720 tensors, and the per-tensor calls, copies and checks made
its first load take 1.2 s idle and 7.9 s on a busy machine. Here the file is read once, front to
back: the 8-byte header length, the JSON header, then the whole data region with one ``readinto``
into one buffer of our own (:func:`_buffer`: on Linux its pages are provided in one call). Every tensor is a view of that buffer (no copy per tensor), and the
finiteness check runs over each run of same-dtype tensors in one vectorised float64 sum; only a
run whose sum is not finite is looked at tensor by tensor, to name the culprits. The content hash
(``provenance.content_hash``) then reads the same memory, without copying it.

Why read into our own buffer rather than keep a memory map of the file: a tensor backed by a
mapping keeps the file mapped for as long as the Bank lives, and on Windows (ComfyUI's and A1111's
most common home) a mapped file cannot be replaced, so the atomic rename of a later save of the
same bank would fail. A map copied out would cost a second pass over the bytes; reading into one
buffer costs the same single pass as faulting the map in, and the file is closed before
:func:`read_tensor_file` returns. The views keep that buffer alive (one allocation the size of the
file's data) for as long as any of the bank's tensors does.

The header is validated the way safetensors validates it (known dtypes, sizes that match shapes,
offsets that tile the data region exactly, string metadata); any defect raises ``ValueError`` and
the bank reader turns it into one sentence.
"""
from __future__ import annotations

import json
import math
import mmap
import os

import numpy as np
import torch
from torch import Tensor

# safetensors dtype → (torch dtype, bytes per element, numpy dtype or None when numpy has none)
DTYPES = {
    "F64": (torch.float64, 8, np.float64), "F32": (torch.float32, 4, np.float32),
    "F16": (torch.float16, 2, np.float16), "BF16": (torch.bfloat16, 2, None),
    "I64": (torch.int64, 8, np.int64), "I32": (torch.int32, 4, np.int32),
    "I16": (torch.int16, 2, np.int16), "I8": (torch.int8, 1, np.int8),
    "U8": (torch.uint8, 1, np.uint8), "BOOL": (torch.bool, 1, np.bool_),
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = (getattr(torch, _attr), 1, None)
FLOATS = {"F64", "F32", "F16", "BF16"}  # the dtypes a bank may hold; the reader refuses others by name
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def read_header(f, size: int) -> tuple[dict, dict, int]:
    """(metadata, tensor entries, data length) from an open file at offset 0; ValueError if malformed."""
    head = f.read(8)
    if len(head) != 8:
        raise ValueError("no header length")
    n = int.from_bytes(head, "little")
    if n < 2 or n > MAX_HEADER or 8 + n > size:
        raise ValueError("bad header length")
    header = json.loads(f.read(n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("metadata is not a map of strings")
    data_len = size - 8 - n
    spans = []
    try:
        for entry in header.values():  # tight: a 192-concept bank has 30,720 entries
            itemsize = DTYPES[entry["dtype"]][1]
            shape, (begin, end) = entry["shape"], entry["data_offsets"]
            if type(shape) is not list or type(begin) is not int or type(end) is not int \
                    or not set(map(type, shape)) <= {int} or (shape and min(shape) < 0):
                raise ValueError("bad shape or offsets")
            if begin < 0 or end - begin != math.prod(shape) * itemsize:
                raise ValueError("size does not match shape")
            spans.append((begin, end))
    except (KeyError, TypeError, AttributeError):  # a missing field, a non-dict entry, an unknown dtype
        raise ValueError("bad tensor entry") from None
    spans.sort()
    at = 0
    for begin, end in spans:  # the tensors tile the data region: no gap, no overlap, nothing after
        if begin != at:
            raise ValueError("offsets do not tile the data")
        at = end
    if at != data_len:
        raise ValueError("data region has the wrong length")
    return meta, header, data_len


def _sum_finite(span) -> bool:
    """Whether a float64 sum of ``span`` (a numpy array or a tensor) is finite: true whenever every
    value is (16- and 32-bit floats cannot overflow it), false whenever one is NaN or ±inf. A
    float64 run whose sum overflows is then checked value by value."""
    if isinstance(span, np.ndarray):
        with np.errstate(over="ignore", invalid="ignore"):
            return math.isfinite(float(np.add.reduce(span, dtype=np.float64, axis=None)))
    return math.isfinite(float(span.sum(dtype=torch.float64)))


def _buffer(n: int) -> np.ndarray:
    """``n`` bytes of fresh memory to read the data region into. On Linux an anonymous mapping with
    MAP_POPULATE: the kernel provides all its pages in one call, where first touching a plain
    ``np.empty`` page by page cost 96,000 page faults for a 375 MiB bank (6 – 8 s against 1.1 –
    1.7 s on a busy 2-core machine, the whole difference in this module's time). It is memory of
    our own, not a map of the file, so nothing of the file stays open or mapped."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if n >= 1 << 20 and populate and os.name == "posix":
        try:
            flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0) | populate
            return np.frombuffer(mmap.mmap(-1, n, flags=flags), dtype=np.uint8)
        except (OSError, ValueError, OverflowError):
            pass
    return np.empty(n, dtype=np.uint8)


def read_tensor_file(path: str | os.PathLike, check_meta=None) -> tuple[dict, dict[str, Tensor], set[str]]:
    """(metadata, {key: tensor}, keys of the floating-point tensors holding NaN or ±inf) of a
    safetensors file, read in one pass (module docstring). ``check_meta(metadata)`` runs after the
    header and before any tensor is read (a bank reader refuses a multi-GB checkpoint there). The
    file is closed on return; the tensors are CPU views of one buffer. ValueError/OSError for a
    file that is not readable."""
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as f:
        meta, entries, data_len = read_header(f, size)
        if check_meta is not None:
            check_meta(meta)
        data = _buffer(data_len)
        got = f.readinto(memoryview(data)) if data_len else 0
        while got < data_len:  # readinto may return short reads on some platforms
            more = f.readinto(memoryview(data)[got:])
            if not more:
                raise ValueError("file is shorter than its header says")
            got += more
    whole = torch.from_numpy(data)
    tensors: dict[str, Tensor] = {}
    runs: list[list] = []  # [dtype, begin, end, keys]: neighbours of the same dtype
    for key, entry in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = entry["dtype"]
        tdtype, size_, ndtype = DTYPES[dtype]
        begin, end = entry["data_offsets"]
        shape = entry["shape"]
        if ndtype is not None and begin % size_ == 0:
            t = torch.from_numpy(data[begin:end].view(ndtype).reshape(shape))
        elif begin % size_ == 0:
            t = whole[begin:end].view(tdtype).view(shape)
        else:  # misaligned (a foreign writer): a copy of its own
            t = whole[begin:end].clone().view(tdtype).view(shape)
        tensors[key] = t
        if dtype in FLOATS:
            last = runs[-1] if runs else None
            if last is not None and last[0] == dtype and last[2] == begin and begin % size_ == 0:
                last[2] = end
                last[3].append(key)
            else:
                runs.append([dtype, begin, end, [key]])
    nonfinite: set[str] = set()
    for dtype, begin, end, keys in runs:
        tdtype, size_, ndtype = DTYPES[dtype]
        if begin % size_ == 0:
            span = data[begin:end].view(ndtype) if ndtype is not None else whole[begin:end].view(tdtype)
            if _sum_finite(span):
                continue
        nonfinite.update(k for k in keys if not _finite_tensor(tensors[k]))
    return meta, tensors, nonfinite


def _finite_tensor(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all()) if t.numel() else True
