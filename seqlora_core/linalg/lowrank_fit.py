"""One layer of a foreign LoRA refitted as a bank concept: projected, weighted, rank-cut.

A LoRA file gives a layer's update as ΔW = s · up · down (n × m; up n × r, down r × m, s the
file's alpha / r times the user's strength). A bank concept needs ΔW ≈ A Bᵀ with B (m × R)
orthonormal *inside the free space* of the bank's earlier concepts (P, the layer's null-space
projector) and R the bank's rank. Two things can be lost, and both are reported:

* **projection**: the part of ΔW that acts on inputs the earlier concepts already own. B is
  restricted to span(P downᵀ) — the LoRA's own input directions with the earlier concepts'
  removed — so the import never invents directions the LoRA did not use;
* **rank cut**: when that span is wider than R, the R directions that keep most of ΔW.

"Most" is measured on the inputs the layer will see, when they are known: with Σ the input second
moment (``linalg.moments``: a stored layer statistic Σ̂ = τ I + V (Λ − τ) Vᵀ; the identity when
there is none), the fit minimises ‖(ΔW − A Bᵀ) Σ^{1/2}‖_F. With Q (m × q) an orthonormal basis of
span(P downᵀ) and B = Q C, that is a weighted reduced-rank regression with a closed form:

    M = Qᵀ Σ Q (q × q),  G = ΔW Σ Q M⁻¹ (n × q)          the best fit with B inside span(Q)
    ‖ΔW‖²_Σ = ‖ΔW − G Qᵀ‖²_Σ + ‖G M^{1/2}‖²_F          (Pythagoras in the Σ inner product)
    G M^{1/2} = U S Vᵀ,  A Cᵀ = U_R S_R V_Rᵀ M^{−1/2}    the rank cut loses Σ_{i>R} S_i²

so projection loss = ‖ΔW‖²_Σ − ‖S‖², rank-cut loss = Σ_{i>R} S_i², and the two add up to the
whole error ‖ΔW − A Bᵀ‖²_Σ. With Σ = I and no earlier concept nor rank cut, A Bᵀ = ΔW exactly
(to float64 rounding), which is how a bank's own export comes back.

Everything is computed in the q-dimensional span (q ≤ r of the file), never as an m × m matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .moments import second_moment_times
from .projector import NullSpaceProjector


@dataclass
class LayerFit:
    a: Tensor  # (n, R) float32
    b: Tensor  # (m, R) float32, orthonormal, inside the free space
    energy: float  # ‖ΔW‖²_Σ
    lost_projection: float  # ‖ΔW − G Qᵀ‖²_Σ: energy on the earlier concepts' inputs
    lost_rank: float  # Σ_{i>R} S_i²: energy cut to reach rank R
    weighted: bool  # whether Σ came from input statistics (else the identity)

    @property
    def lost(self) -> float:
        """Share of the layer's energy lost, 0…1."""
        return (self.lost_projection + self.lost_rank) / self.energy if self.energy > 0 else 0.0


def fit_layer(up: Tensor, down: Tensor, scale: float, projector: NullSpaceProjector, rank: int,
              stats: tuple[Tensor, Tensor] | None = None, generator: torch.Generator | None = None) -> LayerFit:
    """Refit ΔW = scale · up (n × r) · down (r × m) as A Bᵀ of rank ``rank`` with B orthonormal in
    ``projector``'s free space, weighted by ``stats`` (eigenpairs of the inputs' second moment) when
    given. Columns beyond what the LoRA spans get A = 0 and free-space directions for B, so every
    layer of a concept has the same rank."""
    if projector.free_width < rank:
        raise ValueError(f"only {projector.free_width} free input dimensions, rank {rank} needs more")
    up64, d = up.detach().to("cpu", torch.float64), down.detach().to("cpu", torch.float64).T  # (n, r), (m, r)
    m = d.shape[0]
    sd = second_moment_times(stats, d)  # Σ downᵀ (m, r)
    energy = float(scale ** 2 * torch.trace((d.T @ sd) @ (up64.T @ up64)))  # tr(ΔW Σ ΔWᵀ)

    q = _span(projector.project(d))  # (m, q) orthonormal, inside the free space
    if q.shape[1]:
        sq = second_moment_times(stats, q)  # Σ Q (m, q)
        mat = _sym(q.T @ sq)  # M = Qᵀ Σ Q (q, q), positive definite
        evals, evecs = torch.linalg.eigh(mat)
        evals = evals.clamp_min(evals.max() * 1e-15)
        m_half = evecs @ torch.diag(evals.sqrt()) @ evecs.T  # M^{1/2}
        m_inv_half = evecs @ torch.diag(evals.rsqrt()) @ evecs.T  # M^{−1/2}
        g = scale * up64 @ (sd.T @ q) @ torch.linalg.inv(mat)  # G = ΔW Σ Q M⁻¹ (n, q)
        u, s, vh = torch.linalg.svd(g @ m_half, full_matrices=False)
        keep = min(rank, int((s > s.max() * 1e-12).sum()) if s.numel() and s.max() > 0 else 0)
        kept = float((s ** 2).sum())
        lost_rank = float((s[keep:] ** 2).sum())
        a_fit = u[:, :keep] * s[:keep]  # (n, keep)
        b_fit = q @ (m_inv_half @ vh[:keep].T)  # (m, keep): B = Q C, C = M^{−1/2} V_R
    else:  # the LoRA acts only on inputs earlier concepts own: nothing survives
        kept = lost_rank = 0.0
        a_fit, b_fit = up64.new_zeros(up64.shape[0], 0), d.new_zeros(m, 0)
    a, b = _orthonormal_rank(a_fit, b_fit, projector, rank, generator)
    return LayerFit(a.to(torch.float32), b.to(torch.float32), energy,
                    max(energy - kept, 0.0), lost_rank, stats is not None)


def _sym(mat: Tensor) -> Tensor:
    return (mat + mat.T) / 2


def _span(x: Tensor) -> Tensor:
    """Orthonormal basis of span(x) (m × q), directions below 1e-10 of the largest dropped."""
    if x.numel() == 0:
        return x
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    if not s.numel() or float(s.max()) <= 0:
        return x[:, :0]
    return u[:, s > s.max() * 1e-10]


def _orthonormal_rank(a_fit: Tensor, b_fit: Tensor, projector: NullSpaceProjector, rank: int,
                      generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(A, B) with A Bᵀ = a_fit b_fitᵀ, B (m × rank) orthonormal in the free space: b_fit's span
    (projected once more against float rounding), completed with random free-space directions."""
    basis = _span(projector.project(b_fit)) if b_fit.shape[1] else b_fit
    if basis.shape[1] < rank:
        extra = projector.extended(basis)
        gen = generator or torch.Generator().manual_seed(0)
        basis = torch.cat([basis, extra.random_orthonormal(rank - basis.shape[1], gen).to(torch.float64)], dim=1)
    basis, _ = torch.linalg.qr(projector.project(basis))
    a = a_fit @ (b_fit.T @ basis)  # A Bᵀ = a_fit b_fitᵀ B Bᵀ = a_fit b_fitᵀ (span(b_fit) ⊂ span(B))
    return a, basis
