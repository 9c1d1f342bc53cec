"""The Bank tab's lease and merge buttons (their handlers, without a browser): a lease file to
download, a returned lease merged back exactly, a fork refused and then rebased, errors as one
sentence in the page."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio")

from seqlora_core.bank.format import load_bank  # noqa: E402
from seqlora_ui.tab import TabActions, TabSession  # noqa: E402


def test_lease_and_merge_from_the_bank_tab(stream_bank, tmp_path):
    bank_path = tmp_path / "bank.safetensors"
    stream_bank.save(bank_path)
    actions = TabActions(TabSession(host_factory=lambda: None, bank_path=bank_path, export_dir=tmp_path / "exports"))

    msg, lease_file, *_ = actions.lease_out("alice", 2, 4)
    assert "leased room for 2 concept(s)" in msg and Path(lease_file).exists()
    assert load_bank(bank_path).active_leases[0].name == "alice"
    msg, lease_file2, *_ = actions.lease_out("greedy", 100, 4)
    assert "seqlora-error" in msg and "Layer" in msg and lease_file2 is None

    # the holder trains one concept inside the lease (a basis drawn in the lease block)
    leased = load_bank(lease_file)
    gen = torch.Generator().manual_seed(0)
    template = stream_bank.concepts[0]
    b = {n: leased.projector(n, t.shape[0]).random_orthonormal(t.shape[1], gen) for n, t in template.B.items()}
    inside = replace(template, id="dog", token="<dog>", B=b, hash="", lease=leased.confined_to)
    leased.with_concept(inside).save(lease_file)
    msg, *_ = actions.merge_in(None, str(lease_file), False)
    assert "merged: 4 concept(s)" in msg and "returned" in msg
    merged = load_bank(bank_path)
    assert torch.equal(merged.get("dog").B[next(iter(b))], b[next(iter(b))])
    assert not merged.active_leases and merged.max_orthogonality_error() < 1e-6

    # a fork of the bank from before the lease: its new concept is drawn in the fork's free space,
    # which still contains the lease's block, so it overlaps 'dog': refused, then rebased
    fork = tmp_path / "fork.safetensors"
    free = {n: stream_bank.projector(n, t.shape[0]).random_orthonormal(t.shape[1], gen) for n, t in template.B.items()}
    other = replace(template, id="cat", token="<cat>", hash="", created="9999", B=free)
    stream_bank.with_concept(other).save(fork)
    before = bank_path.read_bytes()
    msg, *_ = actions.merge_in(None, str(fork), False)
    assert "seqlora-error" in msg and "overlap" in msg and bank_path.read_bytes() == before
    msg, *_ = actions.merge_in(None, str(fork), True)
    assert "rebased cat" in msg
    assert load_bank(bank_path).max_orthogonality_error() < 1e-6
