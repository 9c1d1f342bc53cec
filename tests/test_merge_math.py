"""The rebase refit of a merge, checked against the formulas written out with full matrices."""
import torch

from seqlora_core.bank.format import Concept
from seqlora_core.bank.merge import rebase_concept
from seqlora_core.method.activation_stats import low_rank_second_moment


def _concept(m=10, n=5, r=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(200, m, generator=gen, dtype=torch.float64) * torch.linspace(3, 0.2, m, dtype=torch.float64)
    sigma = x.T @ x / 200
    values, vectors = torch.linalg.eigh(sigma)
    stats = {"l": (values.flip(0).float(), vectors.flip(1).float())}  # q = m: Σ̂ is Σ
    b = torch.linalg.qr(torch.randn(m, r, generator=gen))[0]
    a = torch.randn(n, r, generator=gen)
    c = Concept("x", "<x>", "", r, "seqlora", {"l": a}, {"l": b}, torch.zeros(1, 4), stats=stats)
    return c, low_rank_second_moment(stats["l"], m)


def test_rebase_is_orthogonal_and_the_refit_is_the_weighted_least_squares_optimum():
    c, sigma = _concept()
    kept = torch.linalg.qr(torch.randn(10, 3, generator=torch.Generator().manual_seed(1)))[0]
    new, change = rebase_concept(c, {"l": [kept]}, 1e-8)
    b_new, a_new = new.B["l"].double(), new.A["l"].double()
    assert (kept.double().T @ b_new).abs().max() < 1e-6
    assert torch.allclose(b_new.T @ b_new, torch.eye(2, dtype=torch.float64), atol=1e-6)
    delta = c.A["l"].double() @ c.B["l"].double().T
    expected = delta @ sigma @ b_new @ torch.linalg.inv(b_new.T @ sigma @ b_new)
    assert torch.allclose(a_new, expected, atol=1e-5)

    def err(a):
        d = delta - a @ b_new.T
        return float(torch.trace(d @ sigma @ d.T))

    norm = float(torch.trace(delta @ sigma @ delta.T))
    assert abs(change - (err(a_new) / norm) ** 0.5) < 1e-5
    for k in range(5):  # any other A on the same basis fits worse
        bump = torch.randn(a_new.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 1e-2
        assert err(a_new + bump) > err(a_new)
    assert new.hash != c.hash and 0 < change < 1


def test_rebase_against_nothing_keeps_the_residual():
    c, _ = _concept(seed=3)
    new, change = rebase_concept(c, {}, 1e-8)
    assert change < 1e-5
    assert torch.allclose(new.A["l"] @ new.B["l"].T, c.A["l"] @ c.B["l"].T, atol=1e-5)
