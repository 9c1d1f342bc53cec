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


def test_accumulating_reads_nothing_back_from_the_device(monkeypatch):
    """Issue 19 item 6a: the hooks used to call ``bool(torch.isfinite(gram).all())`` per layer and
    minibatch, a device sync each on a GPU. Every Python read-back of a tensor value is counted
    while the hooks run: there must be none; a non-finite pass still counts for nothing."""
    torch.manual_seed(0)
    layers = {f"l{i}": nn.Linear(4, 4) for i in range(3)}
    reads = []
    for method in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, method)

        def counting(self, *args, _original=original, _method=method, **kwargs):
            reads.append(_method)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, counting)
    xs = [torch.randn(3, 4) for _ in range(4)]
    with ActivationStats(layers) as stats:
        for x in xs:
            for layer in layers.values():
                layer(x)
        layers["l0"](torch.full((2, 4), float("inf")))  # an overflowed pass: skipped
    assert reads == []
    monkeypatch.undo()
    rows = torch.cat(xs).double()
    for name in layers:
        assert torch.allclose(stats.second_moment(name), rows.T @ rows / rows.shape[0], atol=1e-10)
