"""A layer's input second moment Σ̂ from its stored top eigenpairs, applied without forming it.

The eigenpairs are gathered by ``method.activation_stats`` and stored in the bank; the rebase of a
merge (``bank.merge``) and the tests use the products here.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _tail(values: Tensor) -> float:
    """The weight of directions outside the stored eigenvectors: the smallest kept eigenvalue (an
    upper bound of the unrecorded tail, so no direction counts as free)."""
    tail = float(values[-1]) if values.numel() else 0.0
    if tail <= 0:  # Σ of rank < q: keep Σ̂ invertible with a tail far below the recorded energy
        tail = max(float(values.max()) if values.numel() else 0.0, 1.0) * 1e-6
    return tail


def second_moment_times(stats: tuple[Tensor, Tensor] | None, x: Tensor) -> Tensor:
    """Σ̂ x for x (m × k), float64, without forming the m × m matrix: Σ̂ = τ I + V (Λ − τ) Vᵀ
    from stored eigenpairs (τ from :func:`_tail`); the identity when there are none (v1)."""
    x = x.to(torch.float64)
    if stats is None:
        return x
    values, vectors = (t.to(torch.float64) for t in stats)
    tau = _tail(values)
    return tau * x + vectors @ ((values - tau)[:, None] * (vectors.T @ x))


def low_rank_second_moment(stats: tuple[Tensor, Tensor] | None, in_features: int) -> Tensor:
    """Σ̂ (m × m, float64) of :func:`second_moment_times` as a matrix (for tests and small m)."""
    return second_moment_times(stats, torch.eye(in_features, dtype=torch.float64))
