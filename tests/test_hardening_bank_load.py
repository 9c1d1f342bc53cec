"""Bank loading in one pass (issue 22 item 7): ``bank.tensor_file`` reads what safetensors reads,
for every dtype a bank may hold, finds every non-finite tensor, and leaves no file open or mapped."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from seqlora_core.bank.format import Bank, Concept, load_bank
from seqlora_core.bank.tensor_file import read_tensor_file
from seqlora_core.errors import BankError


def _mixed() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 3, generator=gen), "f16": torch.randn(7, generator=gen).half(),
        "bf16": torch.randn(3, 3, generator=gen).bfloat16(), "f64": torch.randn(2, 2, generator=gen).double(),
        "i64": torch.arange(4), "u8": torch.arange(3, dtype=torch.uint8), "b": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5), "f16b": torch.randn(1, generator=gen).half(),
    }


def test_tensors_metadata_and_dtypes_match_safetensors(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file(_mixed(), str(path), metadata={"format": "x", "n": "1"})
    read = read_tensor_file(path)
    meta, tensors, nonfinite = read.meta, read.tensors, read.nonfinite
    expected = load_file(str(path))
    assert meta == {"format": "x", "n": "1"} and nonfinite == set() and tensors.keys() == expected.keys()
    for key, t in expected.items():
        assert tensors[key].dtype == t.dtype and tensors[key].shape == t.shape
        assert torch.equal(tensors[key], t), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_non_finite_tensor_is_named(tmp_path, dtype, bad):
    tensors = {f"t{i}": torch.randn(4, 3).to(dtype) for i in range(6)}
    tensors["t2"][1, 1] = bad
    tensors["t4"][0, 0] = bad
    tensors["other"] = torch.randn(3).half()  # another dtype's run stays clean
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    assert read_tensor_file(path).nonfinite == {"t2", "t4"}


def test_huge_finite_float64_values_are_finite(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"a": torch.full((4,), 1e308, dtype=torch.float64)}, str(path))  # the sum overflows
    assert read_tensor_file(path).nonfinite == set()


@pytest.mark.parametrize("cut", [0, 7, 8, 20, -1])
def test_truncated_files_are_refused(tmp_path, cut):
    path = tmp_path / "t.safetensors"
    save_file(_mixed(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises((ValueError, OSError)):
        read_tensor_file(path)


def _bank() -> Bank:
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(16, 16, generator=gen))[0]
    bank = Bank({"architecture": "sd15", "fingerprint": "x"})
    for i in range(3):
        bank.concepts.append(Concept(f"c{i}", f"<c{i}>", "thing", 2, "seqlora", {"unet.l": torch.randn(8, 2, generator=gen)},
                                     {"unet.l": q[:, 2 * i:2 * i + 2].contiguous()}, torch.randn(1, 12, generator=gen)))
    return bank


def test_loaded_bank_owns_its_memory_and_holds_no_file(tmp_path):
    """The tensors are copies in memory of our own, not a map of the file: a later save renames
    over the file (which Windows refuses while the file is mapped or open), and even a tool that
    rewrites the file in place cannot change (or, with a map, crash) a loaded bank."""
    path = tmp_path / "bank.safetensors"
    _bank().save(path)
    loaded = load_bank(path)
    before = {c.id: c.A["unet.l"].clone() for c in loaded.concepts}
    if sys.platform.startswith("linux"):
        open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                      if os.path.exists(f"/proc/self/fd/{fd}")}
        assert str(path.resolve()) not in open_files
        with open("/proc/self/maps") as maps:
            assert str(path.resolve()) not in maps.read()
    with open(path, "r+b") as f:  # in place: same inode, every byte after the header zeroed
        n = int.from_bytes(f.read(8), "little")
        size = path.stat().st_size
        f.seek(8 + n)
        f.write(b"\0" * (size - 8 - n))
    for c in loaded.concepts:
        assert torch.equal(c.A["unet.l"], before[c.id])
    loaded.without("c2").save(path)  # the rename over the file succeeds
    assert [c.id for c in load_bank(path).concepts] == ["c0", "c1"]


def test_half_precision_bank_loads_as_float32_and_keeps_its_hash(tmp_path):
    """A bank written by another tool in fp16 / bf16 is read as float32, and its recorded hash
    (over float32 values) still matches when the values survived the round trip."""
    for dtype in (torch.float16, torch.bfloat16):
        bank = _bank()
        for c in bank.concepts:  # A and the embedding stored in half precision: round them first
            c.A = {k: v.to(dtype).float() for k, v in c.A.items()}
            c.embedding = c.embedding.to(dtype).float()
            c.hash = c.content_hash()
        tensors = {k: (v.to(dtype) if ".A." in k or k.endswith("embedding") else v) for k, v in bank.tensors().items()}
        path = tmp_path / f"{dtype}.safetensors"
        save_file(tensors, str(path), metadata=bank.metadata())
        loaded = load_bank(path)
        assert all(c.A["unet.l"].dtype == torch.float32 for c in loaded.concepts)
        assert [c.hash for c in loaded.concepts] == [c.hash for c in bank.concepts]


def test_non_finite_values_in_a_half_precision_bank_are_refused(tmp_path):
    bank = _bank()
    tensors = {k: v.half() if ".A." in k else v for k, v in bank.tensors().items()}
    tensors["concept.c1.A.unet.l"][0, 0] = float("inf")
    meta = bank.metadata()
    meta["concepts"] = json.dumps([dict(c.meta(), hash=None) for c in bank.concepts])  # no hash to fail first
    path = tmp_path / "inf.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(BankError, match="'c1' layer unet.l holds non-finite"):
        load_bank(path)


def _data_region(path) -> bytes:
    blob = path.read_bytes()
    return blob[8 + int.from_bytes(blob[:8], "little"):]


def _count_content_hashes(monkeypatch) -> list:
    calls = []
    original = Concept.content_hash

    def counted(self):
        calls.append(self.id)
        return original(self)

    monkeypatch.setattr(Concept, "content_hash", counted)
    return calls


def test_a_saved_bank_records_its_digest_and_a_load_trusts_it(tmp_path, monkeypatch):
    """Bank.save fills in ``data_sha256`` (sha256 of the data region, then of the ``concepts``
    value) after its readback checked every content hash; a load whose one-pass digest matches
    computes no content hash, a save's readback always computes all of them."""
    import hashlib

    from seqlora_core.bank.provenance import bank_digest

    path = tmp_path / "bank.safetensors"
    bank = _bank()
    calls = _count_content_hashes(monkeypatch)
    bank.save(path)
    assert calls == ["c0", "c1", "c2"]  # the readback (check_readable) checked every hash
    meta = read_tensor_file(path).meta
    assert meta["data_sha256"] == bank_digest(hashlib.sha256(_data_region(path)), meta)
    assert len(meta["data_sha256"]) == 64 and meta["data_sha256"] != "0" * 64
    calls.clear()
    loaded = load_bank(path)
    assert calls == []
    assert [c.hash for c in loaded.concepts] == [c.hash for c in bank.concepts]


def _rewrite(path, edit_meta=None, edit_tensors=None) -> None:
    """The file written again by safetensors with its metadata and tensors edited (what another
    tool does): the recorded digest is copied unchanged."""
    read = read_tensor_file(path)
    meta, tensors = dict(read.meta), {k: v.clone() for k, v in read.tensors.items()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    path.unlink()
    save_file(tensors, str(path), metadata=meta)


def test_a_bank_changed_after_saving_is_checked_in_full(tmp_path, monkeypatch):
    """The digest only vouches for a file nothing has changed: a tensor or a concept's settings
    edited by another tool (the digest copied along) fall back to every content hash, which
    refuses the altered concept; a bank without a digest (saved before it existed) is checked in
    full and loads."""
    def flip(tensors):
        tensors["concept.c1.A.unet.l"][0, 0] += 1e-3

    def settings(meta):
        entries = json.loads(meta["concepts"])
        entries[2]["settings"] = {"steps": 1}
        meta["concepts"] = json.dumps(entries)

    for name, edit in (("c1", dict(edit_tensors=flip)), ("c2", dict(edit_meta=settings))):
        path = tmp_path / f"{name}.safetensors"
        _bank().save(path)
        _rewrite(path, **edit)
        with pytest.raises(BankError, match=f"concept '{name}' does not match its recorded content hash"):
            load_bank(path)
    path = tmp_path / "older.safetensors"
    _bank().save(path)
    _rewrite(path, edit_meta=lambda meta: meta.pop("data_sha256"))
    calls = _count_content_hashes(monkeypatch)
    assert [c.id for c in load_bank(path).concepts] == ["c0", "c1", "c2"]
    assert calls == ["c0", "c1", "c2"]


def test_the_orthogonality_probe_batches_layers_and_still_finds_one_overlap():
    """``probably_orthogonal_layers`` probes layers of the same shapes together, a few at a time:
    one overlapping pair in any layer of a batch (or in a layer of mixed block widths) fails it."""
    from seqlora_core.linalg.projector import probably_orthogonal, probably_orthogonal_layers

    gen = torch.Generator().manual_seed(3)

    def layer(widths, m=48):
        q = torch.linalg.qr(torch.randn(m, sum(widths), generator=gen))[0]
        bounds = torch.tensor((0,) + tuple(widths)).cumsum(0).tolist()
        return [q[:, a:b].contiguous() for a, b in zip(bounds, bounds[1:])]

    layers = [layer([2] * 6) for _ in range(40)] + [layer([1, 3, 2]) for _ in range(3)]
    assert probably_orthogonal_layers(layers, 1e-4, generator=gen)
    for index in (0, 25, 39, 41):
        bent = [list(bases) for bases in layers]
        bent[index][1] = bent[index][1] + 1e-2 * bent[index][0][:, :1]  # the second block leans on the first
        assert not probably_orthogonal_layers(bent, 1e-4, generator=gen)
        assert not probably_orthogonal(bent[index], 1e-4, generator=gen)
    assert probably_orthogonal_layers([[layers[0][0]], []], 1e-4)  # nothing to compare


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the populated mapping is made on Linux only")
def test_the_read_buffer_is_unmapped_once_no_tensor_uses_it(monkeypatch):
    """The data region's memory (one MAP_POPULATE mapping made through ctypes, so the GIL is free
    while the kernel fills it) lives exactly as long as a tensor viewing it."""
    import gc

    from seqlora_core.bank import tensor_file

    tensor_file._populated(1 << 20)  # loads libc
    unmapped = []

    class Recording:
        def __init__(self, libc):
            self.mmap, self._munmap = libc.mmap, libc.munmap

        def munmap(self, addr, n):
            unmapped.append(n)
            return self._munmap(addr, n)

    monkeypatch.setattr(tensor_file, "_LIBC", Recording(tensor_file._LIBC))
    data = tensor_file._buffer(3 << 20)
    data[:] = 7
    view = torch.from_numpy(data[100:200])
    del data
    gc.collect()
    assert unmapped == [] and int(view.sum()) == 700
    del view
    gc.collect()
    assert unmapped == [3 << 20]


def test_a_misaligned_tensor_is_read_and_checked_for_finiteness(tmp_path):
    """A foreign writer may place a float32 tensor at an offset that is no multiple of 4: it is
    read as a copy of its own, and its NaN is still found (the background sums skip it)."""
    import struct

    values = torch.tensor([1.0, float("nan"), 3.0])
    header = {"pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "x": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
              "y": {"dtype": "F32", "shape": [1], "data_offsets": [13, 17]}}
    text = json.dumps(header).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\x07" + values.numpy().tobytes()
                     + torch.tensor([2.0]).numpy().tobytes())
    read = read_tensor_file(path)
    assert read.nonfinite == {"x"}
    assert torch.equal(read.tensors["x"][[0, 2]], torch.tensor([1.0, 3.0])) and read.tensors["y"].item() == 2.0


def test_a_refused_header_leaves_no_reading_thread_behind(tmp_path):
    """The background read is told there is nothing to check when the header's entries are
    refused, so it ends instead of waiting for ever (holding the file's memory)."""
    import threading
    import time

    path = tmp_path / "gap.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.zeros(4)}, str(path))
    blob = bytearray(path.read_bytes())
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header["b"]["data_offsets"] = [20, 36]  # a gap: the offsets do not tile the data
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(blob[8 + n:]) + b"\0" * 20)
    with pytest.raises(ValueError, match="offsets do not tile"):
        read_tensor_file(path, hash_data=True)
    deadline = time.monotonic() + 10
    while any(t.name == "seqlora-bank-read" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "seqlora-bank-read" for t in threading.enumerate())


def test_a_save_never_vouches_for_a_hash_its_tensors_do_not_have(tmp_path, monkeypatch):
    """What makes trusting a matching digest sound: the save's readback computes every content
    hash, so a concept changed in memory after its hash was taken is never written with a digest
    that would vouch for it; and a save whose digest cannot be filled in still writes a bank that
    loads (checked in full)."""
    from seqlora_core.bank import tensor_file

    path = tmp_path / "bank.safetensors"
    bank = _bank()
    bank.concepts[1].A["unet.l"].add_(1.0)  # in place: the recorded hash is now stale
    with pytest.raises(BankError, match="concept 'c1' does not match its recorded content hash"):
        bank.save(path)
    assert not path.exists()
    monkeypatch.setattr(tensor_file, "DIGEST_PLACEHOLDER", "f" * 64)  # the seal finds nothing to fill
    _bank().save(path)
    assert read_tensor_file(path).meta["data_sha256"] == "0" * 64
    assert [c.id for c in load_bank(path).concepts] == ["c0", "c1", "c2"]


def test_the_orthogonality_error_is_computed_once_per_bank_content(tmp_path, monkeypatch):
    """Every surface that shows a bank asks for its exact orthogonality error (ComfyUI's bank nodes
    twice per run, on copies of the same loaded bank): computed once per content, again for a bank
    whose concepts differ."""
    calls = []
    original = Bank._orthogonality_error
    monkeypatch.setattr(Bank, "_orthogonality_error", lambda self, c: calls.append(len(self.concepts)) or original(self, c))
    path = tmp_path / "bank.safetensors"
    _bank().save(path)
    first = load_bank(path).summary()["max_orthogonality_error"]
    again = load_bank(path).copy().summary()["max_orthogonality_error"]
    assert first == again < 1e-6 and calls == [3]
    smaller = load_bank(path).without("c2")
    assert smaller.max_orthogonality_error() <= first and calls == [3, 2]
    changed = load_bank(path)
    c = changed.concepts[1]
    changed.concepts[1] = Concept(c.id, c.token, c.init_word, c.rank, c.method, c.A,
                                  {"unet.l": c.B["unet.l"] + 0.5 * changed.concepts[0].B["unet.l"]}, c.embedding)
    assert changed.max_orthogonality_error() > 0.1 and calls == [3, 2, 3]


def test_a_failed_background_hash_falls_back_to_every_content_hash(tmp_path, monkeypatch):
    """If the one-pass hash cannot be made (here: it raises), the load neither fails nor trusts
    anything: it computes every content hash, as for a bank without a digest."""
    import types

    from seqlora_core.bank import tensor_file

    path = tmp_path / "bank.safetensors"
    _bank().save(path)

    def broken(*_):
        raise MemoryError("no memory for the hash")

    monkeypatch.setattr(tensor_file, "hashlib", types.SimpleNamespace(sha256=broken))
    calls = _count_content_hashes(monkeypatch)
    assert [c.id for c in load_bank(path).concepts] == ["c0", "c1", "c2"]
    assert calls == ["c0", "c1", "c2"]


def test_a_concept_without_a_recorded_hash_is_hashed_once(tmp_path, monkeypatch):
    """A concept that records no hash (every concept of a version 1 bank) has it computed when
    the Concept is built; the hash check does not compute it a second time."""
    path = tmp_path / "bank.safetensors"
    _bank().save(path)

    def unrecorded(meta):
        meta["concepts"] = json.dumps([dict(e, hash=None) for e in json.loads(meta["concepts"])])
        meta.pop("data_sha256")

    _rewrite(path, edit_meta=unrecorded)
    calls = _count_content_hashes(monkeypatch)
    assert [c.id for c in load_bank(path).concepts] == ["c0", "c1", "c2"]
    assert calls == ["c0", "c1", "c2"]
