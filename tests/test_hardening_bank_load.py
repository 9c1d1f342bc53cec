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
    meta, tensors, nonfinite = read_tensor_file(path)
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
    _, _, nonfinite = read_tensor_file(path)
    assert nonfinite == {"t2", "t4"}


def test_huge_finite_float64_values_are_finite(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"a": torch.full((4,), 1e308, dtype=torch.float64)}, str(path))  # the sum overflows
    assert read_tensor_file(path)[2] == set()


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
