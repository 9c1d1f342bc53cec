"""One definition of the training settings on every surface; Bank.summary and fast bank loading."""
import dataclasses

import pytest
import torch

from seqlora_core.app.cli import build_parser
from seqlora_core.bank.format import Bank, Concept, load_bank
from seqlora_core.errors import BankError, InputError
from seqlora_core.method.projector import block_overlaps, normalised_overlap, probably_orthogonal
from seqlora_core.settings import SETTINGS_BY_NAME, TRAINING_SETTINGS, TrainSettings, train_settings


# -- settings ------------------------------------------------------------------------------------
def test_train_settings_are_built_from_the_one_definition():
    fields = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    assert fields == {s.name: s.default for s in TRAINING_SETTINGS}
    assert train_settings({}) == TrainSettings()
    assert train_settings({"rank": "8", "lr_a": "0.01", "method": "lora", "steps": None}) == \
        TrainSettings(rank=8, lr_a=0.01, method="lora")


@pytest.mark.parametrize("values, word", [({"rank": 0}, "Rank"), ({"rank": 2.5}, "whole number"),
                                          ({"method": "magic"}, "seqlora"), ({"steps": "many"}, "Steps"),
                                          ({"resolution": 4096}, "between"), ({"lr": 1.0}, "Unknown")])
def test_bad_setting_is_one_sentence(values, word):
    with pytest.raises(InputError, match=word):
        train_settings(values)


def test_the_command_line_offers_every_setting():
    parser = build_parser()
    argv = ["train", "--bank", "b.safetensors", "--base", "tiny", "--images", "x", "--token", "<t>"]
    defaults = parser.parse_args(argv)
    assert all(getattr(defaults, s.name) is None for s in TRAINING_SETTINGS)  # None = not given
    given = {"method": "alternating", "rank": 2, "steps": 7, "bilevel_iters": 1, "inner_steps": 3,
             "resolution": 128, "lr_a": 0.5, "lr_b": 0.25, "lr_embedding": 0.125, "seed": 9,
             "batch_size": 2, "optimizer": "sgd", "hypergradient": "unrolled", "memory": "low", "targets": "full",
             "eps": 1e-6, "stats_q": 3}
    assert set(given) == set(SETTINGS_BY_NAME)  # a new setting must be added to this test too
    args = parser.parse_args(argv + [x for s in TRAINING_SETTINGS for x in (s.flag, str(given[s.name]))])
    assert train_settings({s.name: getattr(args, s.name) for s in TRAINING_SETTINGS}) == TrainSettings(**given)


def test_the_tab_offers_every_setting():
    gr = pytest.importorskip("gradio")
    from seqlora_ui.tab import setting_inputs

    with gr.Blocks():
        widgets = setting_inputs(gr, resolution=64)
    assert [w.elem_id for w in widgets] == [f"seqlora_{s.name}" for s in TRAINING_SETTINGS]
    assert widgets[[s.name for s in TRAINING_SETTINGS].index("resolution")].value == 64
    assert any(isinstance(w, gr.Dropdown) for w in widgets)


# -- orthogonality checks ------------------------------------------------------------------------
def _bases(k: int, m: int = 48, r: int = 4, seed: int = 0) -> list[torch.Tensor]:
    q = torch.linalg.qr(torch.randn(m, k * r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]
    return [q[:, i * r:(i + 1) * r].float() for i in range(k)]


def test_block_overlaps_equal_the_pairwise_definition():
    bases = _bases(5)
    bases[3] = bases[3] + 0.05 * bases[1]  # one overlapping pair
    bases.append(torch.randn(48, 2))  # a basis of another rank
    got = block_overlaps(bases)
    for i in range(len(bases)):
        for j in range(len(bases)):
            want = 0.0 if i == j else normalised_overlap(bases[i], bases[j])
            assert abs(float(got[i, j]) - want) < 1e-12
    assert float(got[3, 1]) > 0.01 > float(got[3, 2])  # the constructed overlap, and only there


@pytest.mark.parametrize("ranks", [(4,) * 6, (4, 2, 4, 3, 4, 1)])
def test_probe_test_accepts_orthogonal_and_refuses_overlapping_bases(ranks):
    q = torch.linalg.qr(torch.randn(64, sum(ranks), generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0].float()
    bounds = [0, *torch.tensor(ranks).cumsum(0).tolist()]
    bases = [q[:, i:j] for i, j in zip(bounds, bounds[1:])]
    assert probably_orthogonal(bases, 1e-4)
    for overlap in (1e-3, 1e-2, 0.3):
        bent = list(bases)
        bent[4] = bent[4] + overlap * bent[2][:, :1]
        assert float(block_overlaps(bent).max()) > 1e-4
        assert not probably_orthogonal(bent, 1e-4)


def _bank(bases: list[torch.Tensor]) -> Bank:
    bank = Bank({"architecture": "sd15-tiny", "fingerprint": "x"})
    for i, b in enumerate(bases):
        bank.concepts.append(Concept(id=f"c{i}", token=f"<c{i}>", init_word="thing", rank=b.shape[1],
                                     method="seqlora", A={"unet.l": torch.ones(8, b.shape[1])},
                                     B={"unet.l": b}, embedding=torch.zeros(1, 16)))
    return bank


def _write_unchecked(bank, path):
    """Write a bank the reader refuses, as another tool could: ``Bank.save`` reads back what it
    writes and refuses to (issue 22 1b), so the loader's own refusal is tested on a raw file."""
    from safetensors.torch import save_file

    save_file(bank.tensors(), str(path), metadata=bank.metadata())


def test_loading_refuses_overlapping_bases_and_names_the_layer(tmp_path):
    bases = _bases(4)
    bases[2] = torch.linalg.qr((bases[2] + 0.01 * bases[0]).double())[0].float()
    _write_unchecked(_bank(bases), tmp_path / "bad.safetensors")
    with pytest.raises(BankError, match="overlap by .* on unet.l"):
        load_bank(tmp_path / "bad.safetensors")


def test_loading_refuses_non_finite_values(tmp_path):
    bank = _bank(_bases(3))
    bank.concepts[1].A["unet.l"] = torch.full((8, 4), float("nan"))
    _write_unchecked(bank, tmp_path / "nan.safetensors")
    with pytest.raises(BankError, match="'c1' layer unet.l holds non-finite"):
        load_bank(tmp_path / "nan.safetensors")


# -- cache by file identity ----------------------------------------------------------------------
def test_cached_load_follows_the_file_and_hands_out_own_objects(tmp_path):
    path = tmp_path / "bank.safetensors"
    bases = _bases(3)
    _bank(bases[:2]).save(path)
    first = load_bank(path)
    first.concepts.pop()  # a caller's change must not reach the next caller
    first.base["fingerprint"] = "changed"
    second = load_bank(path)
    assert [c.id for c in second.concepts] == ["c0", "c1"] and second.base["fingerprint"] == "x"
    _bank(bases).save(path)  # the file changes: the cache must notice
    assert [c.id for c in load_bank(path).concepts] == ["c0", "c1", "c2"]


# -- summary -------------------------------------------------------------------------------------
def test_summary_is_what_every_surface_shows(stream_bank):
    s = stream_bank.summary()
    assert [c["id"] for c in s["concepts"]] == [c.id for c in stream_bank.concepts]
    assert s["layers"] == stream_bank.layer_table()
    assert s["fullest"] == min(s["layers"], key=lambda r: r["capacity"] - r["used"])
    assert {w["width"] for w in s["widths"]} == {r["in_features"] for r in s["layers"]}
    for w in s["widths"]:
        rows = [r for r in s["layers"] if r["in_features"] == w["width"]]
        assert w["layers"] == len(rows) and w["capacity"] == min(r["capacity"] for r in rows)
    assert s["max_orthogonality_error"] == stream_bank.max_orthogonality_error() < 1e-5
