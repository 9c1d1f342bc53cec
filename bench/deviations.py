"""Figures for the deviations from DESIGN §3 stated at the top of ``seqlora_core/method/bilevel.py``.

Runs on the CPU in seconds, on the small problems of ``tests/test_linear_identities.py``
(float64):

D1  the A step from A⁺ (ours) against DESIGN's A step from A: the reduced objective after the
    same number of iterations;
D2  the ``truncated`` (default) and ``paper`` hypergradients against the exact derivative of
    the T-step F(B) (finite differences, and the ``unrolled`` gradient), for T = 1, 2, 3, on
    the two-layer problem at two inner step sizes; and what each does to training: F after the
    same number of iterations;
D3  with Adam, the inner α of the ``trust-region`` rule (default since issue 17) against the
    rule before it (``calibrated-once``) and against α re-calibrated from each iteration's
    gradient alone.

    python bench/deviations.py            # prints a table, writes bench/results/deviations.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from seqlora_core.method.bilevel import BilevelConfig, BilevelSolver  # noqa: E402
from test_linear_identities import _pca_problem, f_of_b, two_layer_problem  # noqa: E402


class FromA(BilevelSolver):
    """DESIGN §3 step 5 as written: A ← A − step(∇_A L(A, B_new)), the inner steps discarded."""

    def seqlora_iteration(self, loss_fn):
        grad_f, _, loss_before = self.hypergradient(loss_fn)
        self.projected_b_step(grad_f)
        return loss_before, self.a_step(loss_fn, self.a)


class Recalibrated(BilevelSolver):
    """The inner α measured again on every iteration (lr_a / RMS of that iteration's gradient)."""

    def iterate(self, loss_fn):
        self.alpha = None
        return super().iterate(loss_fn)


MODES = ("truncated", "paper", "unrolled")


def directional(grad, d):
    return sum(float((g * x).sum()) for g, x in zip(grad, d))


def d2_gradient_error(steps: int, alpha=0.05) -> dict:
    loss, A, B, g = two_layer_problem(seed=1)
    out = {}
    grads = {}
    for mode in MODES:
        cfg = BilevelConfig(method="seqlora", inner_steps=steps, lr_a=alpha, lr_b=0.0, optimizer="sgd", hypergradient=mode)
        grads[mode] = BilevelSolver(A, B, [], lambda v: list(v), cfg).hypergradient(loss)[0]
    errs = []
    for _ in range(8):  # random directions: |⟨∇, d⟩ − FD| / |FD|
        d = [torch.randn(b.shape, generator=g) for b in B]
        h = 1e-5
        fd = (f_of_b(loss, A, [b + h * x for b, x in zip(B, d)], alpha, steps)
              - f_of_b(loss, A, [b - h * x for b, x in zip(B, d)], alpha, steps)) / (2 * h)
        errs.append({m: abs(directional(grads[m], d) - fd) / abs(fd) for m in grads})
    for m in grads:
        out[f"{m}_vs_finite_difference_median"] = sorted(e[m] for e in errs)[len(errs) // 2]
    den = sum(float(u.norm() ** 2) for u in grads["unrolled"]) ** 0.5
    for m in ("truncated", "paper"):
        num = sum(float((p - u).norm() ** 2) for p, u in zip(grads[m], grads["unrolled"])) ** 0.5
        out[f"{m}_vs_unrolled_relative"] = num / den
    return out


def train(problem: str, solver_cls=BilevelSolver, iterations=200, **cfg_kw) -> float:
    """F(B) = L(A⁺(B), B) — here L at the final (A, B) — after ``iterations`` iterations."""
    if problem == "two-layer":
        loss, A, B, _ = two_layer_problem(seed=1)
        project = lambda v: list(v)  # noqa: E731
        base = dict(lr_a=0.05, lr_b=0.05, optimizer="sgd")
    else:
        X, proj, loss, g = _pca_problem()
        B = [proj.random_orthonormal(3, g).double()]
        A = [torch.zeros(X.shape[1], 3)]
        project = lambda v: [proj.project(t) for t in v]  # noqa: E731
        base = dict(lr_a=0.03, lr_b=0.03, optimizer="adam")
    base.update(cfg_kw)
    solver = solver_cls(A, B, [], project, BilevelConfig(method="seqlora", inner_steps=2, **base))
    for _ in range(iterations):
        solver.iterate(loss)
    return float(loss(solver.a, solver.b))


def main() -> None:
    torch.set_default_dtype(torch.float64)
    result = {f"D2_gradient_alpha={a}": {f"T={t}": d2_gradient_error(t, a) for t in (1, 2, 3)} for a in (0.05, 0.2)}
    for problem in ("two-layer", "covariance"):
        result[f"D1_{problem}"] = {n: {"final_L": train(problem, cls, it)} for n, cls in
                                   (("from_A_plus (ours)", BilevelSolver), ("from_A (DESIGN)", FromA))
                                   for it in [100]}
        result[f"D2_{problem}"] = {m: {"final_L": train(problem, hypergradient=m)} for m in MODES}
    # D3 only differs for Adam: the covariance problem
    result["D3_covariance"] = {
        "trust-region (ours)": {"final_L": train("covariance")},
        "calibrated once (before issue 17)": {"final_L": train("covariance", inner_rule="calibrated-once")},
        "every iteration, own gradient": {"final_L": train("covariance", Recalibrated, inner_rule="calibrated-once")}}
    for key, rows in result.items():
        print(key)
        for name, row in rows.items():
            print(f"  {name:<26} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "deviations.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'deviations.json'}")


if __name__ == "__main__":
    main()
