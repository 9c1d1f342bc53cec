"""What the tab does with files, without a browser: an uploaded bank becomes a copy next to the
bank in use (never gradio's temp file), and a differing file is never overwritten."""
from __future__ import annotations

import pytest

from seqlora_core.errors import SeqLoRAError
from seqlora_ui.tab import TabSession


def test_an_uploaded_bank_is_copied_next_to_the_current_bank(stream_bank, tmp_path):
    temp = tmp_path / "gradio-temp" / "shared.safetensors"
    temp.parent.mkdir()
    stream_bank.save(temp)
    session = TabSession(host_factory=lambda: None, bank_path=tmp_path / "banks" / "mine.safetensors")
    adopted = session.adopt_upload(str(temp))
    assert adopted == tmp_path / "banks" / "shared.safetensors" == session.bank_path
    assert adopted.read_bytes() == temp.read_bytes()
    assert session.adopt_upload(str(temp)) == adopted  # the same upload again: fine


def test_an_upload_never_overwrites_a_different_bank(stream_bank, tmp_path):
    temp = tmp_path / "gradio-temp" / "mine.safetensors"
    temp.parent.mkdir()
    stream_bank.save(temp)
    existing = tmp_path / "banks" / "mine.safetensors"
    stream_bank.without(stream_bank.concepts[0].id).save(existing)
    before = existing.read_bytes()
    session = TabSession(host_factory=lambda: None, bank_path=existing)
    with pytest.raises(SeqLoRAError, match="already exists"):
        session.adopt_upload(str(temp))
    assert existing.read_bytes() == before and session.bank_path == existing
    bad = tmp_path / "gradio-temp" / "broken.safetensors"
    bad.write_bytes(b"not a bank")
    with pytest.raises(SeqLoRAError):
        session.adopt_upload(str(bad))
    assert not (tmp_path / "banks" / "broken.safetensors").exists()
