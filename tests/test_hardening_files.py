"""Issue 22 (files): no run writes a bank the reader refuses, write failures are one sentence and
leave the old file, exports are all-or-nothing, stale temp files are cleaned, bank names stay in
their folder, training images load as they look. Small hand-made banks: no model is needed."""
import errno
import os

import pytest
import torch

from seqlora_core.bank import atomic
from seqlora_core.bank.format import Bank, Concept, load_bank
from seqlora_core.errors import BankError, SeqLoRAError

LAYERS = ["unet.a.attn2.to_k", "unet.b.attn2.to_v"]
M, N, R = 8, 6, 2


def small_bank(ids=("cat", "cup"), stats: bool = True) -> Bank:
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(M, M, generator=gen))[0]
    concepts = []
    for k, ident in enumerate(ids):
        B = {l: q[:, k * R:(k + 1) * R].contiguous() for l in LAYERS}
        A = {l: torch.randn(N, R, generator=gen) for l in LAYERS}
        st = {l: (torch.tensor([2.0, 1.0]), q[:, :2].contiguous()) for l in LAYERS} if stats else None
        concepts.append(Concept(ident, f"<{ident}>", "thing", R, "seqlora", A, B, torch.randn(1, 12, generator=gen),
                                stats=st))
    return Bank({"architecture": "sd15-tiny", "fingerprint": "0" * 16}, 1e-8, concepts)


def temps(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# -- (1b) a bank the reader refuses is never renamed into place ----------------------------------
def test_a_save_the_reader_would_refuse_keeps_the_old_bank(tmp_path, monkeypatch):
    path = tmp_path / "bank.safetensors"
    small_bank(("cat",)).save(path)
    before = path.read_bytes()
    full = Bank.tensors

    def drop_one_layers_stats(self):  # the probe's defect: statistics for some layers but not all
        out = full(self)
        del out[next(k for k in out if ".stats.values." in k)]
        return out

    monkeypatch.setattr(Bank, "tensors", drop_one_layers_stats)
    with pytest.raises(BankError) as err:
        small_bank().save(path)
    assert "left as it was" in str(err.value) and "\n" not in str(err.value)
    assert "some layers but not all" in str(err.value)
    assert path.read_bytes() == before
    assert temps(tmp_path) == []
    monkeypatch.undo()
    assert [c.id for c in load_bank(path).concepts] == ["cat"]
