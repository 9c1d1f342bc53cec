"""The batched steps and the low-memory order compute what the plain formulas compute."""
import pytest
import torch

from seqlora_core.errors import InputError
from seqlora_core.hosts.diffusers_host import resolve_dtype
from seqlora_core.method.bilevel import BilevelConfig, BilevelSolver, StepRule

from test_linear_identities import two_layer_problem

pytestmark = pytest.mark.usefixtures("float64_by_default")  # exactness checks run in float64


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_low_memory_order_gives_the_same_iterations(optimizer):
    """D6: building the twice-differentiated graph after A⁺ changes memory, not the result."""
    loss, A, B, _ = two_layer_problem(seed=5)
    runs = []
    for low_memory in (False, True):
        cfg = BilevelConfig(method="seqlora", inner_steps=2, lr_a=0.05, lr_b=0.05, optimizer=optimizer,
                            low_memory=low_memory)
        solver = BilevelSolver(A, B, [], lambda v: list(v), cfg)
        grad_f, a_plus, loss_before = solver.hypergradient(loss)
        for _ in range(3):
            solver.iterate(loss)
        runs.append((grad_f, a_plus, loss_before, solver.a, solver.b))
    for x, y in zip(runs[0], runs[1]):
        x, y = (x, y) if isinstance(x, list) else ([x], [y])
        assert all(torch.allclose(p, q, rtol=1e-10, atol=1e-12) for p, q in zip(x, y))
    assert not torch.allclose(runs[0][4][0], B[0])  # B moved: the comparison is not vacuous


def test_batched_adam_matches_torch_adam():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(7, 3, generator=g), torch.randn(4, 2, generator=g)]
    ours = [p.clone() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    rule = StepRule(ours, lr=0.01, kind="adam")
    opt = torch.optim.Adam(theirs, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        ours = [p - s for p, s in zip(ours, rule.step(grads))]
        for p, gr in zip(theirs, grads):
            p.grad = gr.clone()
        opt.step()
    assert all(torch.allclose(p, q.detach(), rtol=1e-12, atol=1e-14) for p, q in zip(ours, theirs))


def test_model_dtype_defaults_and_names():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(InputError, match="dtype must be"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_frozen_parameters_turns_weight_gradients_off_and_restores_them():
    from seqlora_core.hosts.protocol import frozen_parameters

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    x = torch.randn(5, 3, requires_grad=True)
    with frozen_parameters(model):
        assert not any(p.requires_grad for p in model.parameters())
        (g,) = torch.autograd.grad(model(x).sum(), x)  # gradients to inputs still flow
        assert torch.isfinite(g).all()
    assert [p.requires_grad for p in model.parameters()] == before


def test_batched_projection_equals_each_layers_projection():
    from seqlora_core.method.projector import BatchedProjection, NullSpaceProjector

    g = torch.Generator().manual_seed(1)
    projectors = [NullSpaceProjector(12, [torch.randn(12, 3, generator=g)]) for _ in range(3)]
    projectors.append(NullSpaceProjector(12, [torch.randn(12, 3, generator=g), torch.randn(12, 3, generator=g)]))
    # inside a lease (bank.projector of a lease file): the block U alone (its first concept),
    # twice so that they share a batch, and U with an earlier concept of the lease inside span(U)
    blocks = [torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))[0] for _ in range(3)]
    projectors += [NullSpaceProjector(12, within=u) for u in blocks[:2]]
    projectors.append(NullSpaceProjector(12, [blocks[2] @ torch.randn(6, 2, generator=g, dtype=torch.float64)],
                                         within=blocks[2]))
    projectors.append(NullSpaceProjector(8))  # an empty layer: P = I
    vs = [torch.randn(p.in_features, 2, generator=g, dtype=torch.float32) for p in projectors]
    batched = BatchedProjection(projectors)(vs)
    for p, v, out in zip(projectors, vs, batched):
        assert out.dtype == v.dtype and torch.allclose(out, p.project(v), atol=1e-6, rtol=0)
    assert not torch.allclose(batched[0], vs[0])  # the projection does something
    assert torch.equal(batched[-1], vs[-1])
    for u, out in zip(blocks, batched[4:7]):  # the lease's projections stay in its block
        assert float((out.double() - u @ (u.T @ out.double())).norm()) < 1e-6 * float(out.norm())
    leased = batched[6].double()  # and off the lease's earlier concept
    assert float((projectors[6]._basis.T @ leased).norm()) < 1e-6 * float(leased.norm())
