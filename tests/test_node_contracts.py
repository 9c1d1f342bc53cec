"""Node-side logic that needs no ComfyUI: concept tokens in prompts, concept selection, panel data."""
import pytest
import torch

from nodes.operations import info_text, merge, panel_data
from nodes.concept_tokenizer import PREFIX, ConceptTokenizer
from seqlora_core.errors import InputError


class FakeSDTokenizer:
    """The two members of ComfyUI's SDTokenizer that ConceptTokenizer relies on."""

    embedding_directory = None

    def _try_get_embedding(self, name):
        return None, ""

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        out = []
        for word in text.split():
            if word.startswith("embedding:") and self.embedding_directory is not None:
                emb, _ = self._try_get_embedding(word[len("embedding:"):])
                out += [(emb[i], 1.0) for i in range(emb.shape[0])] if emb is not None else []
            else:
                out.append((word, 1.0))
        return out


class FakeSD1Tokenizer:
    def __init__(self):
        self.clip_l = FakeSDTokenizer()

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {"l": self.clip_l.tokenize_with_weights(text)}


def test_concept_tokens_become_their_vectors_and_keep_the_graph():
    vec = torch.randn(1, 8, requires_grad=True)
    inner = FakeSD1Tokenizer()
    tok = ConceptTokenizer(inner, {"<chelsea>": vec})
    out = tok.tokenize_with_weights("a photo of <chelsea>, sleeping")["l"]
    tensors = [t for t, _ in out if torch.is_tensor(t)]
    assert len(tensors) == 1 and torch.equal(tensors[0], vec[0])
    tensors[0].sum().backward()
    assert vec.grad is not None  # training reaches the learned embedding
    assert [w for w, _ in out if not torch.is_tensor(w)] == ["a", "photo", "of", ",", "sleeping"]
    # the wrapped tokenizer itself is untouched
    assert inner.clip_l.embedding_directory is None
    assert inner.tokenize_with_weights(f"embedding:{PREFIX}chelsea")["l"] == [(f"embedding:{PREFIX}chelsea", 1.0)]


def test_wrapping_twice_merges_concepts():
    a, b = torch.ones(1, 4), torch.zeros(1, 4)
    tok = ConceptTokenizer(ConceptTokenizer(FakeSD1Tokenizer(), {"<a>": a}), {"<b>": b})
    out = tok.tokenize_with_weights("<a> and <b>")["l"]
    assert sum(torch.is_tensor(t) for t, _ in out) == 2


def test_selection_parsing(stream_bank):
    ids = [c.id for c in stream_bank.concepts]
    assert stream_bank.parse_selection("all") == (ids, {})
    assert stream_bank.parse_selection(f"<{ids[0]}>:0.5, {ids[1]}") == ([ids[0], ids[1]], {ids[0]: 0.5})
    with pytest.raises(InputError):
        stream_bank.parse_selection("nobody")
    with pytest.raises(InputError):
        stream_bank.parse_selection(f"{ids[0]}:lots")


def test_panel_data_and_info(stream_bank):
    data = panel_data(stream_bank)
    assert [c["id"] for c in data["concepts"]] == [c.id for c in stream_bank.concepts]
    assert data["widths"] == [{"width": 64, "layers": 48, "used": 3, "capacity": 16, "leased_width": 0}]
    assert data["leases"] == []
    assert data["orthogonality"] < 1e-6
    assert "3 concept(s)" in info_text(stream_bank)


def test_merge_node_refuses_forks_then_rebases_and_shows_leases(stream_bank):
    from dataclasses import replace

    from seqlora_core.bank.lease import grant
    from seqlora_core.errors import BankError

    base = stream_bank.without(stream_bank.concepts[-1].id)
    last = stream_bank.concepts[-1]
    gen = torch.Generator().manual_seed(5)
    other = replace(last, id="other", token="<other>", hash="", created="9999",
                    B={n: torch.linalg.qr(torch.randn(*b.shape, generator=gen))[0] for n, b in last.B.items()})
    fork = base.with_concept(other)
    with pytest.raises(BankError, match="overlap"):
        merge([stream_bank, fork], False, "")
    bank, report = merge([stream_bank, fork], True, "")
    assert "rebased other: relative residual change" in report
    # the fork removed the last concept (its history says so): the merge does not bring it back
    assert f"left out {last.id}" in report
    assert bank.max_orthogonality_error() < 1e-6 and [c.id for c in bank.concepts] == [
        c.id for c in stream_bank.concepts[:-1]] + ["other"]
    leased = bank.with_lease(grant(bank, "alice", 2, 4, seed=0))
    assert panel_data(leased)["leases"][0]["name"] == "alice"
    assert panel_data(leased)["widths"][0]["leased_width"] == 8
    assert "lease alice" in info_text(leased)


def test_load_node_fingerprint_follows_the_file(tmp_path, monkeypatch, stream_bank):
    import sys
    import types

    from nodes.operations import bank_file_identity

    path = tmp_path / "b.safetensors"
    fake = types.SimpleNamespace(get_full_path=lambda folder, name: str(tmp_path / name) if (tmp_path / name).exists() else None)
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    assert bank_file_identity("b.safetensors") == "b.safetensors:missing"
    stream_bank.save(path)
    first = bank_file_identity("b.safetensors")
    assert first == bank_file_identity("b.safetensors")  # unchanged file: ComfyUI may reuse its output
    stream_bank.without(stream_bank.concepts[0].id).save(path)
    assert bank_file_identity("b.safetensors") != first  # rewritten: Load Basis Bank runs again
