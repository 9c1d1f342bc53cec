"""The import's per-layer refit (linalg.lowrank_fit): exact identities on one linear layer."""
import pytest
import torch

from seqlora_core.linalg.lowrank_fit import fit_layer
from seqlora_core.linalg.moments import low_rank_second_moment
from seqlora_core.linalg.projector import NullSpaceProjector


def _lora(n=24, m=32, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g), torch.randn(r, m, generator=g)


def _earlier(m=32, k=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


def _stats(m=32, q=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    vecs = torch.linalg.qr(torch.randn(m, q, generator=g, dtype=torch.float64))[0]
    values = torch.linspace(5.0, 0.5, q, dtype=torch.float64)
    return values.float(), vecs.float()


def _sigma_norm2(x, stats, m=32):
    sigma = low_rank_second_moment(stats, m) if stats is not None else torch.eye(m, dtype=torch.float64)
    x = x.to(torch.float64)
    return float(torch.trace(x @ sigma @ x.T))


def test_free_bank_and_enough_rank_give_the_lora_back():
    up, down = _lora()
    fit = fit_layer(up, down, 0.75, NullSpaceProjector(32), rank=4)
    assert torch.allclose(fit.a.double() @ fit.b.double().T, 0.75 * up.double() @ down.double(), atol=1e-5)
    assert torch.allclose(fit.b.T @ fit.b, torch.eye(4), atol=1e-6)
    assert fit.lost < 1e-10


def test_loss_is_the_energy_outside_the_free_space_and_b_stays_free():
    up, down = _lora()
    earlier = _earlier()
    projector = NullSpaceProjector(32, [earlier])
    fit = fit_layer(up, down, 1.0, projector, rank=4)
    dw = up.double() @ down.double()
    outside = dw @ earlier @ earlier.T  # ΔW (I − P)
    assert fit.lost_rank < 1e-9 * fit.energy
    assert fit.lost_projection / fit.energy == pytest.approx(float(outside.norm() ** 2 / dw.norm() ** 2), rel=1e-6)
    assert float((earlier.T @ fit.b.double()).norm()) < 1e-6
    # the kept part is exactly ΔW P
    assert torch.allclose(fit.a.double() @ fit.b.double().T, dw - outside, atol=1e-4)


def test_rank_cut_keeps_the_top_singular_directions():
    up, down = _lora(r=8)
    fit = fit_layer(up, down, 1.0, NullSpaceProjector(32), rank=3)
    dw = up.double() @ down.double()
    s = torch.linalg.svdvals(dw)
    assert fit.lost_rank == pytest.approx(float((s[3:] ** 2).sum()), rel=1e-6)
    assert float((dw - fit.a.double() @ fit.b.double().T).norm() ** 2) == pytest.approx(fit.lost_rank, rel=1e-5)


def test_weighted_fit_reports_its_whole_error_and_beats_the_plain_one_on_its_inputs():
    up, down = _lora(r=8)
    stats = _stats()
    projector = NullSpaceProjector(32, [_earlier(k=4)])
    weighted = fit_layer(up, down, 1.0, projector, rank=3, stats=stats)
    plain = fit_layer(up, down, 1.0, projector, rank=3)
    dw = up.double() @ down.double()
    err_w = _sigma_norm2(dw - weighted.a.double() @ weighted.b.double().T, stats)
    err_p = _sigma_norm2(dw - plain.a.double() @ plain.b.double().T, stats)
    assert weighted.energy == pytest.approx(_sigma_norm2(dw, stats), rel=1e-6)
    assert err_w == pytest.approx(weighted.lost_projection + weighted.lost_rank, rel=1e-5)
    assert err_w <= err_p * (1 + 1e-9)
    assert weighted.weighted and not plain.weighted


def test_lower_rank_lora_is_padded_with_free_directions_and_zero_a():
    up, down = _lora(r=2)
    earlier = _earlier()
    fit = fit_layer(up, down, 1.0, NullSpaceProjector(32, [earlier]), rank=4)
    assert fit.b.shape == (32, 4) and fit.a.shape == (24, 4)
    assert torch.allclose(fit.b.T @ fit.b, torch.eye(4), atol=1e-6)
    assert float((earlier.T @ fit.b.double()).norm()) < 1e-6


def test_a_full_layer_is_refused():
    up, down = _lora(m=8)
    with pytest.raises(ValueError, match="free input dimensions"):
        fit_layer(up, down, 1.0, NullSpaceProjector(8, [_earlier(m=8, k=6)]), rank=4)
