"""Bank file v1 round trip and validation; kohya export round trip."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from seqlora_core.bank.format import Bank, load_bank
from seqlora_core.errors import BankError
from seqlora_core.bank.export import export_lora, kohya_key


def test_bank_round_trip(stream_bank, tmp_path):
    path = tmp_path / "bank.safetensors"
    stream_bank.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]  # no temp file left
    loaded = load_bank(path)
    assert [c.meta() for c in loaded.concepts] == [c.meta() for c in stream_bank.concepts]
    assert loaded.base == stream_bank.base and loaded.eps == stream_bank.eps
    for a, b in zip(loaded.concepts, stream_bank.concepts):
        assert all(torch.equal(a.A[n], b.A[n]) and torch.equal(a.B[n], b.B[n]) for n in b.A)
        assert torch.equal(a.embedding, b.embedding)


def test_bank_file_layout_is_format_v2(stream_bank, tmp_path):
    path = tmp_path / "bank.safetensors"
    stream_bank.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["format"] == "seqlora.bank" and meta["format_version"] == "2"
    concepts = json.loads(meta["concepts"])
    for entry in concepts:
        for field in ("id", "token", "init_word", "rank", "method", "created", "settings", "final_loss",
                      "hash", "author", "lease"):
            assert field in entry
        assert len(entry["hash"]) == 64
    assert json.loads(meta["leases"]) == [] and meta["lease"] == ""
    assert [h["action"] for h in json.loads(meta["history"])] == ["append"] * 3
    assert json.loads(meta["base"])["architecture"] == "sd15-tiny"
    assert float(meta["eps"]) == 1e-8
    c = concepts[0]["id"]
    assert f"concept.{c}.A.unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in keys
    assert f"concept.{c}.B.text_encoder.text_model.encoder.layers.0.self_attn.k_proj" in keys
    assert f"concept.{c}.embedding" in keys
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert f"concept.{c}.stats.values.{layer}" in keys and f"concept.{c}.stats.vectors.{layer}" in keys


def _rewrite(src, dst, tensors_fn=None, meta_fn=None):
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if tensors_fn:
        tensors_fn(tensors)
    if meta_fn:
        meta_fn(meta)
    save_file(tensors, str(dst), metadata=meta)


def _first(tensors, part):
    return next(k for k in tensors if f".{part}." in k)


CORRUPTIONS = {
    "not a bank": (None, lambda m: m.update(format="something")),
    "version": (None, lambda m: m.update(format_version="3")),
    "non-finite": (lambda t: t[_first(t, "A")].__setitem__((0, 0), float("nan")), None),
    "shape": (lambda t: t.__setitem__(_first(t, "B"), torch.zeros(3, 4)), None),
    "rank": (lambda t: t.__setitem__(_first(t, "A"), torch.zeros(t[_first(t, "A")].shape[0], 2)), None),
    "orthogonality": (lambda t: [t.__setitem__(k, torch.ones_like(v)) for k, v in list(t.items()) if ".B." in k], None),
    "stray tensor": (lambda t: t.__setitem__("concept.ghost.A.unet.x", torch.zeros(2, 4)), None),
    "bad metadata": (None, lambda m: m.update(concepts="[{")),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_banks_are_rejected_with_one_sentence(stream_bank, tmp_path, case):
    good = tmp_path / "good.safetensors"
    stream_bank.save(good)
    bad = tmp_path / "bad.safetensors"
    _rewrite(good, bad, *CORRUPTIONS[case])
    with pytest.raises(BankError) as info:
        load_bank(bad)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")


def test_truncated_and_missing_files_are_rejected(stream_bank, tmp_path):
    good = tmp_path / "good.safetensors"
    stream_bank.save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (truncated, tmp_path / "missing.safetensors"):
        with pytest.raises(BankError):
            load_bank(path)


def test_export_is_exactly_the_sum_of_residuals(stream_bank, tmp_path):
    ids = [c.id for c in stream_bank.concepts[:2]]
    out, embeddings = export_lora(stream_bank, ids, tmp_path / "two.safetensors")
    sd = load_file(str(out))
    layers = stream_bank.layer_shapes()
    assert len(sd) == 3 * len(layers)
    for name in layers:
        key = kohya_key(name)
        up, down, alpha = sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"], sd[f"{key}.alpha"]
        rank = down.shape[0]
        assert rank == 8 and up.shape[1] == 8
        got = up.double() @ down.double() * (float(alpha) / rank)
        want = sum(c.A[name].double() @ c.B[name].double().T for c in stream_bank.concepts[:2])
        assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert kohya_key("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert kohya_key("text_encoder.text_model.encoder.layers.0.self_attn.k_proj") == \
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
    assert [p.name for p in embeddings] == [f"{i}.safetensors" for i in ids]
    for path, c in zip(embeddings, stream_bank.concepts):
        assert torch.equal(load_file(str(path))["emb_params"], c.embedding)


def test_remove_keeps_the_others(stream_bank, tmp_path):
    first = stream_bank.concepts[0].id
    smaller = stream_bank.without(first)
    path = tmp_path / "b.safetensors"
    smaller.save(path)
    assert [c.id for c in load_bank(path).concepts] == [c.id for c in stream_bank.concepts[1:]]
    assert isinstance(smaller, Bank) and len(stream_bank.concepts) == 3


def test_v1_fixture_written_before_format_2_still_loads(tmp_path):
    from pathlib import Path

    fixture = Path(__file__).parent / "data" / "bank_v1.safetensors"
    with safe_open(str(fixture), framework="pt") as f:
        assert f.metadata()["format_version"] == "1"
    bank = load_bank(fixture)
    assert [c.id for c in bank.concepts] == ["chelsea", "coffee"]
    assert all(c.stats is None and c.author is None and c.lease is None and len(c.hash) == 64 for c in bank.concepts)
    assert bank.leases == [] and bank.history == [] and bank.max_orthogonality_error() < 1e-6
    bank.save(tmp_path / "v2.safetensors")  # upgrading writes version 2 with the same tensors
    again = load_bank(tmp_path / "v2.safetensors")
    assert [c.hash for c in again.concepts] == [c.hash for c in bank.concepts]


def test_bank_and_export_files_follow_the_umask(stream_bank, tmp_path):
    """Atomic writes go through a 0600 temp file; the result must get the mode any new file gets."""
    import os

    old = os.umask(0o027)
    try:
        bank_path = tmp_path / "shared.safetensors"
        stream_bank.save(bank_path)
        out, embeddings = export_lora(stream_bank, None, tmp_path / "lora" / "all.safetensors",
                                      embeddings_dir=tmp_path / "embeddings")
    finally:
        os.umask(old)
    for path in (bank_path, out, *embeddings):
        assert path.stat().st_mode & 0o777 == 0o640, (path, oct(path.stat().st_mode))


def test_export_writes_embeddings_where_the_host_reads_them(stream_bank, tmp_path):
    """A1111 reads embeddings from its own folder and lists everything under its Lora folder as
    LoRAs: with embeddings_dir given, nothing but the LoRA lands next to the LoRA."""
    out, embeddings = export_lora(stream_bank, None, tmp_path / "Lora" / "all.safetensors",
                                  embeddings_dir=tmp_path / "embeddings")
    assert sorted(p.name for p in (tmp_path / "Lora").rglob("*")) == ["all.safetensors"]
    assert [p.parent for p in embeddings] == [tmp_path / "embeddings"] * len(stream_bank.concepts)


def test_a_save_never_drops_a_concept_the_file_holds(stream_bank, tmp_path):
    """A host that loaded a bank earlier must not overwrite concepts added to the file since (the
    ComfyUI Save node's check under the bank lock); concepts removed on purpose may go."""
    from nodes.operations import _keeps
    from seqlora_core.bank.on_disk import file_identity

    path = tmp_path / "b.safetensors"
    assert file_identity(path) is None
    stream_bank.save(path)
    first = file_identity(path)
    assert file_identity(path) == first  # unchanged file, same identity
    disk = load_bank(path)
    assert _keeps(disk.without(disk.concepts[-1].id).without(disk.concepts[0].id), disk)  # on purpose
    older = type(disk)(dict(disk.base), disk.eps, disk.concepts[:1])  # loaded before the others came
    assert not _keeps(older, disk)
    older.save(path)
    assert file_identity(path) != first


def test_base_refusal_says_how_this_surface_overrides(stream_bank):
    import pytest

    from seqlora_core.errors import BankError

    with pytest.raises(BankError, match="--allow-other-base"):
        stream_bank.check_base(stream_bank.base["architecture"], "0" * 16)
    with pytest.raises(BankError) as info:
        stream_bank.check_base(stream_bank.base["architecture"], "0" * 16, hint="turn on allow_other_base")
    assert "--" not in str(info.value) and "allow_other_base" in str(info.value)
    stream_bank.check_base(stream_bank.base["architecture"], "0" * 16, allow_other_base=True)
