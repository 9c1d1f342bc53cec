"""One bilevel iteration of SeqLoRA, and of the baselines, on any loss L(A, B, embedding).

Read this beside DESIGN.md §3. ``a`` and ``b`` are lists with one tensor per adapted layer
(A: n × r, B: m × r); ``embedding`` is the concept token's vectors (learned with A, textual
inversion style); ``alpha`` is the inner step size α; ``project`` applies each layer's null-space
projector P. One iteration runs on one fixed minibatch, so L is one deterministic function.

SeqLoRA (``BilevelSolver.seqlora_iteration``), DESIGN §3 step by step:

  1.   ``inner_steps``             A⁺ = A − α ∇_A L(A, B), T times
  2–3. ``hypergradient_one_step`` ∇F(B) = ∇_B L(A⁺, B) − H_BA(A, B)[α ∇_A L(A⁺, B)], the
                                   product by double backward (``cross_hessian_vector_product``);
                                   ``truncated`` (option): the same with H_BA taken at A_{T−1}
       ``hypergradient_unrolled``  (option) back-propagate through all T inner steps instead
  4.   ``projected_b_step``        B ← B − P·step(P ∇F(B))
  5.   ``a_step``                  A ← A⁺ − step(∇_A L(A⁺, B_new)); the embedding steps here too

Baselines: ``alternating_iteration`` (the paper's Continual Alternating: steps 1, 4 with the
plain ∇_B L(A⁺, B), 5), ``frozen_basis_iteration`` (Orthogonal Adaptation: 1 and 5, B fixed),
``lora_iteration`` (T + 1 joint unconstrained steps; comparison only).

Deviations from DESIGN §3, and why (figures: ``python bench/deviations.py``, float64 toy problems;
``python bench/stability.py``, the demo's stream on ``tiny``)
--------------------------------------------------------------------------
D1 Step 5 starts from A⁺, not from A, so T + 1 A steps are committed per iteration. DESIGN's
   ``A ← A − α∇_A L(A, B_new)`` throws the T inner steps away and moves A by one step per
   iteration. Measured after 100 iterations (defaults: trust-region rule, paper hypergradient):
   two-layer problem L 0.763 (ours) vs 0.801 (DESIGN); covariance problem 21.47 vs 21.04 (there
   DESIGN's is better). Kept: since issue 17 every inner step is inside the trust region of D3,
   so committing them moves A by at most (T + 1)·lr_a RMS per iteration — what unconstrained
   LoRA's T + 1 Adam steps do — and it multiplies no divergence any more (before issue 17 it did).
   ``a_start="a"`` gives DESIGN's step.
D2 ``paper`` (default) takes the cross-Hessian at A_0, as the paper's formula does;
   ``truncated`` back-propagates through the last inner step only, ∇_B L(A_T, B) −
   H_BA(A_{T−1}, B)[α ∇_A L(A_T, B)], the standard truncation. Same passes, same cost; both exact
   at T = 1; for T ≥ 2 neither is the derivative of the T-step F(B). Median relative error of
   the directional derivative against finite differences on the two-layer problem, T = 2:
   α = 0.05 truncated 0.42, paper 1.23; α = 0.2 truncated 0.84, paper 0.63 (``unrolled``: 5e-9).
   On the toy problems truncated trains better (after 200 iterations L 0.623 truncated, 0.670
   paper, 0.621 unrolled on the two-layer problem; 20.87, 21.24, 20.88 on the covariance
   problem), but on the demo's stream (4 concepts, seeds 0 and 1 × 1 and 2 threads) paper
   disturbs earlier concepts less: mean |forgetting| 0.018 ± 0.005 (paper), 0.034 ± 0.009
   (truncated), 0.023 ± 0.009 (unconstrained LoRA), drift 0.67 / 0.68 / 0.74, at an own loss
   0.966 / 0.949 / 0.973. Not interfering is what SeqLoRA is for, so paper stays the default.
   Its measured cost: on the covariance problem of ``tests/test_linear_identities.py`` seqlora
   with paper stays 2.6 % above the top-r optimum after 300 iterations (truncated reaches it).
   ``unrolled`` costs T twice-differentiated passes and holds all their graphs at once.
D3 With Adam the inner step is A − α ∇_A L with, per layer, α = lr_a / RMS(√v̂): Adam's step
   size from its second moment v with the iteration's first gradient folded in, shrunk for each
   inner step so that the step's RMS per element is at most lr_a (a trust region the size of the
   Adam step it stands for). Both factors are held constant in the hypergradient, so the step
   stays linear in ∇_A L as the formula needs. The cross-Hessian product's vector α ∇_A L(A⁺) is
   held to the same radius (a layer whose gradient at A was ~0 has a huge α; in fp16 that term
   overflowed and the first iteration was skipped). Why: the rule before issue 17 fixed α = lr_a /
   RMS of the concept's *first* gradient for the whole training; a layer whose first gradient
   was tiny (B starting where the inputs had little energy) got α up to 9,100, and once the
   hypergradient turned B towards the data the fixed α overshot — on the demo's stream the
   largest |A·Bᵀ| entry was 12 – 388 over seeds and thread counts (9.9e4 in the issue, beyond
   fp16), chaotic between 1 and 2 threads. Now 0.59 – 0.75 against unconstrained LoRA's
   0.83 – 1.35 on the same streams, seconds per concept unchanged (``bench/stability.py``). An
   element-wise Adam diagonal (lr / (√v̂ + ε) per entry) was tried first: entries whose first
   gradient was ~1e-8 got α ≈ 2e5 and the second inner step moved them by 32. The price on the
   covariance problem: L after 200 iterations 21.24 (trust region) vs 20.87 (calibrated once)
   vs 22.15 (α from each iteration's gradient alone, a normalised step that does not shrink near
   a minimum). SGD uses α = lr_a (the paper's plain steps, no trust region).
D4 The committed steps (4, 5) may be Adam steps; B's is projected before and after Adam, so B
   never leaves the free space. ``optimizer="sgd"`` gives the paper's plain steps.
D5 Precision (``precision.py``): gradients of a fp16 model are taken of a scaled loss; a
   commit (the B step or the A step) whose gradients are not finite is skipped and counted in
   ``skipped_steps``, and the scale is halved — a half-precision overflow is not divergence.
D6 ``low_memory`` (truncated and paper hypergradients) takes every inner step from a plain pass
   and builds the twice-differentiated graph — at (A_{T−1}, B) or (A, B) — only after A⁺ is
   known, so it is never held while other passes run: one extra plain pass for a lower peak.

Only the twice-differentiated pass runs inside ``differentiable_context`` (the host's attention
kernel with double backward, fp32 normalisation for half models); every other pass keeps the
host's fast kernels. No pass reads a value back to the host except the one finiteness check per
commit.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..settings import METHODS
from .precision import LossScale, all_finite

# L(a, b, embedding) -> scalar loss; each argument a list of tensors
LossFn = Callable[[Sequence[Tensor], Sequence[Tensor], Sequence[Tensor]], Tensor]
Projection = Callable[[Sequence[Tensor]], list[Tensor]]
StepSize = float | list[Tensor]  # α: one float (SGD), or per layer a tensor shaped like A (Adam, D3)
HYPERGRADIENTS = ("truncated", "paper", "unrolled")
INNER_RULES = ("trust-region", "calibrated-once")


@dataclass
class BilevelConfig:
    method: str = "seqlora"
    inner_steps: int = 2  # T
    lr_a: float = 1e-3  # α (SGD) / Adam's step for A
    lr_b: float = 1e-3  # β
    lr_embedding: float = 5e-3  # the concept token's embedding
    optimizer: str = "adam"  # "adam" or "sgd" (the paper's plain steps)
    hypergradient: str = "paper"  # "paper", "truncated" or "unrolled" (D2)
    low_memory: bool = False  # D6
    inner_rule: str = "trust-region"  # D3 (Adam only): "trust-region", or "calibrated-once" (before issue 17)
    a_start: str = "a-plus"  # D1: step 5 from A⁺ ("a-plus") or from A ("a", DESIGN as written)
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError("optimizer must be adam or sgd")
        if self.hypergradient not in HYPERGRADIENTS:
            raise ValueError(f"hypergradient must be one of {', '.join(HYPERGRADIENTS)}")
        if self.inner_rule not in INNER_RULES:
            raise ValueError(f"inner_rule must be one of {', '.join(INNER_RULES)}")
        if self.a_start not in ("a-plus", "a"):
            raise ValueError("a_start must be a-plus or a")
        if self.inner_steps < 1:
            raise ValueError("inner steps must be at least 1")


class StepRule:
    """SGD or Adam over a list of fp32 tensors, returning the steps instead of applying them,
    so the caller can project them (B). Batched over all layers with torch's foreach ops."""

    def __init__(self, like: Sequence[Tensor], lr: float, kind: str, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.kind, self.betas, self.eps = lr, kind, betas, eps
        self.t = 0
        self.m = [torch.zeros_like(p) for p in like]  # like: the fp32 (or wider) factors
        self.v = [torch.zeros_like(p) for p in like]

    def gradient_scale(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """Per tensor, the RMS of Adam's bias-corrected second moment √mean(v̂) with ``grads``
        folded in as the next step would (step t + 1), without advancing the state: the typical
        size of this tensor's gradient over its recent history, current gradient included
        (0-d tensors, no host sync)."""
        b2 = self.betas[1]
        grads = [g.detach().to(v.dtype) for g, v in zip(grads, self.v)]
        v = torch._foreach_mul(self.v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        return [(x.mean() / (1 - b2 ** (self.t + 1))).sqrt() for x in v]

    def step(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """The update to subtract, advancing the optimiser state."""
        grads = [g.detach().to(m.dtype) for g, m in zip(grads, self.m)]
        if not grads:
            return []
        if self.kind == "sgd":
            return torch._foreach_mul(grads, self.lr)
        self.t += 1
        b1, b2 = self.betas
        torch._foreach_lerp_(self.m, grads, 1 - b1)  # m ← β1 m + (1 − β1) g
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - b2)  # v ← β2 v + (1 − β2) g²
        denom = torch._foreach_sqrt(self.v)  # √v̂ + ε = √v / √(1 − β2ᵗ) + ε
        torch._foreach_div_(denom, (1 - b2 ** self.t) ** 0.5)
        torch._foreach_add_(denom, self.eps)
        out = torch._foreach_div(self.m, denom)
        torch._foreach_mul_(out, self.lr / (1 - b1 ** self.t))  # lr · m̂ / (√v̂ + ε)
        return out


def _leaves(ts: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach().requires_grad_(True) for t in ts]


def _minus(x: Sequence[Tensor], step: Sequence[Tensor]) -> list[Tensor]:
    return [xi - si for xi, si in zip(x, step)]


def _times(alpha: StepSize, g: Sequence[Tensor]) -> list[Tensor]:
    """α · g, per layer (kept differentiable: the unrolled hypergradient goes through it)."""
    return [(alpha if isinstance(alpha, float) else alpha[i]) * gi for i, gi in enumerate(g)]


def _grad(output: Tensor, inputs: Sequence[Tensor], **kw) -> list[Tensor]:
    grads = torch.autograd.grad(output, list(inputs), allow_unused=True, **kw)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


def loss_and_gradients(loss_fn: LossFn, a: Sequence[Tensor], b: Sequence[Tensor],
                       embedding: Sequence[Tensor], of: Collection[str],
                       scale: float = 1.0) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """One forward and backward pass at (a, b, embedding): the loss (a detached 0-d tensor, no
    host sync) and the gradients of the blocks named in ``of`` ("a", "b", "embedding").
    ``scale`` is the fp16 loss scale: gradients are taken of loss · scale, then divided by it."""
    point = {"a": a, "b": b, "embedding": embedding}
    point = {k: _leaves(v) if k in of else [t.detach() for t in v] for k, v in point.items()}
    loss = loss_fn(point["a"], point["b"], point["embedding"])
    names = [k for k in ("a", "b", "embedding") if k in of]
    flat = _grad(loss * scale if scale != 1.0 else loss, [t for k in names for t in point[k]])
    if scale != 1.0:
        torch._foreach_div_(flat, scale)
    out, start = {}, 0
    for k in names:
        out[k] = flat[start:start + len(point[k])]
        start += len(point[k])
    return loss.detach(), out


def cross_hessian_vector_product(grad_a: Sequence[Tensor], b: Sequence[Tensor],
                                 v: Sequence[Tensor]) -> list[Tensor]:
    """H_BA[V] = ∂/∂B ⟨∇_A L, V⟩ by double backward; ``grad_a`` must carry its graph to ``b``."""
    return _grad(list(grad_a), b, grad_outputs=list(v))


@dataclass
class IterationResult:
    loss_before: Tensor  # L(A, B) at the start of the iteration (0-d, detached, on the device)
    loss: Tensor  # L at the last pass of the iteration
    skipped: int = 0  # commits skipped in this iteration because their gradients were not finite


class BilevelSolver:
    """One concept's factors and optimiser state; ``iterate`` runs one iteration of its method."""

    def __init__(self, a: Sequence[Tensor], b: Sequence[Tensor], embedding: Sequence[Tensor],
                 project: Projection, config: BilevelConfig,
                 differentiable_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 loss_scale: LossScale | None = None):
        # the factors and the embedding stay fp32 (or wider) whatever the model's dtype
        wide = lambda ts: [t.detach().clone().to(torch.promote_types(t.dtype, torch.float32)) for t in ts]  # noqa: E731
        self.a, self.b, self.embedding = wide(a), wide(b), wide(embedding)
        self.project = project
        self.cfg = config
        self.differentiable_context = differentiable_context
        self.loss_scale = loss_scale or LossScale(torch.float32)
        rule = lambda like, lr: StepRule(like, lr, config.optimizer, config.betas, config.adam_eps)  # noqa: E731
        self.opt_a, self.opt_b = rule(self.a, config.lr_a), rule(self.b, config.lr_b)
        self.opt_embedding = rule(self.embedding, config.lr_embedding)
        self.alpha: StepSize | None = config.lr_a if config.optimizer == "sgd" else None
        self._alpha_checked = config.optimizer == "sgd"
        self._per_iteration = config.optimizer != "sgd" and config.inner_rule == "trust-region"
        self._alphas: list[StepSize] = []  # α of each inner step of the current iteration
        self.skipped_steps = 0
        self._skipped_now = 0

    @property
    def scale(self) -> float:
        return self.loss_scale.scale

    # -- the algorithms ----------------------------------------------------------------------
    def iterate(self, loss_fn: LossFn) -> IterationResult:
        self._skipped_now = 0
        self._alphas = []
        if self._per_iteration:
            self.alpha = None  # D3: this iteration's step size, set from its first gradient
        run = {"seqlora": self.seqlora_iteration, "alternating": self.alternating_iteration,
               "frozen-basis": self.frozen_basis_iteration, "lora": self.lora_iteration}[self.cfg.method]
        loss_before, loss = run(loss_fn)
        return IterationResult(loss_before, loss, self._skipped_now)

    def seqlora_iteration(self, loss_fn: LossFn) -> tuple[Tensor, Tensor]:
        """DESIGN §3 steps 1–5."""
        grad_f, a_plus, loss_before = self.hypergradient(loss_fn)
        if not self._finite(grad_f + a_plus):
            return loss_before, loss_before
        self.projected_b_step(grad_f)
        return loss_before, self.a_step(loss_fn, self._a_start(a_plus))

    def alternating_iteration(self, loss_fn: LossFn) -> tuple[Tensor, Tensor]:
        """Continual Alternating: steps 1, 4 and 5 with the plain partial gradient ∇_B L(A⁺, B)."""
        a_plus, loss_before = self.inner_steps(loss_fn, self.a, self.cfg.inner_steps)
        _, grads = loss_and_gradients(loss_fn, a_plus, self.b, self.embedding, of=("b",), scale=self.scale)
        if not self._finite(grads["b"] + a_plus):
            return loss_before, loss_before
        self.projected_b_step(grads["b"])
        return loss_before, self.a_step(loss_fn, self._a_start(a_plus))

    def frozen_basis_iteration(self, loss_fn: LossFn) -> tuple[Tensor, Tensor]:
        """Orthogonal Adaptation: B stays as initialised; steps 1 and 5."""
        a_plus, loss_before = self.inner_steps(loss_fn, self.a, self.cfg.inner_steps)
        return loss_before, self.a_step(loss_fn, self._a_start(a_plus))

    def lora_iteration(self, loss_fn: LossFn) -> tuple[Tensor, Tensor]:
        """Unconstrained LoRA: T + 1 joint steps on A, B and the embedding (comparison only)."""
        loss_before = None
        for _ in range(self.cfg.inner_steps + 1):
            loss, grads = loss_and_gradients(loss_fn, self.a, self.b, self.embedding,
                                             of=("a", "b", "embedding"), scale=self.scale)
            loss_before = loss if loss_before is None else loss_before
            if self._finite(grads["a"] + grads["b"] + grads["embedding"]):
                self.a = _minus(self.a, self.opt_a.step(grads["a"]))
                self.b = _minus(self.b, self.opt_b.step(grads["b"]))
                self.embedding = _minus(self.embedding, self.opt_embedding.step(grads["embedding"]))
        return loss_before, loss

    # -- the steps ---------------------------------------------------------------------------
    def _a_start(self, a_plus: list[Tensor]) -> list[Tensor]:
        """Where step 5 starts: A⁺ (D1, default) or A (DESIGN as written, for comparison)."""
        return a_plus if self.cfg.a_start == "a-plus" else self.a

    def inner_step_size(self, grad_a: Sequence[Tensor]) -> StepSize:
        """α of one inner step A ← A − α ∇_A L whose gradient is ``grad_a`` (D3), recorded in
        ``_alphas``. SGD: lr_a. Adam, "trust-region" (default): per layer
        α = lr_a / RMS(√v̂) — Adam's step size for that layer, from its second moment with this
        iteration's first gradient folded in — shrunk for this step so that the step's RMS per
        element is at most lr_a, the size of the Adam step it stands for. Both factors are held
        constant (detached) in the hypergradient, which stays linear in ∇_A L. "calibrated-once":
        lr_a / RMS of the concept's first gradient, fixed for the whole training."""
        if self.alpha is None:
            if self.cfg.inner_rule == "trust-region":
                scale = self.opt_a.gradient_scale(grad_a)
                self.alpha = [self.cfg.lr_a / (r + self.cfg.adam_eps) for r in scale]
            else:
                rms = torch._foreach_norm([g.detach() for g in grad_a])
                self.alpha = [self.cfg.lr_a / (n / g.numel() ** 0.5 + self.cfg.adam_eps) for n, g in zip(rms, grad_a)]
        alpha = self._trusted(self.alpha, grad_a)
        self._alphas.append(alpha)
        return alpha

    def _trusted(self, alpha: StepSize, grads: Sequence[Tensor]) -> StepSize:
        """α shrunk per layer so that the step α·g has RMS at most lr_a (Adam, "trust-region";
        otherwise α unchanged)."""
        if not self._per_iteration:
            return alpha
        steps = torch._foreach_norm(_times(alpha, [g.detach() for g in grads]))
        return [a * torch.clamp(self.cfg.lr_a * g.numel() ** 0.5 / (n + 1e-30), max=1.0)
                for a, n, g in zip(alpha, steps, grads)]

    def _implied_step(self, alpha: StepSize, grad_at_a_plus: Sequence[Tensor]) -> list[Tensor]:
        """v = α ∇_A L(A⁺, B), the vector of the cross-Hessian product, inside the same trust
        region as the steps taken (RMS ≤ lr_a). A layer whose gradient at A
        was ~0 gets a huge α, harmless for its own inner step (α·0) but not here, where ∇_A L(A⁺)
        is no longer ~0: in fp16 that term overflowed and the first iteration was skipped (a
        radius of 10 still did)."""
        return _times(self._trusted(alpha, grad_at_a_plus), grad_at_a_plus)

    def inner_steps(self, loss_fn: LossFn, a: Sequence[Tensor], steps: int) -> tuple[list[Tensor], Tensor | None]:
        """Step 1, not differentiated: ``steps`` plain steps A ← A − α ∇_A L(A, B).
        Returns the final A and the loss at the first one (None when ``steps`` is 0)."""
        a, first = list(a), None
        for _ in range(steps):
            loss, grads = loss_and_gradients(loss_fn, a, self.b, self.embedding, of=("a",), scale=self.scale)
            first = loss if first is None else first
            a = _minus([t.detach() for t in a], _times(self.inner_step_size(grads["a"]), grads["a"]))
        return a, first

    def hypergradient(self, loss_fn: LossFn) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """(∇F(B), A⁺, L(A, B)) at the current (A, B): steps 1–3 in the configured variant."""
        if self.cfg.hypergradient == "unrolled":
            return self.hypergradient_unrolled(loss_fn)
        if self.cfg.low_memory:
            return self.hypergradient_low_memory(loss_fn)
        return self.hypergradient_one_step(loss_fn)

    def _twice_differentiable_gradient(self, loss_fn: LossFn, a: list[Tensor], b: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """L(a, b) and scale · ∇_a L with its graph kept (create_graph) for a second derivative."""
        with self.differentiable_context():
            loss = loss_fn(a, b, [t.detach() for t in self.embedding])
            grad_a = torch.autograd.grad(loss * self.scale, a, create_graph=True)
        return loss, list(grad_a)

    def _kept_step(self) -> int:
        """Which inner step's graph the cross-Hessian term is taken from (D2): the first (paper)
        or the last (truncated); the number of plain inner steps before it."""
        return self.cfg.inner_steps - 1 if self.cfg.hypergradient == "truncated" else 0

    def hypergradient_one_step(self, loss_fn: LossFn) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """∇_B L(A⁺, B) − H_BA(A_k, B)[α ∇_A L(A⁺, B)] with the graph of one inner step k kept
        (D2): k = 0 is the paper's formula, k = T − 1 back-propagation through the last inner step
        (A_{T−1} held constant). The same passes either way (T − 1 plain, one twice
        differentiated, one plain); for T = 1 both are the exact derivative."""
        kept = self._kept_step()
        a_k, loss_before = self.inner_steps(loss_fn, self.a, kept)
        a, b = _leaves(a_k), _leaves(self.b)
        loss_k, grad_a_scaled = self._twice_differentiable_gradient(loss_fn, a, b)  # holds its graph
        loss_before = loss_k.detach() if loss_before is None else loss_before
        grad_a = [g.detach() / self.scale for g in grad_a_scaled]
        alpha = self.inner_step_size(grad_a)
        a_plus = _minus([t.detach() for t in a_k], _times(alpha, grad_a))  # inner step k, from the kept pass
        a_plus, _ = self.inner_steps(loss_fn, a_plus, self.cfg.inner_steps - 1 - kept)
        _, at_a_plus = loss_and_gradients(loss_fn, a_plus, self.b, self.embedding, of=("a", "b"), scale=self.scale)
        h = cross_hessian_vector_product(grad_a_scaled, b, self._implied_step(alpha, at_a_plus["a"]))  # scale · H_BA[v]
        grad_f = [gb - hb / self.scale for gb, hb in zip(at_a_plus["b"], h)]
        return grad_f, a_plus, loss_before

    def hypergradient_low_memory(self, loss_fn: LossFn) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Same value as ``hypergradient_one_step``; the kept graph is built last, at A (paper) or
        A_{T−1} (truncated), after A⁺ is known (D6)."""
        a_prev, loss_before = self.inner_steps(loss_fn, self.a, self.cfg.inner_steps - 1)
        a_plus, last = self.inner_steps(loss_fn, a_prev, 1)
        loss_before = last if loss_before is None else loss_before
        _, at_a_plus = loss_and_gradients(loss_fn, a_plus, self.b, self.embedding, of=("a", "b"), scale=self.scale)
        v = self._implied_step(self._alphas[self._kept_step()], at_a_plus["a"])  # α of the kept step
        at = a_prev if self._kept_step() else self.a
        a, b = _leaves(at), _leaves(self.b)
        _, grad_a_scaled = self._twice_differentiable_gradient(loss_fn, a, b)
        h = cross_hessian_vector_product(grad_a_scaled, b, v)
        del grad_a_scaled
        grad_f = [gb - hb / self.scale for gb, hb in zip(at_a_plus["b"], h)]
        return grad_f, a_plus, loss_before

    def hypergradient_unrolled(self, loss_fn: LossFn) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """The exact ∇F(B) of the T-step F(B) = L(A_T(B), B): back-propagation through every
        inner step (each one twice differentiated). Equals ``hypergradient_one_step`` for T = 1."""
        a, b = _leaves(self.a), _leaves(self.b)
        loss_before = None
        for _ in range(self.cfg.inner_steps):
            loss, grad_scaled = self._twice_differentiable_gradient(loss_fn, a, b)
            loss_before = loss if loss_before is None else loss_before
            alpha = self.inner_step_size([g.detach() / self.scale for g in grad_scaled])
            a = _minus(a, _times(alpha, [g / self.scale for g in grad_scaled]))
        loss_f = loss_fn(a, b, [t.detach() for t in self.embedding])
        grad_f = _grad(loss_f * self.scale, b)
        torch._foreach_div_(grad_f, self.scale)
        return grad_f, [t.detach() for t in a], loss_before.detach()

    def projected_b_step(self, grad_b: Sequence[Tensor]) -> None:
        """Step 4: B ← B − P·step(P ∇F(B)) (P twice: Adam's step is not in the free space, D4)."""
        self.b = _minus(self.b, self.project(self.opt_b.step(self.project(grad_b))))

    def a_step(self, loss_fn: LossFn, a_start: Sequence[Tensor]) -> Tensor:
        """Step 5 from ``a_start`` = A⁺ (D1), and the embedding's step in the same pass; returns
        the loss at (A⁺, B_new)."""
        loss, grads = loss_and_gradients(loss_fn, a_start, self.b, self.embedding,
                                         of=("a", "embedding"), scale=self.scale)
        if self._finite(grads["a"] + grads["embedding"] + list(a_start)):
            self.a = _minus([t.detach() for t in a_start], self.opt_a.step(grads["a"]))
            self.embedding = _minus(self.embedding, self.opt_embedding.step(grads["embedding"]))
        return loss

    def _finite(self, tensors: Sequence[Tensor]) -> bool:
        """The one host sync per commit: are these gradients finite? If not, the commit is
        skipped and counted, the fp16 loss scale halves, and an α calibrated from them is
        dropped (D5)."""
        finite = bool(all_finite(tensors))
        self.loss_scale.update(finite)
        if finite:
            self._alpha_checked = True
        else:
            self.skipped_steps += 1
            self._skipped_now += 1
            if not self._alpha_checked:
                self.alpha = None
        return finite
