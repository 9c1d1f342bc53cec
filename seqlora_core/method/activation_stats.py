"""Per-layer input statistics of one concept, gathered while it trains (no extra forward pass).

For every adapted layer the accumulator sums the uncentred second moment of the layer's inputs,
Σ = E[x xᵀ] (m × m, float64), over the rows x (tokens / pixels) of the passes it is armed for.
What a concept's residual does is fixed by how ``A Bᵀ`` acts on *these* inputs, so the top
eigenpairs of Σ are what the rest of the system needs:

* the rebase of a merge (``bank.merge``) refits A so that ``A' B'ᵀ x ≈ A Bᵀ x`` on them;
* the interference measurement (the evaluation issue) weighs one concept's residual by another's
  input energy.

Only the top ``q`` eigenpairs are kept (``q`` = 8 by default: 768 × 8 float32 = 24 KiB per layer),
so a concept's statistics cost about as much as its factors at rank 4.

The trainer arms the accumulator for the first forward pass of every minibatch (the later passes
of the bilevel iteration see the same images and prompts), so statistics cost one m × m
accumulation per layer and minibatch and nothing else. It never reads a value back while
training: the skip of a non-finite pass and the row count are device tensors too, so a GPU's queue
is not drained once per layer and minibatch (``bool(t)``, ``float(t)``, ``t.item()`` wait for
every kernel queued before them); the one read-back is in ``second_moment``, after training.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

DEFAULT_Q = 8

# layer → (eigenvalues (q,) float32 descending, eigenvectors (m, q) float32)
Eigenpairs = dict[str, tuple[Tensor, Tensor]]


class ActivationStats:
    """Forward pre-hooks accumulating Σ x xᵀ and the row count per layer while ``armed``."""

    def __init__(self, layers: Mapping[str, nn.Linear]):
        self.layers = dict(layers)
        self.armed = True
        self.sums: dict[str, Tensor] = {}  # layer → (m, m) float64, on the layer's device
        self.rows: dict[str, Tensor] = {}  # layer → () float64 row count, on the layer's device
        self._handles: list = []

    # -- hooks ---------------------------------------------------------------------------------
    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if not self.armed:
                return
            with torch.no_grad():
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
                gram = x.T @ x
                # a low-precision pass that overflowed counts for nothing; decided on the device
                # (torch.where, not an ``if``), so no value is read back here
                finite = torch.isfinite(gram).all()
                gram = torch.where(finite, gram, torch.zeros((), dtype=gram.dtype, device=gram.device))
                rows = finite.to(torch.float64) * x.shape[0]
                if name in self.sums:
                    self.sums[name] += gram
                    self.rows[name] += rows
                else:
                    self.sums[name], self.rows[name] = gram, rows
        return hook

    def __enter__(self) -> "ActivationStats":
        self._handles = [module.register_forward_pre_hook(self._make_hook(name))
                         for name, module in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- results -------------------------------------------------------------------------------
    def second_moment(self, name: str) -> Tensor:
        """Σ = E[x xᵀ] of one layer, (m, m) float64 on the CPU."""
        if name not in self.sums:
            raise KeyError(f"no inputs were recorded for layer {name}")
        return (self.sums[name] / self.rows[name].clamp_min(1)).cpu()

    def top_eigenpairs(self, q: int = DEFAULT_Q) -> Eigenpairs:
        """Per recorded layer the q largest eigenpairs of Σ (eigenvalues descending, ≥ 0)."""
        out: Eigenpairs = {}
        for name in self.sums:
            sigma = self.second_moment(name)
            sigma = (sigma + sigma.T) / 2
            values, vectors = torch.linalg.eigh(sigma)  # ascending
            k = min(q, values.shape[0])
            top = values.flip(0)[:k].clamp_min(0.0)
            vecs = vectors.flip(1)[:, :k]
            out[name] = (top.to(torch.float32).contiguous(), vecs.to(torch.float32).contiguous())
        return out


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
