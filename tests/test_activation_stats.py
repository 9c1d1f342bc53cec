"""Activation statistics: the hook accumulator is exactly E[x xᵀ], trained concepts carry their
top eigenpairs, and they survive a save and load."""
import torch
from torch import nn

from seqlora_core.bank.format import load_bank
from seqlora_core.method.activation_stats import ActivationStats, low_rank_second_moment


def test_accumulator_is_the_uncentred_second_moment_and_respects_arming():
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    xs = [torch.randn(2, 5, 6) * torch.arange(1, 7), torch.randn(4, 6)]
    with ActivationStats({"l": layer}) as stats:
        for x in xs:
            layer(x)
        stats.armed = False
        layer(torch.randn(3, 6) * 100)  # not counted
    rows = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    expected = rows.T @ rows / rows.shape[0]
    assert torch.allclose(stats.second_moment("l"), expected, atol=1e-10)
    values, vectors = stats.top_eigenpairs(q=3)["l"]
    assert values.shape == (3,) and vectors.shape == (6, 3)
    assert bool((values[:-1] >= values[1:]).all())
    full = torch.linalg.eigvalsh(expected).flip(0)[:3]
    assert torch.allclose(values.double(), full, rtol=1e-5)
    assert torch.allclose(vectors.T @ vectors, torch.eye(3), atol=1e-5)
    # the hooks are gone after the block
    layer(torch.randn(1, 6))
    assert torch.allclose(stats.second_moment("l"), expected, atol=1e-10)


def test_low_rank_second_moment_keeps_the_top_eigenpairs():
    v = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64))[0]
    values = torch.tensor([3.0, 1.0], dtype=torch.float64)
    sigma = low_rank_second_moment((values.float(), v.float()), 5)
    assert torch.allclose(sigma @ v, v * values, atol=1e-5)
    assert torch.allclose(low_rank_second_moment(None, 4), torch.eye(4, dtype=torch.float64))


def test_trained_concepts_carry_statistics_through_the_file(stream_bank, tmp_path):
    path = tmp_path / "bank.safetensors"
    stream_bank.save(path)
    loaded = load_bank(path)
    for before, after in zip(stream_bank.concepts, loaded.concepts):
        assert before.stats is not None and set(before.stats) == set(before.B)
        for layer, (values, vectors) in after.stats.items():
            assert values.shape == (8,) and vectors.shape == (before.B[layer].shape[0], 8)
            assert torch.equal(values, before.stats[layer][0]) and torch.equal(vectors, before.stats[layer][1])
            assert float(values[0]) > 0 and bool((values[:-1] >= values[1:]).all())
        assert after.hash == before.hash
