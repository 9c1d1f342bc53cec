"""One bilevel iteration of SeqLoRA and of the baselines, on any differentiable loss L(A, B).

Notation (DESIGN.md §3): A = the output-side factors of every adapted layer (lists of n × r
tensors), B = the input-side bases (lists of m × r), P = the null-space projection of each layer.
One SeqLoRA iteration on a fixed minibatch (so that L is one deterministic function):

1. inner steps  A⁺ = A − D ⊙ ∇_A L(A, B)   (T of them; D = α for SGD, Adam's α/√v̂ otherwise,
   held constant so the step is linear in the gradient);
2. reduced objective F(B) = L(A⁺(B), B);
3. hypergradient  ∇F(B) = ∇_B L(A⁺, B) − H_BA(A, B)[D ⊙ ∇_A L(A⁺, B)], the cross-Hessian
   product taken by double backward through the first inner step's graph (``hypergradient =
   "paper"``, the paper's formula: the Jacobian of the first inner step), or by back-propagating
   through all T unrolled inner steps (``"unrolled"``: the exact gradient of the T-step F);
   both coincide for T = 1;
4. projected upper step  B ← B − P·step(P ∇F(B));
5. A step  A ← A⁺ − step(∇_A L(A⁺, B_new)); auxiliary parameters (the concept's token
   embedding) take their plain gradient step in this same pass.

``alternating`` is the paper's Continual Alternating (steps 1, 4 with ∇_B L(A⁺, B), 5: no
cross-Hessian); ``frozen-basis`` (Orthogonal Adaptation) keeps B fixed and takes T + 1 A steps;
``lora`` takes T + 1 unconstrained joint steps (for comparison only).

Only the pass that needs a second derivative runs inside ``differentiable_context`` (the host's
attention path with double backward); every other pass keeps the host's fast kernels.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..settings import METHODS

# L(A, B, aux) -> scalar loss; each argument a list of tensors
LossFn = Callable[[Sequence[Tensor], Sequence[Tensor], Sequence[Tensor]], Tensor]
Projection = Callable[[Sequence[Tensor]], list[Tensor]]



@dataclass
class BilevelConfig:
    method: str = "seqlora"
    inner_steps: int = 2  # T
    lr_a: float = 1e-3  # α
    lr_b: float = 1e-3  # β
    lr_aux: float = 5e-3  # token embedding
    optimizer: str = "adam"  # "adam" or "sgd" (the paper's plain steps)
    hypergradient: str = "paper"  # "paper" or "unrolled"
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError("optimizer must be adam or sgd")
        if self.hypergradient not in ("paper", "unrolled"):
            raise ValueError("hypergradient must be paper or unrolled")
        if self.inner_steps < 1:
            raise ValueError("inner steps must be at least 1")


class FactorOptimizer:
    """Plain SGD or Adam over a list of tensors, returning steps instead of applying them.

    Returning the step lets the caller project it (B) or keep it differentiable (inner A steps).
    """

    def __init__(self, like: Sequence[Tensor], lr: float, kind: str, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.kind, self.betas, self.eps = lr, kind, betas, eps
        self.t = 0
        self.inner_alpha: list[Tensor] | None = None
        self.m = [torch.zeros_like(p, dtype=torch.float32) for p in like]
        self.v = [torch.zeros_like(p, dtype=torch.float32) for p in like]

    def preconditioner(self, grads: Sequence[Tensor]) -> list[Tensor] | float:
        """The inner step size D (inner step = D · g), a constant: no graph, no state change.

        SGD: D = α. Adam: one scalar per tensor, α / RMS(g) from the *first* gradient this
        optimiser saw, then held fixed for the whole concept. The inner steps are thus plain
        gradient steps, linear in ∇_A L as the hypergradient formula requires, with a step size
        calibrated once to the layer's gradient scale (the theory's fixed α). An elementwise or
        re-normalised step would make the effective α explode as gradients shrink.
        """
        if self.kind == "sgd":
            return self.lr
        if self.inner_alpha is None:
            self.inner_alpha = [self.lr / (g.detach().float().pow(2).mean().sqrt() + self.eps)
                                for g in grads]
        return self.inner_alpha

    def step(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """The update to subtract, advancing the optimiser state."""
        if self.kind == "sgd":
            return [self.lr * g for g in grads]
        self.t += 1
        b1, b2 = self.betas
        out = []
        for m, v, g in zip(self.m, self.v, grads):
            g = g.detach().float()
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = m / (1 - b1 ** self.t)
            v_hat = v / (1 - b2 ** self.t)
            out.append(self.lr * m_hat / (v_hat.sqrt() + self.eps))
        return out


def _scaled(d: list[Tensor] | float, g: Sequence[Tensor]) -> list[Tensor]:
    return [(d if isinstance(d, float) else d[i]) * gi for i, gi in enumerate(g)]


def _leaves(ts: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach().requires_grad_(True) for t in ts]


def cross_hessian_vector_product(grad_a: Sequence[Tensor], b: Sequence[Tensor],
                                 v: Sequence[Tensor]) -> list[Tensor]:
    """H_BA[V] = ∂/∂B ⟨∇_A L, V⟩ by double backward; ``grad_a`` must carry its graph."""
    out = torch.autograd.grad(grad_a, b, grad_outputs=list(v), allow_unused=True)
    return [torch.zeros_like(bi) if o is None else o for o, bi in zip(out, b)]


@dataclass
class IterationResult:
    loss_before: float  # L(A, B) at the start of the iteration
    loss: float  # L at the last pass of the iteration


class BilevelSolver:
    """Holds one concept's factors and optimiser state; ``iterate`` runs one bilevel iteration."""

    def __init__(self, a: Sequence[Tensor], b: Sequence[Tensor], aux: Sequence[Tensor],
                 project: Projection, config: BilevelConfig,
                 differentiable_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.a = [t.detach().clone() for t in a]
        self.b = [t.detach().clone() for t in b]
        self.aux = [t.detach().clone() for t in aux]
        self.project = project
        self.cfg = config
        self.differentiable_context = differentiable_context
        self.opt_a = FactorOptimizer(self.a, config.lr_a, config.optimizer, config.betas, config.adam_eps)
        self.opt_b = FactorOptimizer(self.b, config.lr_b, config.optimizer, config.betas, config.adam_eps)
        self.opt_aux = FactorOptimizer(self.aux, config.lr_aux, config.optimizer, config.betas, config.adam_eps)

    # -- passes ------------------------------------------------------------------------------
    def _grads(self, loss_fn: LossFn, a, b, aux, wrt: str) -> tuple[float, list[Tensor]]:
        """One forward and backward; ``wrt`` picks the gradient blocks among 'a', 'b', 'x'."""
        a = _leaves(a) if "a" in wrt else [t.detach() for t in a]
        b = _leaves(b) if "b" in wrt else [t.detach() for t in b]
        aux = _leaves(aux) if "x" in wrt else [t.detach() for t in aux]
        loss = loss_fn(a, b, aux)
        targets = (a if "a" in wrt else []) + (b if "b" in wrt else []) + (aux if "x" in wrt else [])
        grads = torch.autograd.grad(loss, targets, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, targets)]
        return float(loss.detach()), grads

    def _inner_plain(self, loss_fn: LossFn, a: list[Tensor], steps: int) -> tuple[list[Tensor], float | None]:
        first = None
        for _ in range(steps):
            loss, g_a = self._grads(loss_fn, a, self.b, self.aux, "a")
            first = loss if first is None else first
            d = self.opt_a.preconditioner(g_a)
            a = [ai - si for ai, si in zip(a, _scaled(d, g_a))]
        return a, first

    def _a_step(self, loss_fn: LossFn, a: list[Tensor]) -> float:
        """Step 5 (and the token embedding's step)."""
        n = len(a)
        loss, g = self._grads(loss_fn, a, self.b, self.aux, "ax")
        self.a = [ai - si for ai, si in zip(a, self.opt_a.step(g[:n]))]
        if self.aux:
            self.aux = [xi - si for xi, si in zip(self.aux, self.opt_aux.step(g[n:]))]
        return loss

    def _b_step(self, grad_b: Sequence[Tensor]) -> None:
        step = self.opt_b.step(self.project(grad_b))
        self.b = [bi - si for bi, si in zip(self.b, self.project(step))]

    # -- methods -----------------------------------------------------------------------------
    def iterate(self, loss_fn: LossFn) -> IterationResult:
        method = self.cfg.method
        if method == "seqlora":
            return self._seqlora(loss_fn)
        if method == "alternating":
            a_plus, first = self._inner_plain(loss_fn, self.a, self.cfg.inner_steps)
            _, g_b = self._grads(loss_fn, a_plus, self.b, self.aux, "b")
            self._b_step(g_b)
            return IterationResult(first, self._a_step(loss_fn, a_plus))
        if method == "frozen-basis":
            a_plus, first = self._inner_plain(loss_fn, self.a, self.cfg.inner_steps)
            return IterationResult(first, self._a_step(loss_fn, a_plus))
        # lora: unconstrained joint steps
        first = None
        for _ in range(self.cfg.inner_steps + 1):
            n = len(self.a)
            loss, g = self._grads(loss_fn, self.a, self.b, self.aux, "abx")
            first = loss if first is None else first
            self.a = [ai - si for ai, si in zip(self.a, self.opt_a.step(g[:n]))]
            self.b = [bi - si for bi, si in zip(self.b, self.opt_b.step(g[n:2 * n]))]
            if self.aux:
                self.aux = [xi - si for xi, si in zip(self.aux, self.opt_aux.step(g[2 * n:]))]
        return IterationResult(first, loss)

    def hypergradient(self, loss_fn: LossFn) -> tuple[list[Tensor], list[Tensor], float]:
        """(∇F(B), A⁺, L(A, B)) for the current (A, B): steps 1–3."""
        t_steps = self.cfg.inner_steps
        aux = [t.detach() for t in self.aux]
        a0 = _leaves(self.a)
        b = _leaves(self.b)
        with self.differentiable_context():
            loss0 = loss_fn(a0, b, aux)
            g_a0 = torch.autograd.grad(loss0, a0, create_graph=True)
        d0 = self.opt_a.preconditioner(g_a0)
        if self.cfg.hypergradient == "unrolled":
            a = [ai - si for ai, si in zip(a0, _scaled(d0, g_a0))]
            for _ in range(t_steps - 1):
                with self.differentiable_context():
                    g_a = torch.autograd.grad(loss_fn(a, b, aux), a, create_graph=True)
                d = self.opt_a.preconditioner(g_a)
                a = [ai - si for ai, si in zip(a, _scaled(d, g_a))]
            loss_f = loss_fn(a, b, aux)
            grad_f = torch.autograd.grad(loss_f, b, allow_unused=True)
            grad_f = [torch.zeros_like(bi) if g is None else g for g, bi in zip(grad_f, b)]
            return grad_f, [ai.detach() for ai in a], float(loss0.detach())
        a1 = [ai.detach() - si.detach() for ai, si in zip(a0, _scaled(d0, g_a0))]
        a_plus, _ = self._inner_plain(loss_fn, a1, t_steps - 1)
        _, g = self._grads(loss_fn, a_plus, self.b, self.aux, "ab")
        n = len(a_plus)
        g_a_plus, g_b_plus = g[:n], g[n:]
        hvp = cross_hessian_vector_product(g_a0, b, _scaled(d0, g_a_plus))
        grad_f = [gb - h for gb, h in zip(g_b_plus, hvp)]
        return grad_f, a_plus, float(loss0.detach())

    def _seqlora(self, loss_fn: LossFn) -> IterationResult:
        grad_f, a_plus, loss0 = self.hypergradient(loss_fn)
        self._b_step(grad_f)
        return IterationResult(loss0, self._a_step(loss_fn, a_plus))


def is_finite(ts: Sequence[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)
