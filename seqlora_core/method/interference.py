"""Interference between concepts, measured from the bank and forecast before training.

Why: orthogonal bases make ``B_jᵀB_i = 0``, but concept i's layer *inputs* x are not confined to
span(B_i), so a later concept j still moves them by ``Δ_j x = A_j B_jᵀ x``. How much depends only on
the factors and on concept i's input second-moment matrix Σ_i = E[x xᵀ] at each layer (DESIGN.md
§3, the paper's Appendix C: forgetting is driven by the energy outside span(B_i)):

    energy(Δ, Σ) = E‖Δ x‖² = tr(Δ Σ Δᵀ) = ‖A (Bᵀ V) diag(√λ)‖_F²   for Δ = A Bᵀ, Σ ≈ V diag(λ) Vᵀ

A **moment** is such an eigen-decomposition, ``(eigvals (q,), eigvecs (m, q))``, usually the top q
eigenpairs the trainer stores per concept and layer (then every figure is the energy in those q
principal directions; q = m gives the exact value).

* interference[i][j] = Σ_l energy(Δ_j^l, Σ_i^l) / Σ_l energy(Δ_i^l, Σ_i^l): the energy concept j's
  residual puts on concept i's inputs, relative to concept i's own residual there, summed over
  layers (a ratio of sums, so a layer where i itself does little cannot dominate). The per-layer
  terms add up to the matrix, which is how the worst layers are named.
* forecast, before concept n is trained: n's basis will lie in the free space P (the orthogonal
  complement of the earlier bases), so for any rank-r Δ_n with that basis
  E_i‖Δ_n x‖² ≤ ‖Δ_n‖₂² · (sum of the r largest eigenvalues of P Σ_i P). The *exposure bound* is
  that sum over tr Σ_i: the largest share of concept i's activation energy the new concept can
  read. The *expected* exposure places the basis on the top-r principal directions of the new
  images' activations inside P (the basis the paper's Theorem 7 calls optimal).
* after training, :func:`measured_exposure` is the same quantity for the real Δ_n
  (E_i‖Δ_n x‖² / ‖Δ_n‖₂², over tr Σ_i): never above the bound.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .projector import NullSpaceProjector

Moment = tuple[Tensor, Tensor]  # (eigvals (q,), eigvecs (m, q)); Σ ≈ V diag(λ) Vᵀ
LayerFactors = Mapping[str, tuple[Tensor, Tensor]]  # layer → (A (n, r), B (m, r))


def moment_root(moment: Moment) -> Tensor:
    """R (m, q) float64 with R Rᵀ = V diag(λ) Vᵀ (negative rounding noise in λ clipped to 0)."""
    eigvals, eigvecs = moment
    return eigvecs.to(torch.float64) * eigvals.to(torch.float64).clamp_min(0).sqrt()


def moment_trace(moment: Moment) -> float:
    """tr Σ as represented: the activation energy E‖x‖² in the stored directions."""
    return float(moment[0].to(torch.float64).clamp_min(0).sum())


def moment_from_inputs(x: Tensor, q: int | None = None) -> Moment:
    """Top-q eigenpairs (descending) of E[x xᵀ] for inputs x (..., m); q = None keeps all m."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
    sigma = flat.T @ flat / max(flat.shape[0], 1)
    eigvals, eigvecs = torch.linalg.eigh(sigma)
    order = torch.argsort(eigvals, descending=True)[: q or sigma.shape[0]]
    return eigvals[order], eigvecs[:, order]


def residual_energy(a: Tensor, b: Tensor, moment: Moment) -> float:
    """E‖A Bᵀ x‖² for x with second moment ``moment``: a (n, r), b (m, r)."""
    root = moment_root(moment)
    return float((a.to(torch.float64) @ (b.to(torch.float64).T @ root)).pow(2).sum())


def spectral_norm_sq(a: Tensor, b: Tensor) -> float:
    """‖A Bᵀ‖₂², from the r × r core so that no n × m matrix is formed."""
    qa, ra = torch.linalg.qr(a.to(torch.float64))
    qb, rb = torch.linalg.qr(b.to(torch.float64))
    return float(torch.linalg.matrix_norm(ra @ rb.T, ord=2) ** 2)


def top_energy_in(root: Tensor, rank: int) -> float:
    """Sum of the ``rank`` largest eigenvalues of R Rᵀ (the most a rank-r basis can see)."""
    s = torch.linalg.svdvals(root)
    return float((s[:rank] ** 2).sum())


# -- the interference matrix -------------------------------------------------------------------
@dataclass
class Interference:
    """matrix[i][j]: energy of concept j's residual on concept i's inputs over concept i's own
    (None on the diagonal, and in the rows of ``missing_stats``: concepts without statistics or
    without an effect of their own on them); layers[name][i][j]: that layer's
    share of matrix[i][j] (the shares add up to the matrix)."""
    concepts: list[str]
    matrix: list[list[float | None]]
    layers: dict[str, list[list[float | None]]] = field(default_factory=dict)
    missing_stats: list[str] = field(default_factory=list)

    def worst_layers(self, count: int = 3) -> list[tuple[str, float, str, str]]:
        """(layer, its largest off-diagonal share, affected concept i, disturbing concept j)."""
        rows = []
        for name, table in self.layers.items():
            best = max(((v, i, j) for i, row in enumerate(table) for j, v in enumerate(row) if v is not None),
                       default=None)
            if best is not None:
                rows.append((name, best[0], self.concepts[best[1]], self.concepts[best[2]]))
        return sorted(rows, key=lambda r: -r[1])[:count]

    def worst_pair(self) -> tuple[str, str, float] | None:
        best = max(((v, i, j) for i, row in enumerate(self.matrix) for j, v in enumerate(row) if v is not None),
                   default=None)
        return None if best is None else (self.concepts[best[1]], self.concepts[best[2]], best[0])

    def to_json(self) -> dict:
        return {"concepts": self.concepts, "matrix": self.matrix, "layers": self.layers,
                "missing_stats": self.missing_stats}


def interference_matrix(ids: Sequence[str], factors: Sequence[LayerFactors],
                        stats: Sequence[Mapping[str, Moment] | None]) -> Interference:
    """The matrix for concepts given as their ids, factors and per-layer input moments.

    A layer counts for concept i only where i has both a residual and a moment; a concept
    without statistics (``None`` or empty) gets a row of None and is listed in ``missing_stats``.
    """
    n = len(ids)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    layer_shares: dict[str, list[list[float | None]]] = {}
    missing = []
    for i in range(n):
        moments = stats[i] or {}
        own_layers = [l for l in factors[i] if l in moments]
        if not own_layers:
            missing.append(ids[i])
            continue
        roots = {l: moment_root(moments[l]) for l in own_layers}
        own = sum(float((factors[i][l][0].double() @ (factors[i][l][1].double().T @ roots[l])).pow(2).sum())
                  for l in own_layers)
        if own <= 0:  # no effect of its own to compare with (e.g. A = 0): the ratios are undefined
            missing.append(ids[i])
            continue
        for j in range(n):
            if j == i:
                continue
            total = 0.0
            for l in own_layers:
                if l not in factors[j]:
                    continue
                a, b = factors[j][l]
                e = float((a.double() @ (b.double().T @ roots[l])).pow(2).sum())
                share = e / own
                layer_shares.setdefault(l, [[None] * n for _ in range(n)])[i][j] = share
                total += e
            matrix[i][j] = total / own
    return Interference(list(ids), matrix, layer_shares, missing)


def bank_interference(bank) -> Interference:
    """The interference matrix of every concept in ``bank`` from its stored statistics alone."""
    concepts = bank.concepts
    return interference_matrix([c.id for c in concepts],
                               [{l: (c.A[l], c.B[l]) for l in c.A} for c in concepts],
                               [concept_moments(c) for c in concepts])


def concept_moments(concept) -> dict[str, Moment] | None:
    """A bank concept's per-layer input moments, or None for a concept saved without them."""
    return concept.stats or None


# -- forecast before training, measured exposure after -----------------------------------------
@dataclass
class ExposureForecast:
    """Per earlier concept, shares of its activation energy (summed over layers) that a new
    rank-r concept confined to the free space can read: at most ``bound``; ``expected`` if its
    basis follows the new images' top principal directions there; ``free`` the whole free part."""
    concepts: list[str]
    bound: list[float | None]
    expected: list[float | None]
    free: list[float | None]
    new_free_fraction: float | None  # share of the new images' own activation energy in the free space
    layers: int = 0

    def to_json(self) -> dict:
        return {"concepts": self.concepts, "bound": self.bound, "expected": self.expected, "free": self.free,
                "new_free_fraction": self.new_free_fraction, "layers": self.layers}


def free_roots(root: Tensor, projector: NullSpaceProjector | None) -> Tensor:
    """P R (m, q): the moment's directions with the earlier bases projected out (P = I if None)."""
    return root if projector is None else projector.project(root)


def forecast_exposure(ids: Sequence[str], stats: Sequence[Mapping[str, Moment] | None],
                      projectors: Mapping[str, NullSpaceProjector | None], new_stats: Mapping[str, Moment],
                      rank: int) -> ExposureForecast:
    """Before training: how much of each earlier concept's activation energy the new concept
    (rank ``rank``, basis inside each layer's free space ``projectors[l]``; None = unconstrained)
    can disturb, over the layers it will adapt (``projectors``' keys)."""
    layers = list(projectors)
    new_basis = {}
    new_total = new_free = 0.0
    for l in layers:
        if l not in new_stats:
            continue
        root_new = moment_root(new_stats[l])
        free_new = free_roots(root_new, projectors[l])
        new_total += float(root_new.pow(2).sum())
        new_free += float(free_new.pow(2).sum())
        u, _, _ = torch.linalg.svd(free_new, full_matrices=False)
        new_basis[l] = u[:, :rank]  # (m, r) top principal directions of P Σ_new P
    bound, expected, free = [], [], []
    for moments in stats:
        moments = moments or {}
        total = b_sum = e_sum = f_sum = 0.0
        for l in layers:
            if l not in moments:
                continue
            root = moment_root(moments[l])
            fr = free_roots(root, projectors[l])
            total += float(root.pow(2).sum())
            f_sum += float(fr.pow(2).sum())
            b_sum += top_energy_in(fr, rank)
            if l in new_basis:
                e_sum += float((new_basis[l].T @ root).pow(2).sum())
        ok = total > 0
        bound.append(b_sum / total if ok else None)
        expected.append(e_sum / total if ok and new_basis else None)
        free.append(f_sum / total if ok else None)
    return ExposureForecast(list(ids), bound, expected, free,
                            new_free / new_total if new_total > 0 else None, len(layers))


def measured_exposure(factors: LayerFactors, moments: Mapping[str, Moment]) -> float | None:
    """After training: Σ_l E‖Δ_l x‖² / ‖Δ_l‖₂² over Σ_l tr Σ_l, the quantity the forecast bounds."""
    total = seen = 0.0
    for l, (a, b) in factors.items():
        if l not in moments:
            continue
        total += moment_trace(moments[l])
        norm = spectral_norm_sq(a, b)
        if norm > 0:
            seen += residual_energy(a, b, moments[l]) / norm
    return seen / total if total > 0 else None
