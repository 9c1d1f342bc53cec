"""Null-space projection that keeps a new concept's basis orthogonal to all earlier ones.

For one adapted layer with earlier bases 𝔅 = [B_1 … B_{i-1}] (m × k), the paper's regularised
projector onto the free space is  P = I − 𝔅 (𝔅ᵀ𝔅 + ε I)⁻¹ 𝔅ᵀ.  We never form the m × m matrix:
P v = v − 𝔅 G⁻¹ 𝔅ᵀ v with the small k × k Gram G = 𝔅ᵀ𝔅 + εI, kept in float64 so that the
orthogonality of the learned bases is limited by float32 storage, not by the projection.
"""
from __future__ import annotations

import torch
from torch import Tensor


class NullSpaceProjector:
    """Projects m × r matrices onto the orthogonal complement of span(𝔅) for one layer."""

    def __init__(self, in_features: int, earlier: list[Tensor] | None = None, eps: float = 1e-8):
        self.in_features = in_features
        self.eps = float(eps)
        self.used = 0  # columns of 𝔅
        self._basis: Tensor | None = None  # 𝔅, (m, k) float64
        self._gram_inv: Tensor | None = None  # (𝔅ᵀ𝔅 + εI)⁻¹, (k, k) float64
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}  # device → (𝔅, G⁻¹) there
        for b in earlier or []:
            self.append(b)

    @property
    def free_width(self) -> int:
        return self.in_features - self.used

    def capacity(self, rank: int) -> int:
        """How many more concepts of this rank the layer can hold."""
        return self.free_width // rank

    def append(self, basis: Tensor) -> None:
        """Add a frozen concept basis B_i (m × r) to 𝔅."""
        if basis.shape[0] != self.in_features:
            raise ValueError(f"basis has {basis.shape[0]} rows, layer has {self.in_features} inputs")
        b = basis.detach().to("cpu", torch.float64)
        self._basis = b if self._basis is None else torch.cat([self._basis, b], dim=1)
        self.used = self._basis.shape[1]
        gram = self._basis.T @ self._basis + self.eps * torch.eye(self.used, dtype=torch.float64)
        self._gram_inv = torch.linalg.inv(gram)
        self._cache = {}

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        key = str(device)
        if key not in self._cache:
            self._cache[key] = (self._basis.to(device), self._gram_inv.to(device))
        return self._cache[key]

    def project(self, v: Tensor) -> Tensor:
        """P v for v of shape (m, r); returns v's dtype and device."""
        if self._basis is None:
            return v
        basis, gram_inv = self._on(v.device)
        v64 = v.to(torch.float64)
        return (v64 - basis @ (gram_inv @ (basis.T @ v64))).to(v.dtype)

    def random_orthonormal(self, rank: int, generator: torch.Generator) -> Tensor:
        """Orthonormal columns (m × rank, float32) inside the free space: the initial B_i."""
        if rank > self.free_width:
            raise ValueError("not enough free width")
        g = torch.randn(self.in_features, rank, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(self.project(g))
        q = self.project(q)  # remove the last rounding outside the free space
        q, _ = torch.linalg.qr(q)
        return q.to(torch.float32)


def normalised_overlap(b_j: Tensor, b_i: Tensor) -> float:
    """‖B_jᵀB_i‖_F / (‖B_j‖_F ‖B_i‖_F): 0 for orthogonal bases, scale-free."""
    b_j = b_j.to(torch.float64)
    b_i = b_i.to(torch.float64)
    denom = b_j.norm() * b_i.norm()
    if denom == 0:
        return 0.0
    return float((b_j.T @ b_i).norm() / denom)
