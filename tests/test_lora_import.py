"""Importing LoRA files into a bank (issue 21): round trip, orthogonality and the reported loss,
the layouts users have, and every refusal (nothing written)."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from seqlora_core.app.cli import main
from seqlora_core.app.import_lora import import_lora, report_lines
from seqlora_core.bank.export import export_lora, kohya_key
from seqlora_core.bank.format import ORTHOGONALITY_TOLERANCE, Concept, load_bank
from seqlora_core.bank.lora_file import read_lora_file
from seqlora_core.errors import CapacityError, InputError
from seqlora_core.method.targets import select_layers
from seqlora_core.method.trainer import new_bank


def _random_concept(host, bank, ident: str, rank: int = 4, seed: int = 0) -> Concept:
    """A concept with random factors, its bases in the bank's free space (no training needed)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    for name, layer in select_layers(host.linear_layers(), "default").items():
        b[name] = bank.projector(name, layer.in_features).random_orthonormal(rank, gen)
        a[name] = 0.05 * torch.randn(layer.out_features, rank, generator=gen)
    d = host.init_embedding("cat").shape[1]
    return Concept(ident, f"<{ident}>", "cat", rank, "seqlora", a, b, torch.randn(1, d, generator=gen))


def _random_lora(host, rank: int = 8, alpha: float = 4.0, seed: int = 3, layers: str = "default") -> dict:
    """ΔW per default layer as (up, down, alpha), random."""
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(layer.out_features, rank, generator=gen) * 0.1,
                   torch.randn(rank, layer.in_features, generator=gen) * 0.1, alpha)
            for name, layer in select_layers(host.linear_layers(), layers).items()}


def _kohya(lora: dict) -> dict:
    out = {}
    for name, (up, down, alpha) in lora.items():
        out[f"{kohya_key(name)}.lora_up.weight"] = up
        out[f"{kohya_key(name)}.lora_down.weight"] = down
        out[f"{kohya_key(name)}.alpha"] = torch.tensor(alpha)
    return out


def _peft(lora: dict) -> dict:
    """peft / diffusers keys: no alpha in the file, so the scale is folded into B."""
    out = {}
    for name, (up, down, alpha) in lora.items():
        out[f"{name}.lora_B.weight"] = up * (alpha / up.shape[1])
        out[f"{name}.lora_A.weight"] = down
    return out


def _delta(lora: dict, name: str) -> torch.Tensor:
    up, down, alpha = lora[name]
    return up.double() @ down.double() * (alpha / up.shape[1])


def test_a_bank_export_imported_into_an_empty_bank_comes_back_exactly(host, tmp_path):
    bank = new_bank(host)
    bank = bank.with_concept(_random_concept(host, bank, "hero"))
    out, embeddings = export_lora(bank, None, tmp_path / "hero.safetensors")
    result = import_lora(host, new_bank(host), read_lora_file(out), "<hero>",
                         embedding=load_file(embeddings[0])["emb_params"])
    original = bank.get("hero")
    assert set(result.concept.A) == set(original.A)
    worst = max(float((result.concept.A[n].double() @ result.concept.B[n].double().T
                       - original.A[n].double() @ original.B[n].double().T).abs().max()) for n in original.A)
    assert worst < 1e-6
    assert torch.equal(result.concept.embedding, original.embedding)
    assert result.lost_share() < 1e-10 and result.dropped == []
    assert result.concept.method == "imported" and result.concept.constrained


def test_into_a_bank_with_earlier_concepts_it_stays_orthogonal_and_reports_the_energy_outside(host, tmp_path):
    bank = new_bank(host)
    bank = bank.with_concept(_random_concept(host, bank, "first", seed=1))
    bank = bank.with_concept(_random_concept(host, bank, "second", seed=2))
    lora = _random_lora(host, rank=4)
    path = tmp_path / "lora.safetensors"
    save_file(_kohya(lora), path)
    result = import_lora(host, bank, read_lora_file(path), "<third>", trigger="cat", weighting="plain")
    assert result.bank.max_orthogonality_error() <= ORTHOGONALITY_TOLERANCE
    for name, fit in result.fits.items():
        taken = torch.cat([bank.get(c).B[name].double() for c in ("first", "second")], 1)  # orthonormal blocks
        dw = _delta(lora, name)
        outside = dw @ taken @ taken.T
        assert fit.lost_projection / fit.energy == pytest.approx(float(outside.norm() ** 2 / dw.norm() ** 2), rel=1e-4)
        assert fit.lost_rank <= 1e-9 * fit.energy
    result.bank.save(tmp_path / "bank.safetensors")  # the reader accepts the imported concept
    again = load_bank(tmp_path / "bank.safetensors").get("third")
    assert again.settings["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    entry = load_bank(tmp_path / "bank.safetensors").history[-1]
    assert entry["source"] == "lora.safetensors" and entry["source_sha256"] == again.settings["source_sha256"]
    assert any("lost of the LoRA" in line for line in report_lines(result))


def test_kohya_and_peft_layouts_import_to_the_same_concept(host, tmp_path):
    lora = _random_lora(host, rank=4)
    save_file(_kohya(lora), tmp_path / "kohya.safetensors")
    save_file(_peft(lora), tmp_path / "peft.safetensors")
    one = read_lora_file(tmp_path / "kohya.safetensors")
    two = read_lora_file(tmp_path / "peft.safetensors")
    assert (one.layout, two.layout) == ("kohya", "peft")
    bank = new_bank(host)
    a = import_lora(host, bank, one, "<x>", trigger="cat").concept
    b = import_lora(host, bank, two, "<x>", trigger="cat").concept
    for name in a.A:
        assert torch.allclose(a.A[name].double() @ a.B[name].double().T, b.A[name].double() @ b.B[name].double().T,
                              atol=1e-6)
        assert torch.allclose(a.A[name].double() @ a.B[name].double().T, _delta(lora, name).float().double(), atol=1e-5)


def test_a_higher_rank_lora_is_cut_to_the_bank_rank_weighted_by_text_statistics(host, tmp_path):
    lora = _random_lora(host, rank=8)
    save_file(_kohya(lora), tmp_path / "wide.safetensors")
    result = import_lora(host, new_bank(host), read_lora_file(tmp_path / "wide.safetensors"), "<wide>",
                         trigger="cat", rank=4)
    assert result.concept.rank == 4 and all(f.weighted for f in result.fits.values())  # default targets read text
    assert 0 < result.lost_share("rank") < 1 and result.lost_share("projection") < 1e-10
    assert result.concept.stats is not None and set(result.concept.stats) == set(result.concept.A)


def test_layers_the_bank_does_not_adapt_are_dropped_by_name(host, tmp_path):
    lora = _random_lora(host, rank=4, layers="full")
    save_file(_kohya(lora), tmp_path / "full.safetensors")
    result = import_lora(host, new_bank(host), read_lora_file(tmp_path / "full.safetensors"), "<f>", trigger="cat")
    assert result.dropped and all("attn1" in n or "to_q" in n or "to_out" in n for n in result.dropped)
    assert not set(result.dropped) & set(result.fits)
    assert any(line.startswith("dropped") for line in report_lines(result))


@pytest.fixture
def bank_file(host, tmp_path):
    bank = new_bank(host)
    bank = bank.with_concept(_random_concept(host, bank, "hero"))
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    return path


def _refused(capsys, argv, bank_file, message):
    before = bank_file.read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err, err
    assert bank_file.read_bytes() == before
    assert sorted(p.name for p in bank_file.parent.iterdir() if p.name.startswith(bank_file.name)) == [bank_file.name]


def test_every_refusal_is_one_sentence_and_writes_nothing(host, tmp_path, bank_file, capsys):
    base = ["--base", "tiny", "--device", "cpu"]
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, tmp_path / "ckpt.safetensors")
    _refused(capsys, ["bank", "import", str(bank_file), str(tmp_path / "ckpt.safetensors"), "--token", "<n>", *base],
             bank_file, "is not a LoRA file")
    _refused(capsys, ["bank", "import", str(bank_file), str(bank_file), "--token", "<n>", *base],
             bank_file, "is a SeqLoRA bank")
    (tmp_path / "old.ckpt").write_bytes(b"PK\x03\x04")
    _refused(capsys, ["bank", "import", str(bank_file), str(tmp_path / "old.ckpt"), "--token", "<n>", *base],
             bank_file, "only .safetensors")
    sdxl = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768)}
    save_file(sdxl, tmp_path / "sdxl.safetensors")
    _refused(capsys, ["bank", "import", str(bank_file), str(tmp_path / "sdxl.safetensors"), "--token", "<n>", *base],
             bank_file, "another architecture")
    name = next(iter(select_layers(host.linear_layers(), "default")))
    wrong = {f"{kohya_key(name)}.lora_up.weight": torch.zeros(999, 4),
             f"{kohya_key(name)}.lora_down.weight": torch.zeros(4, 999)}
    save_file(wrong, tmp_path / "wrong.safetensors")
    _refused(capsys, ["bank", "import", str(bank_file), str(tmp_path / "wrong.safetensors"), "--token", "<n>", *base],
             bank_file, "another architecture")
    save_file(_kohya(_random_lora(host)), tmp_path / "ok.safetensors")
    _refused(capsys, ["bank", "import", str(bank_file), str(tmp_path / "ok.safetensors"), "--token", "<hero>", *base],
             bank_file, "already has a concept 'hero'")
    _refused(capsys, ["bank", "import", str(bank_file), str(tmp_path / "ok.safetensors"), "--token", "<n>",
                      "--rank", "1024", *base], bank_file, "full")


def test_the_command_line_imports_and_reports(host, tmp_path, bank_file, capsys):
    lora = _random_lora(host, rank=8)
    path = tmp_path / "mine.safetensors"
    save_file(_kohya(lora), path, metadata={"ss_tag_frequency": json.dumps({"10_img": {"ohwx": 12, "cat": 3}})})
    assert main(["bank", "import", str(bank_file), str(path), "--token", "<mine>", "--base", "tiny",
                 "--device", "cpu", "--layers"]) == 0
    out = capsys.readouterr().out
    assert "imported mine.safetensors (kohya" in out and "the trigger words 'ohwx'" in out
    assert "in all" in out and "max orthogonality error" in out
    bank = load_bank(bank_file)
    assert [c.id for c in bank.concepts] == ["hero", "mine"]
    assert bank.max_orthogonality_error() <= ORTHOGONALITY_TOLERANCE


def test_full_bank_is_refused_in_the_api_too(host, tmp_path):
    save_file(_kohya(_random_lora(host)), tmp_path / "ok.safetensors")
    with pytest.raises(CapacityError, match="full"):
        import_lora(host, new_bank(host), read_lora_file(tmp_path / "ok.safetensors"), "<n>", rank=1000)
    with pytest.raises(InputError, match="Weighting"):
        import_lora(host, new_bank(host), read_lora_file(tmp_path / "ok.safetensors"), "<n>", weighting="x")


def test_the_tab_imports_a_lora_by_path_and_refuses_a_non_lora(host, tmp_path, bank_file):
    pytest.importorskip("gradio")
    from seqlora_ui.tab import TabActions, TabSession

    save_file(_kohya(_random_lora(host)), tmp_path / "mine.safetensors")
    actions = TabActions(TabSession(host_factory=lambda: host, bank_path=bank_file, bank_root=tmp_path))
    msg, rows, *_ = actions.import_lora(None, str(tmp_path / "mine.safetensors"), "<mine>", "cat", 1.0)
    assert "imported mine.safetensors" in msg and [r[0] for r in rows] == ["hero", "mine"]
    before = bank_file.read_bytes()
    msg, *_ = actions.import_lora(None, str(bank_file), "<other>", "", 1.0)
    assert "is a SeqLoRA bank" in msg and bank_file.read_bytes() == before
