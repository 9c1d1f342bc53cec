"""Interference matrix and forecast on constructed linear problems (float64, exact where it can be)."""
import pytest
import torch

from seqlora_core.method.bilevel import BilevelConfig, BilevelSolver
from seqlora_core.method.interference import (forecast_exposure, interference_matrix, measured_exposure,
                                              moment_from_inputs, residual_energy)
from seqlora_core.method.projector import NullSpaceProjector

M, N_OUT, R, SAMPLES = 24, 10, 3, 500


pytestmark = pytest.mark.usefixtures("float64_by_default")  # exactness checks run in float64


def orthogonal_concepts(g, count=3, layers=("l1", "l2")):
    """Per layer, ``count`` bases taken from disjoint columns of one orthonormal matrix, random A."""
    factors = [{} for _ in range(count)]
    for layer in layers:
        q, _ = torch.linalg.qr(torch.randn(M, M, generator=g))
        for i in range(count):
            factors[i][layer] = (torch.randn(N_OUT, R, generator=g), q[:, i * R:(i + 1) * R])
    return factors


def confined_inputs(g, basis, leak_basis=None, leak=0.0):
    """Samples x = B c (inside span B), plus ``leak`` times a component along another basis."""
    x = torch.randn(SAMPLES, R, generator=g) @ basis.T
    if leak_basis is not None:
        x = x + leak * torch.randn(SAMPLES, leak_basis.shape[1], generator=g) @ leak_basis.T
    return x


def test_residual_energy_is_the_mean_squared_output_change():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, M, generator=g) @ torch.randn(M, M, generator=g)
    a, b = torch.randn(N_OUT, R, generator=g), torch.randn(M, R, generator=g)
    direct = float(((x @ b) @ a.T).pow(2).sum(dim=1).mean())
    assert residual_energy(a, b, moment_from_inputs(x)) == pytest.approx(direct, rel=1e-10)
    truncated = residual_energy(a, b, moment_from_inputs(x, q=4))
    assert 0 < truncated < direct  # top-4 directions only: part of the energy, never more


def test_orthogonal_concepts_with_confined_activations_do_not_interfere():
    g = torch.Generator().manual_seed(1)
    factors = orthogonal_concepts(g)
    stats = [{l: moment_from_inputs(confined_inputs(g, f[l][1])) for l in f} for f in factors]
    result = interference_matrix(["a", "b", "c"], factors, stats)
    for i, row in enumerate(result.matrix):
        for j, value in enumerate(row):
            if i == j:
                assert value is None
            else:
                assert abs(value) < 1e-12
    assert result.missing_stats == []


def test_interference_grows_with_the_overlap_of_activations():
    g = torch.Generator().manual_seed(2)
    factors = orthogonal_concepts(g, count=2, layers=("l1",))
    b0, b1 = factors[0]["l1"][1], factors[1]["l1"][1]
    values = []
    for leak in (0.0, 0.05, 0.2, 0.5, 1.0):
        gen = torch.Generator().manual_seed(3)  # same samples, only the leak changes
        stats = [{"l1": moment_from_inputs(confined_inputs(gen, b0, b1, leak))},
                 {"l1": moment_from_inputs(confined_inputs(gen, b1))}]
        result = interference_matrix(["a", "b"], factors, stats)
        values.append(result.matrix[0][1])
        assert abs(result.matrix[1][0]) < 1e-12  # b's inputs stay confined: a never disturbs b
    assert values[0] < 1e-12
    assert all(later > earlier * 1.5 for earlier, later in zip(values, values[1:]))
    # the per-layer shares add up to the matrix, and the worst layer is named with its pair
    assert result.layers["l1"][0][1] == pytest.approx(result.matrix[0][1])
    assert result.worst_layers(1)[0][:1] == ("l1",) and result.worst_layers(1)[0][2:] == ("a", "b")


def test_concept_without_statistics_is_reported_not_guessed():
    g = torch.Generator().manual_seed(4)
    factors = orthogonal_concepts(g, count=2)
    stats = [None, {l: moment_from_inputs(confined_inputs(g, factors[1][l][1])) for l in factors[1]}]
    result = interference_matrix(["old", "new"], factors, stats)
    assert result.missing_stats == ["old"]
    assert result.matrix[0] == [None, None]
    assert result.matrix[1][0] is not None


def anisotropic_inputs(g, scale_seed):
    gen = torch.Generator().manual_seed(scale_seed)
    variances = torch.logspace(1, -2, M)[torch.randperm(M, generator=gen)]
    return torch.randn(SAMPLES, M, generator=g) * variances.sqrt()


def test_forecast_bound_is_attained_by_the_worst_basis_and_respected_by_others():
    g = torch.Generator().manual_seed(5)
    earlier = NullSpaceProjector(M, [torch.linalg.qr(torch.randn(M, 2 * R, generator=g))[0]], eps=0.0)
    stats_i = {"l": moment_from_inputs(anisotropic_inputs(g, 7))}
    new_stats = {"l": moment_from_inputs(anisotropic_inputs(g, 8))}
    fc = forecast_exposure(["i"], [stats_i], {"l": earlier}, new_stats, R)
    assert 0 < fc.bound[0] <= fc.free[0] < 1  # the earlier bases hide part of i's energy
    assert fc.expected[0] <= fc.bound[0] + 1e-12
    # the worst case: basis on the top-r eigenvectors of P Σ_i P, unit singular values
    root = earlier.project(stats_i["l"][1] * stats_i["l"][0].sqrt())
    worst_b = torch.linalg.svd(root, full_matrices=False)[0][:, :R]
    worst_a = torch.linalg.qr(torch.randn(N_OUT, R, generator=g))[0]
    assert measured_exposure({"l": (worst_a, worst_b)}, stats_i) == pytest.approx(fc.bound[0], rel=1e-9)
    for _ in range(20):  # any other rank-r residual in the free space stays below it
        a = torch.randn(N_OUT, R, generator=g)
        b = earlier.project(torch.randn(M, R, generator=g))
        assert measured_exposure({"l": (a, b)}, stats_i) <= fc.bound[0] + 1e-12


def test_forecast_bounds_the_measured_exposure_of_a_trained_linear_layer():
    """Train a new concept on a linear layer with SeqLoRA; its measured exposure of each earlier
    concept's activations never exceeds the forecast made before training."""
    g = torch.Generator().manual_seed(6)
    bases = torch.linalg.qr(torch.randn(M, 2 * R, generator=g))[0]
    earlier_b = [bases[:, :R], bases[:, R:]]
    projector = NullSpaceProjector(M, earlier_b, eps=1e-8)
    earlier_x = [anisotropic_inputs(g, 10 + k) for k in range(2)]
    stats = [{"l": moment_from_inputs(x, q=8)} for x in earlier_x]  # truncated, as the bank stores them
    x_new = anisotropic_inputs(g, 20) + earlier_x[0][:, :] * 0.5  # the new concept resembles the first
    y_new = x_new @ torch.randn(M, N_OUT, generator=g)
    fc = forecast_exposure(["c0", "c1"], stats, {"l": projector}, {"l": moment_from_inputs(x_new, q=8)}, R)

    def loss(A, B, aux=()):
        return (((x_new @ B[0]) @ A[0].T - y_new) ** 2).sum(dim=1).mean()

    cfg = BilevelConfig(method="seqlora", inner_steps=2, lr_a=0.02, lr_b=0.02, optimizer="adam")
    solver = BilevelSolver([torch.zeros(N_OUT, R)], [projector.random_orthonormal(R, g).double()], [],
                           lambda v: [projector.project(t) for t in v], cfg)
    first = float(loss(solver.a, solver.b))
    for _ in range(150):
        solver.iterate(loss)
    assert float(loss(solver.a, solver.b)) < 0.7 * first  # it did learn
    trained = {"l": (solver.a[0].detach(), solver.b[0].detach())}
    for k in range(2):
        measured = measured_exposure(trained, stats[k])
        assert 0 < measured <= fc.bound[k] + 1e-9
    # an unconstrained basis on the same layer is not held by the constrained forecast
    free_b = torch.linalg.svd(stats[0]["l"][1] * stats[0]["l"][0].sqrt(), full_matrices=False)[0][:, :R]
    assert measured_exposure({"l": (torch.eye(N_OUT, R), free_b)}, stats[0]) > fc.bound[0]
