"""A safetensors file in one pass: its header, every tensor, and which tensors hold non-finite values.

Why not ``safetensors.safe_open(...).get_tensor`` per key (what bank loading did before issue 22
item 7): a 192-concept bank holds 30,720 tensors, and the per-tensor calls, copies and checks made
its first load take 1.2 s idle and 7.9 s on a busy machine. Here the file is read once, front to
back: the 8-byte header length, the JSON header, then the whole data region with one ``readinto``
into one buffer of our own (:func:`_buffer`: on Linux its pages are provided in one call). A
background thread (:class:`_DataRead`) makes that buffer, reads into it and, when asked, hashes
it (sha256, ``hash_data``) while this thread checks the header's entries, makes the views and
the bank reader checks the bank: all three release the GIL. Every tensor is a view of that
buffer (one numpy call per tensor, no copy), and the finiteness check runs over each run of
same-dtype tensors in one vectorised float64 sum; only a run whose sum is not finite is looked at
tensor by tensor, to name the culprits. A bank written by ``Bank.save`` records the data
region's digest, so its content hashes need not be computed again (``reader.check_hashes``).

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

import ctypes
import hashlib
import json
import math
import mmap
import os
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

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
DIGEST_PLACEHOLDER = "0" * 64  # a sha256 hex digest's length, filled in by :func:`fill_digest`


def _header_bytes(f, size: int) -> bytes:
    """The JSON header's bytes, from an open file at offset 0."""
    head = f.read(8)
    if len(head) != 8:
        raise ValueError("no header length")
    n = int.from_bytes(head, "little")
    if n < 2 or n > MAX_HEADER or 8 + n > size:
        raise ValueError("bad header length")
    raw = f.read(n)
    if len(raw) != n:
        raise ValueError("file is shorter than its header says")
    return raw


def _parse_header(raw: bytes) -> tuple[dict, dict]:
    """(metadata, tensor entries) of a header; its entries are checked by :func:`_check_entries`."""
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("metadata is not a map of strings")
    return meta, header


def _check_entries(entries: dict, data_len: int) -> list[tuple[int, int, str, str]]:
    """(begin, end, key, dtype) of every entry, in file order; ValueError unless every entry has a
    known dtype, a shape whose size matches its offsets, and the tensors tile the data region."""
    spans = []
    prod = math.prod
    try:
        for key, entry in entries.items():  # tight: a 192-concept bank has 30,720 entries
            dtype = entry["dtype"]
            shape, (begin, end) = entry["shape"], entry["data_offsets"]
            if type(shape) is not list or type(begin) is not int or type(end) is not int \
                    or not all(type(n) is int and n >= 0 for n in shape):
                raise ValueError("bad shape or offsets")
            if begin < 0 or end - begin != prod(shape) * DTYPES[dtype][1]:
                raise ValueError("size does not match shape")
            spans.append((begin, end, key, dtype))
    except (KeyError, TypeError, AttributeError):  # a missing field, a non-dict entry, an unknown dtype
        raise ValueError("bad tensor entry") from None
    spans.sort()
    at = 0
    for begin, end, _, _ in spans:  # the tensors tile the data region: no gap, no overlap, nothing after
        if begin != at:
            raise ValueError("offsets do not tile the data")
        at = end
    if at != data_len:
        raise ValueError("data region has the wrong length")
    return spans


def read_header(f, size: int) -> tuple[dict, dict, int]:
    """(metadata, tensor entries, data length) from an open file at offset 0; ValueError if malformed."""
    raw = _header_bytes(f, size)
    meta, entries = _parse_header(raw)
    data_len = size - 8 - len(raw)
    _check_entries(entries, data_len)
    return meta, entries, data_len


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
    our own, not a map of the file, so nothing of the file stays open or mapped. Made through
    ctypes (:func:`_populated`), which releases the GIL for the 0.15 s the kernel takes, where
    Python's ``mmap`` module holds it and so stalled the thread checking the header meanwhile."""
    if n >= 1 << 20 and getattr(mmap, "MAP_POPULATE", 0) and os.name == "posix":
        try:
            return _populated(n)
        except (OSError, ValueError, OverflowError, AttributeError):
            pass
    return np.empty(n, dtype=np.uint8)


_LIBC = None


def _populated(n: int) -> np.ndarray:
    """An anonymous MAP_POPULATE mapping of ``n`` bytes as a numpy array; unmapped when the last
    array, tensor or view of it is gone (a finalizer on the ctypes object that every view holds)."""
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _LIBC = libc
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    addr = _LIBC.mmap(None, n, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), "mmap failed")
    memory = (ctypes.c_uint8 * n).from_address(addr)
    weakref.finalize(memory, _LIBC.munmap, addr, n)
    return np.frombuffer(memory, dtype=np.uint8)


class _DataRead(threading.Thread):
    """The data region read in the background: fresh memory, ``readinto``, the finiteness sums of
    the runs of floating-point tensors (:meth:`check`) and, with ``hash_data``, the sha256. Each
    releases the GIL, so on a machine with two cores they overlap the header checks and the
    views (the calling thread), and the hash overlaps the bank reader's checks of what was read.
    ``allocated``, ``read`` and ``checked`` are set as each stage ends (or fails: :meth:`wait`
    then raises what the thread raised)."""

    def __init__(self, f, data_len: int, hash_data: bool):
        super().__init__(name="seqlora-bank-read", daemon=True)
        self.f, self.data_len, self.hash_data = f, data_len, hash_data
        self.allocated, self.read, self.checked = threading.Event(), threading.Event(), threading.Event()
        self._runs_given = threading.Event()
        self.abandoned = False
        self.runs: list[tuple[str, int, int, list[str]]] = []  # (dtype, begin, end, keys), from :meth:`check`
        self.suspect: list[tuple[str, int, int, list[str]]] = []  # runs whose sum is not finite
        self.data: np.ndarray | None = None
        self.digest = None  # hashlib sha256 of the data region, once hashed
        self.error: BaseException | None = None

    def check(self, runs: list[tuple[str, int, int, list[str]]] | None) -> None:
        """Hand over the runs whose finiteness to sum once the data is read; called exactly once,
        or the thread waits. None: the caller gave up (a refused header), so nothing is summed or
        hashed."""
        self.abandoned = runs is None
        self.runs = runs or []
        self._runs_given.set()

    def run(self) -> None:
        try:
            self.data = _buffer(self.data_len)
            self.allocated.set()
            view, got = memoryview(self.data), 0
            while got < self.data_len:  # readinto may return short reads on some platforms
                more = self.f.readinto(view[got:])
                if not more:
                    raise ValueError("file is shorter than its header says")
                got += more
        except BaseException as exc:  # handed to the waiting reader
            self.error = exc
        finally:
            self.f.close()  # before anything else: nothing of the file stays open
            self.allocated.set()
            self.read.set()
        try:
            if self.error is None:
                self._runs_given.wait()
                whole = torch.from_numpy(self.data)
                for run in self.runs:
                    dtype, begin, end, _ = run
                    tdtype, itemsize, ndtype = DTYPES[dtype]
                    if begin % itemsize:
                        self.suspect.append(run)  # misaligned: checked tensor by tensor
                        continue
                    span = self.data[begin:end].view(ndtype) if ndtype is not None else whole[begin:end].view(tdtype)
                    if not _sum_finite(span):
                        self.suspect.append(run)
        except BaseException as exc:
            self.error = exc
        finally:
            self.checked.set()
        if self.hash_data and self.error is None and not self.abandoned:
            try:
                self.digest = hashlib.sha256(memoryview(self.data))
            except Exception:  # noqa: BLE001 - no digest then: the caller checks without it
                self.digest = None

    def wait(self, stage: threading.Event) -> None:
        stage.wait()
        if self.error is not None:
            raise self.error

    def data_sha256(self):
        """A copy of the data region's sha256 (joins the thread); None when it could not be made."""
        self.join()
        return None if self.digest is None else self.digest.copy()


def _float_runs(order: list[tuple[int, int, str, str]]) -> list[tuple[str, int, int, list[str]]]:
    """(dtype, begin, end, keys) of each run of neighbouring floating-point tensors of one dtype,
    aligned to it (a misaligned tensor is a run of its own), in file order."""
    runs: list[list] = []
    for begin, end, key, dtype in order:
        if dtype not in FLOATS:
            continue
        last = runs[-1] if runs else None
        if last is not None and last[0] == dtype and last[2] == begin and begin % DTYPES[dtype][1] == 0:
            last[2] = end
            last[3].append(key)
        else:
            runs.append([dtype, begin, end, [key]])
    return [tuple(run) for run in runs]


@dataclass
class TensorFile:
    """A safetensors file as read by :func:`read_tensor_file`."""
    meta: dict[str, str]
    tensors: dict[str, Tensor]  # CPU views of one buffer
    nonfinite: set[str]  # keys of the floating-point tensors holding NaN or ±inf
    _read: _DataRead

    def data_sha256(self):
        """hashlib sha256 of the data region (every tensor's bytes as stored), which
        ``read_tensor_file(..., hash_data=True)`` computed in the background; waits for it. None
        when hashing failed (the caller then checks what the digest would have vouched for)."""
        if not self._read.hash_data:
            raise ValueError("the file was read without hash_data")
        return self._read.data_sha256()


def read_tensor_file(path: str | os.PathLike, check_meta=None, hash_data: bool = False) -> TensorFile:
    """The metadata, the tensors and which of them are not finite, of a safetensors file read in
    one pass (module docstring). ``check_meta(metadata)`` runs after the header and before any
    tensor is read (a bank reader refuses a multi-GB checkpoint there). ``hash_data``: also
    sha256 the data region, in the background (:meth:`TensorFile.data_sha256`). The file is
    closed once read; the tensors are CPU views of one buffer. ValueError/OSError for a file that
    is not readable."""
    size = os.path.getsize(path)
    f = open(path, "rb", buffering=0)
    try:
        raw = _header_bytes(f, size)
        meta, entries = _parse_header(raw)
        if check_meta is not None:
            check_meta(meta)
    except BaseException:
        f.close()
        raise
    data_len = size - 8 - len(raw)
    reader = _DataRead(f, data_len, hash_data)  # closes f
    reader.start()
    runs = None
    try:  # while the data is read
        order = _check_entries(entries, data_len)
        runs = _float_runs(order)
    finally:
        reader.check(runs)
    reader.wait(reader.allocated)
    data = reader.data
    whole = torch.from_numpy(data)
    tensors: dict[str, Tensor] = {}
    array, from_numpy = np.ndarray, torch.from_numpy
    for begin, end, key, dtype in order:  # views of memory still being read: nothing reads them before `read`
        tdtype, itemsize, ndtype = DTYPES[dtype]
        shape = entries[key]["shape"]
        if begin % itemsize:  # misaligned (a foreign writer): a copy of its own, once the bytes are there
            reader.wait(reader.read)
            tensors[key] = whole[begin:end].clone().view(tdtype).view(shape)
        elif ndtype is not None:  # one numpy call per tensor: 30,720 of them in a 192-concept bank
            tensors[key] = from_numpy(array(shape, ndtype, data, begin))
        else:
            tensors[key] = whole[begin:end].view(tdtype).view(shape)
    reader.wait(reader.checked)
    nonfinite = {k for _, _, _, keys in reader.suspect for k in keys if not _finite_tensor(tensors[k])}
    return TensorFile(meta, tensors, nonfinite, reader)


def fill_digest(path: str | os.PathLike, key: str, digest: Callable[[object, dict], str]) -> bool:
    """Write ``digest(sha256 of the data region, metadata)`` into the metadata value ``key``, which
    the file was written with as :data:`DIGEST_PLACEHOLDER` (the same length, so the header and
    every offset stay as they are). Why after writing: a digest of the bytes as stored needs
    them stored, and safetensors (which lays them out) cannot be handed a value computed later.
    False, and the file left as it is, when there is not exactly one such placeholder (a reader
    then finds no matching digest and checks everything, as for a file without one)."""
    size = os.path.getsize(path)
    with open(path, "r+b", buffering=0) as f:
        raw = _header_bytes(f, size)
        meta, _ = _parse_header(raw)
        hashed = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 24), b""):
            hashed.update(block)
        value = digest(hashed, meta)
        pattern = re.compile(rb'("%s"\s*:\s*")%s"' % (re.escape(key.encode()), DIGEST_PLACEHOLDER.encode()))
        found = list(pattern.finditer(raw))
        if len(found) != 1 or len(value) != len(DIGEST_PLACEHOLDER) or not value.isascii():
            return False
        f.seek(8 + found[0].end(1))
        f.write(value.encode("ascii"))
    return True


def _finite_tensor(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all()) if t.numel() else True
