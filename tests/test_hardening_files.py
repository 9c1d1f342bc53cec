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


# -- (3) a full disk or a name too long: one sentence, the old file kept -------------------------
def _fail_after(monkeypatch, calls_ok: int, exc: Exception):
    """safetensors' save_file writes ``calls_ok`` files, then fails the next one half-way."""
    import safetensors.torch as st

    real = st.save_file
    count = {"n": 0}

    def save_file(tensors, filename, metadata=None):
        count["n"] += 1
        if count["n"] > calls_ok:
            with open(filename, "wb") as f:
                f.write(b"\0" * 10)
            raise exc
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", save_file)


ENOSPC_FORMS = [OSError(errno.ENOSPC, "No space left on device"),
                # what safetensors really raises: its own error type around the OS error
                RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")]


@pytest.mark.parametrize("exc", ENOSPC_FORMS, ids=["oserror", "safetensors-error"])
def test_a_full_disk_during_a_bank_save_is_one_sentence(tmp_path, monkeypatch, exc):
    from seqlora_core.bank.lock import BankSession

    path = tmp_path / "bank.safetensors"
    small_bank(("cat",)).save(path)
    before = path.read_bytes()
    _fail_after(monkeypatch, 0, exc)
    with pytest.raises(SeqLoRAError) as err:
        with BankSession(path) as session:
            session.commit(small_bank())
    message = str(err.value)
    assert "no space left" in message and "left as it was" in message and "\n" not in message
    assert path.read_bytes() == before and temps(tmp_path) == []


def test_a_full_disk_when_locking_is_one_sentence(tmp_path, monkeypatch):
    from seqlora_core.bank import lock

    real_open = os.open

    def full(path, flags, *args):
        if str(path).endswith(".lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *args)

    monkeypatch.setattr(lock.os, "open", full)
    with pytest.raises(SeqLoRAError) as err:
        with lock.BankSession(tmp_path / "bank.safetensors"):
            pass
    assert "no space left" in str(err.value) and "\n" not in str(err.value)


def test_an_id_too_long_for_a_file_name_leaves_no_half_export(tmp_path):
    from seqlora_core.bank.export import export_lora

    out = tmp_path / "lora.safetensors"
    with pytest.raises(SeqLoRAError) as err:
        export_lora(small_bank(("cat", "c" * 300)), None, out)
    assert "too long" in str(err.value) and "\n" not in str(err.value)
    assert not out.exists() and temps(tmp_path) == []
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.tmp"))


def test_a_full_disk_during_an_export_keeps_the_earlier_export(tmp_path, monkeypatch):
    from seqlora_core.bank.export import export_lora

    out = tmp_path / "lora.safetensors"
    export_lora(small_bank(("cat",)), None, out)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.safetensors")}
    _fail_after(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))  # LoRA and one embedding
    with pytest.raises(SeqLoRAError) as err:
        export_lora(small_bank(("cat", "cup")), None, out)
    assert "no space left" in str(err.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.safetensors")} == before
    assert not list(tmp_path.rglob("*.tmp"))


# -- (5) litter of a killed writer, a bounded hash cache ------------------------------------------
def test_the_next_lock_removes_stale_temp_files_of_its_own_bank_only(tmp_path):
    from seqlora_core.bank.lock import BankSession

    path = tmp_path / "bank.safetensors"
    old = 1_000_000_000  # 2001: long dead
    stale = tmp_path / ".bank.safetensors.ab12_x9z.tmp"  # what kill -9 during the save left
    fresh = tmp_path / ".bank.safetensors.cd34efgh.tmp"  # a writer that does not lock, writing now
    other = tmp_path / ".bank.safetensors.x.safetensors.ab12cd34.tmp"  # bank.safetensors.x's temp
    mine = tmp_path / "bank.safetensors.ab12cd34.tmp"  # not a temp name of ours
    for f in (stale, fresh, other, mine):
        f.write_bytes(b"")
    for f in (stale, other, mine):
        os.utime(f, (old, old))
    with BankSession(path) as session:
        session.commit(small_bank(("cat",)))
    assert not stale.exists()
    assert fresh.exists() and other.exists() and mine.exists()


def test_the_content_hash_cache_is_bounded(tmp_path):
    from seqlora_core.bank import on_disk

    on_disk._HASHES.clear()
    files = []
    for i in range(on_disk._HASHES_SIZE + 10):
        files.append(tmp_path / f"{i}.bin")
        files[-1].write_bytes(str(i).encode())
        on_disk.file_identity(files[-1])
    assert len(on_disk._HASHES) == on_disk._HASHES_SIZE
    first = next(iter(on_disk._HASHES))
    assert first[0] == str(files[10].resolve())  # least recently used went first
    assert on_disk.file_identity(files[-1])[2] == on_disk.file_identity(files[-1])[2]


def test_the_command_line_prints_one_line_for_a_full_disk_or_a_long_name(tmp_path, monkeypatch, capsys):
    from seqlora_core.app.cli import main

    path = tmp_path / "bank.safetensors"
    small_bank(("cat", "c" * 300)).save(path)
    before = path.read_bytes()
    assert main(["export", str(path), "--out", str(tmp_path / "out" / "lora.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "too long" in err and not (tmp_path / "out" / "lora.safetensors").exists()
    _fail_after(monkeypatch, 0, ENOSPC_FORMS[1])
    assert main(["bank", "remove", str(path), "--concept", "cat"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left" in err and "left as it was" in err
    assert path.read_bytes() == before and temps(tmp_path) == []
