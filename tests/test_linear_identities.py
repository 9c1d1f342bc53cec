"""The paper's identities on small linear / two-layer problems, in float64 where exactness matters."""
import math

import pytest
import torch

from seqlora_core.method.bilevel import BilevelConfig, BilevelSolver, cross_hessian_vector_product
from seqlora_core.method.projector import NullSpaceProjector, normalised_overlap



pytestmark = pytest.mark.usefixtures("float64_by_default")  # exactness checks run in float64


def two_layer_problem(seed=0, n=5, m=6, r=2, N=7):
    """L(A, B) for a tanh network whose two linear layers both carry LoRA factors."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, m, generator=g)
    Y = torch.randn(N, n, generator=g)
    W1 = torch.randn(m, m, generator=g) / math.sqrt(m)
    W2 = torch.randn(n, m, generator=g) / math.sqrt(m)

    def loss(A, B, aux=()):
        h = torch.tanh(X @ W1.T + (X @ B[0]) @ A[0].T)
        out = h @ W2.T + (h @ B[1]) @ A[1].T
        return ((out - Y) ** 2).mean()

    A = [torch.randn(m, r, generator=g), torch.randn(n, r, generator=g)]
    B = [torch.randn(m, r, generator=g), torch.randn(m, r, generator=g)]
    return loss, A, B, g


def grad_b(loss, A, B):
    B = [b.detach().requires_grad_() for b in B]
    return torch.autograd.grad(loss(A, B), B)


def test_cross_hessian_product_matches_central_differences():
    loss, A, B, g = two_layer_problem()
    V = [torch.randn(a.shape, generator=g) for a in A]
    a = [t.clone().requires_grad_() for t in A]
    b = [t.clone().requires_grad_() for t in B]
    g_a = torch.autograd.grad(loss(a, b), a, create_graph=True)
    hvp = cross_hessian_vector_product(g_a, b, V)
    h = 1e-5
    plus = grad_b(loss, [x + h * v for x, v in zip(A, V)], B)
    minus = grad_b(loss, [x - h * v for x, v in zip(A, V)], B)
    fd = [(p - q) / (2 * h) for p, q in zip(plus, minus)]
    num = math.sqrt(sum(float(((x - y) ** 2).sum()) for x, y in zip(hvp, fd)))
    den = math.sqrt(sum(float((y ** 2).sum()) for y in fd))
    assert den > 1e-3  # the coupling is real, not a trivially zero term
    assert num / den < 1e-4


def f_of_b(loss, A, B, alpha, steps):
    """F(B) = L(A_T(B), B) with T plain gradient steps on A, evaluated without autograd of B."""
    a = [t.clone() for t in A]
    for _ in range(steps):
        ax = [t.detach().requires_grad_() for t in a]
        ga = torch.autograd.grad(loss(ax, B), ax)
        a = [t - alpha * gi for t, gi in zip(a, ga)]
    return float(loss(a, B))


@pytest.mark.parametrize("mode,steps", [("paper", 1), ("unrolled", 1), ("unrolled", 2)])
def test_hypergradient_is_the_derivative_of_the_reduced_objective(mode, steps):
    loss, A, B, g = two_layer_problem(seed=1)
    alpha = 0.05
    cfg = BilevelConfig(method="seqlora", inner_steps=steps, lr_a=alpha, lr_b=0.0,
                        optimizer="sgd", hypergradient=mode)
    solver = BilevelSolver(A, B, [], lambda x: list(x), cfg)
    grad_f, _, _ = solver.hypergradient(loss)
    D = [torch.randn(b.shape, generator=g) for b in B]
    h = 1e-5
    fd = (f_of_b(loss, A, [b + h * d for b, d in zip(B, D)], alpha, steps)
          - f_of_b(loss, A, [b - h * d for b, d in zip(B, D)], alpha, steps)) / (2 * h)
    analytic = sum(float((gf * d).sum()) for gf, d in zip(grad_f, D))
    assert abs(analytic - fd) / abs(fd) < 1e-4
    # and it is not the plain partial gradient: the cross-Hessian term matters
    a_plus = [t.clone() for t in A]
    for _ in range(steps):
        ax = [t.detach().requires_grad_() for t in a_plus]
        ga = torch.autograd.grad(loss(ax, B), ax)
        a_plus = [t - alpha * gi for t, gi in zip(a_plus, ga)]
    partial = sum(float((gb * d).sum()) for gb, d in zip(grad_b(loss, a_plus, B), D))
    assert abs(partial - fd) / abs(fd) > 1e-3


def test_forgetting_is_exactly_the_residual_covariance_energy():
    """With later bases orthogonal to B_i, output drift on concept i's inputs = tr(Δ Σ_res Δᵀ)."""
    g = torch.Generator().manual_seed(2)
    m, n, r, N = 12, 7, 3, 200
    proj = NullSpaceProjector(m, eps=0.0)
    B_i = proj.random_orthonormal(r, g).double()
    proj.append(B_i)
    X = torch.randn(N, m, generator=g) @ torch.randn(m, m, generator=g)  # concept i's inputs (rows)
    later = [(torch.randn(n, r, generator=g), proj.project(torch.randn(m, r, generator=g))) for _ in range(2)]
    delta = sum(a @ b.T for a, b in later)  # Δ = Σ_{j>i} A_j B_jᵀ, (n, m)
    drift = ((X @ delta.T) ** 2).sum(dim=1).mean()
    sigma = X.T @ X / N
    q, _ = torch.linalg.qr(B_i)
    outside = torch.eye(m) - q @ q.T
    sigma_res = outside @ sigma @ outside
    assert torch.allclose(drift, torch.trace(delta @ sigma_res @ delta.T), rtol=1e-10, atol=0)
    # the identity depends on orthogonality: a non-orthogonal later basis breaks it
    bad = torch.randn(n, r, generator=g) @ torch.randn(m, r, generator=g).T
    drift_bad = ((X @ bad.T) ** 2).sum(dim=1).mean()
    assert not torch.allclose(drift_bad, torch.trace(bad @ sigma_res @ bad.T), rtol=1e-3)


def _pca_problem(seed=3, m=16, r=3, k=4, N=400):
    g = torch.Generator().manual_seed(seed)
    variances = torch.linspace(4.0, 0.1, m)[torch.randperm(m, generator=g)]
    X = torch.randn(N, m, generator=g) * variances.sqrt()
    earlier = torch.zeros(m, k)
    earlier[torch.arange(k), torch.arange(k)] = 1.0  # the first k axes are taken
    proj = NullSpaceProjector(m, [earlier], eps=1e-8)

    def loss(A, B, aux=()):  # reconstruct the input through the adapter: Y = X
        return (((X @ B[0]) @ A[0].T - X) ** 2).sum(dim=1).mean()

    return X, proj, loss, g


def residual_energy(X, proj, B):
    free = proj.project(X.T).T  # compressed inputs P x
    q, _ = torch.linalg.qr(B)
    res = free - (free @ q) @ q.T
    return float((res ** 2).sum(dim=1).mean())


# Within 1 % of the optimum after 300 iterations, except seqlora with the ``paper``
# hypergradient (the default): under the trust-region inner steps of issue 17 it stays 2.6 %
# above it (13.15 against 12.82; 13.43 after 1000 iterations), where ``truncated`` reaches it.
# bilevel.py's D2 says why ``paper`` is the default all the same (it forgets less on the demo's
# stream); the margin here is the measured cost.
@pytest.mark.parametrize("method,hypergradient,within", [("seqlora", "truncated", 1.01), ("seqlora", "paper", 1.03),
                                                         ("alternating", "paper", 1.01)])
def test_learned_basis_leaves_less_residual_energy_than_a_random_frozen_one(method, hypergradient, within):
    X, proj, loss, g = _pca_problem()
    r = 3
    B0 = proj.random_orthonormal(r, g).double()
    A0 = torch.zeros(X.shape[1], r)
    cfg = BilevelConfig(method=method, inner_steps=2, lr_a=0.03, lr_b=0.03, optimizer="adam",
                        hypergradient=hypergradient)
    solver = BilevelSolver([A0], [B0], [], lambda v: [proj.project(t) for t in v], cfg)
    for _ in range(300):
        solver.iterate(loss)
    learned = residual_energy(X, proj, solver.b[0])
    random_frozen = residual_energy(X, proj, B0)
    sigma_free = proj.project(proj.project(X.T @ X / X.shape[0]).T)
    evals = torch.linalg.eigvalsh(sigma_free)
    optimum = float(evals[:-r].sum())  # energy left outside the top-r eigenspace
    assert learned < 0.8 * random_frozen
    assert learned < within * optimum  # it found the top-r eigenspace of the compressed covariance
    overlap = normalised_overlap(proj._basis, solver.b[0])
    assert overlap < 1e-7


def test_monotone_descent_with_steps_below_one_over_lipschitz():
    g = torch.Generator().manual_seed(4)
    n, m, r, N = 6, 8, 2, 50
    X = torch.randn(N, m, generator=g)
    Y = X @ torch.randn(m, n, generator=g) * 0.5

    def loss(A, B, aux=()):
        return 0.5 * (((X @ B[0]) @ A[0].T - Y) ** 2).sum() / N

    proj = NullSpaceProjector(m, [torch.randn(m, 2, generator=g)], eps=1e-8)
    B0 = proj.random_orthonormal(r, g).double()
    A0 = torch.zeros(n, r)
    # Hessian bound of ½‖Y − A BᵀX‖²/N in the region ‖A‖, ‖B‖ ≤ R: ‖X‖²(3R²)/N + ‖X‖‖Y‖/N
    x2 = float(torch.linalg.matrix_norm(X, 2)) ** 2 / N
    R = 4.0
    lip = x2 * 3 * R ** 2 + float(torch.linalg.matrix_norm(X, 2) * torch.linalg.matrix_norm(Y, 2)) / N
    alpha = 1.0 / lip
    beta = 1.0 / (4 * lip)  # the reduced objective's constant is larger (L_F ≤ L(1 + αL)²-ish)
    cfg = BilevelConfig(method="seqlora", inner_steps=2, lr_a=alpha, lr_b=beta, optimizer="sgd")
    solver = BilevelSolver([A0], [B0], [], lambda v: [proj.project(t) for t in v], cfg)
    values = [solver.iterate(loss).loss_before for _ in range(400)]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(values, values[1:]))
    assert values[-1] < 0.5 * values[0]
    assert float(solver.a[0].norm()) < R and float(solver.b[0].norm()) < R
