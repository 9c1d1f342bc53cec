"""Null-space projection that keeps a new concept's basis orthogonal to all earlier ones.

For one adapted layer with earlier bases 𝔅 = [B_1 … B_{i-1}] (m × k), the paper's regularised
projector onto the free space is  P = I − 𝔅 (𝔅ᵀ𝔅 + ε I)⁻¹ 𝔅ᵀ.  We never form the m × m matrix:
P v = v − 𝔅 G⁻¹ 𝔅ᵀ v with the small k × k Gram G = 𝔅ᵀ𝔅 + εI, kept in float64 so that the
orthogonality of the learned bases is limited by float32 storage, not by the projection.

Inside a subspace lease (``bank.lease``) the free space is further confined to span(U) of the
lease's orthonormal block U (m × w): P v = P_𝔅 (U Uᵀ v), where 𝔅 then holds the lease's own
earlier concepts (all inside span(U)), so the free width is w minus their columns.
"""
from __future__ import annotations

import torch
from torch import Tensor


class NullSpaceProjector:
    """Projects m × r matrices onto the orthogonal complement of span(𝔅) for one layer."""

    def __init__(self, in_features: int, earlier: list[Tensor] | None = None, eps: float = 1e-8,
                 within: Tensor | None = None):
        self.in_features = in_features
        self.eps = float(eps)
        self._within = None if within is None else within.detach().to("cpu", torch.float64)  # U, (m, w)
        self.used = 0  # columns of 𝔅
        self._basis: Tensor | None = None  # 𝔅, (m, k) float64
        self._gram_inv: Tensor | None = None  # (𝔅ᵀ𝔅 + εI)⁻¹, (k, k) float64
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}  # device → (𝔅, G⁻¹) there
        for b in earlier or []:
            self.append(b)

    @property
    def free_width(self) -> int:
        room = self.in_features if self._within is None else self._within.shape[1]
        return max(room - self.used, 0)

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

    def _on(self, device: torch.device) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        key = str(device)
        if key not in self._cache:
            move = (lambda t: None if t is None else t.to(device))
            self._cache[key] = (move(self._basis), move(self._gram_inv), move(self._within))
        return self._cache[key]

    def project(self, v: Tensor) -> Tensor:
        """P v for v of shape (m, r); returns v's dtype and device."""
        if self._basis is None and self._within is None:
            return v
        basis, gram_inv, within = self._on(v.device)
        v64 = v.to(torch.float64)
        if within is not None:
            v64 = within @ (within.T @ v64)
        if basis is not None:
            v64 = v64 - basis @ (gram_inv @ (basis.T @ v64))
        return v64.to(v.dtype)

    def random_orthonormal(self, rank: int, generator: torch.Generator) -> Tensor:
        """Orthonormal columns (m × rank, float32) inside the free space: the initial B_i."""
        if rank > self.free_width:
            raise ValueError("not enough free width")
        g = torch.randn(self.in_features, rank, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(self.project(g))
        q = self.project(q)  # remove the last rounding outside the free space
        q, _ = torch.linalg.qr(q)
        return q.to(torch.float32)

    def extended(self, block: Tensor) -> "NullSpaceProjector":
        """A projector whose free space also excludes ``block`` (m × k); this one is unchanged."""
        out = NullSpaceProjector(self.in_features, [] if self._basis is None else [self._basis], self.eps,
                                 within=self._within)
        if block.shape[1]:
            out.append(block)
        return out


def normalised_overlap(b_j: Tensor, b_i: Tensor) -> float:
    """‖B_jᵀB_i‖_F / (‖B_j‖_F ‖B_i‖_F): 0 for orthogonal bases, scale-free."""
    b_j = b_j.to(torch.float64)
    b_i = b_i.to(torch.float64)
    denom = b_j.norm() * b_i.norm()
    if denom == 0:
        return 0.0
    return float((b_j.T @ b_i).norm() / denom)


def block_overlaps(bases: list[Tensor]) -> Tensor:
    """(k, k) normalised overlaps ‖B_jᵀB_i‖_F / (‖B_j‖_F ‖B_i‖_F) of k bases (m × r_i each), zero
    diagonal, from one Gram matrix of the stacked bases (float64): the exact check behind a bank's
    orthogonality error, without a Python loop over concept pairs."""
    stacked = torch.cat([b.detach().to("cpu", torch.float64) for b in bases], dim=1)  # (m, R)
    gram = stacked.T @ stacked  # (R, R)
    owner = torch.repeat_interleave(torch.arange(len(bases)), torch.tensor([b.shape[1] for b in bases]))
    onehot = torch.nn.functional.one_hot(owner, len(bases)).to(torch.float64)  # (R, k)
    block_sq = onehot.T @ (gram * gram) @ onehot  # ‖B_jᵀB_i‖_F²
    norm_sq = onehot.T @ torch.diagonal(gram)  # ‖B_i‖_F²
    denom = torch.sqrt(torch.outer(norm_sq, norm_sq))
    out = torch.where(denom > 0, block_sq.sqrt() / denom.clamp_min(1e-300), torch.zeros_like(denom))
    return out.fill_diagonal_(0.0)


def _cpu32(b: Tensor) -> Tensor:
    """``b`` as float32 on the CPU; no ``.to`` call when it already is (a loaded bank checks 15,000
    blocks, and each ``.to`` costs more than its arithmetic here)."""
    b = b.detach()
    return b if b.dtype == torch.float32 and b.device.type == "cpu" else b.to("cpu", torch.float32)


def probably_orthogonal(bases: list[Tensor], tolerance: float, probes: int = 16,
                        generator: torch.Generator | None = None) -> bool:
    """A fast sufficient test that no two of ``bases`` overlap by more than ``tolerance``.

    With S = [B_1 … B_k] and O = SᵀS minus its diagonal blocks, every normalised pair overlap is at
    most ‖O‖_F / min_i ‖B_i‖_F², and ‖O‖_F² = E‖O z‖² for Gaussian z. ``probes`` random z cost
    O(m·R·probes) in float32 (its rounding, ~1e-7, is far below the tolerance) instead of the Gram's O(m·R²) (30× less for 192 rank-4 concepts on a 768-wide
    layer). The estimate is inflated 10× before comparing, so a bank that breaks the tolerance
    passes only if ‖O z‖ falls 10× short of its mean for all 16 probes at once (probability below
    1e-12). False means "not shown": callers then compute :func:`block_overlaps` exactly.
    """
    return probably_orthogonal_layers([bases], tolerance, probes, generator)


# float32 blocks per batched probe: a few layers, so that both passes over them stay in cache
# (on a 192-concept bank's 80 layers, 32 MiB chunks took 0.30 s and 8 MiB chunks 0.19 s)
PROBE_CHUNK_BYTES = 8 << 20


@torch.no_grad()
def probably_orthogonal_layers(layers: list[list[Tensor]], tolerance: float, probes: int = 16,
                               generator: torch.Generator | None = None) -> bool:
    """:func:`probably_orthogonal` for every layer's bases at once: True only when every layer
    passes. Why batched: a 192-concept bank probes 80 layers of 192 blocks, and a Python loop of
    small matmuls per layer cost more than their arithmetic; layers with the same input width and
    block widths (all of a bank's layers of one width, in practice) are stacked and probed by
    batched matmuls, about :data:`PROBE_CHUNK_BYTES` of blocks at a time. Every block of a layer
    must have the same number of rows (callers check it first)."""
    groups: dict[tuple, list[list[Tensor]]] = {}
    for bases in layers:
        if len(bases) > 1:
            groups.setdefault((bases[0].shape[0], tuple(b.shape[1] for b in bases)), []).append(bases)
    for (m, widths), group in groups.items():
        step = max(1, PROBE_CHUNK_BYTES // (4 * max(m, 1) * sum(widths)))
        for i in range(0, len(group), step):
            if not _probe(group[i:i + step], m, widths, probes, generator, tolerance):
                return False
    return True


def _probe(group: list[list[Tensor]], m: int, widths: tuple[int, ...], probes: int,
           generator: torch.Generator | None, tolerance: float) -> bool:
    """The probe of :func:`probably_orthogonal` on L layers of the same shapes (``group``)."""
    L, R, k = len(group), sum(widths), len(widths)
    z = torch.randn(L, R, probes, generator=generator)  # (L, R, p)
    blocks_in = [b for bases in group for b in bases]
    if not all(b.dtype == torch.float32 and b.device.type == "cpu" for b in blocks_in):
        blocks_in = [_cpu32(b) for b in blocks_in]
    if len(set(widths)) == 1:  # the diagonal blocks B_iᵀB_i z_i from the k small r × r Gram blocks
        r = widths[0]
        rows = torch.cat([b.T for b in blocks_in]).view(L, R, m)  # Sᵀ per layer
        full = rows @ (rows.transpose(1, 2) @ z)  # SᵀS z, (L, R, p)
        per = rows.view(L, k, r, m)
        grams = per @ per.transpose(-1, -2)  # B_iᵀB_i, (L, k, r, r)
        diag = (grams @ z.view(L, k, r, probes)).reshape(L, R, probes)
        norm_sq = grams.diagonal(dim1=-2, dim2=-1).sum(-1)  # ‖B_i‖_F², (L, k)
    else:
        bounds = torch.tensor((0,) + widths).cumsum(0).tolist()
        fulls, diags, norms = [], [], []
        for j in range(L):
            stacked = torch.cat(blocks_in[j * k:(j + 1) * k], dim=1)  # (m, R)
            fulls.append(stacked.T @ (stacked @ z[j]))
            diags.append(torch.cat([stacked[:, a:b].T @ (stacked[:, a:b] @ z[j, a:b])
                                    for a, b in zip(bounds, bounds[1:])]))
            norms.append(torch.stack([stacked[:, a:b].pow(2).sum() for a, b in zip(bounds, bounds[1:])]))
        full, diag, norm_sq = torch.stack(fulls), torch.stack(diags), torch.stack(norms)
    off_norm = (full - diag).pow(2).sum(1).mean(-1).sqrt()  # ≈ ‖O‖_F per layer, (L,)
    min_norm_sq = norm_sq.min(-1).values
    return bool(((min_norm_sq > 0) & (10.0 * off_norm <= tolerance * min_norm_sq)).all())


class BatchedProjection:
    """P v for every adapted layer at once, equal to ``[p.project(v) for p, v in zip(projectors, vs)]``
    for every kind of projector: none (P = I), earlier bases only, a lease block U only (a lease
    file's first concept) and U with earlier bases (P v = P_𝔅 (U Uᵀ v)). Layers with the same
    (m, k, w) — m inputs, k earlier columns, lease width w; in practice all layers of one width,
    since every concept adapts the same layers — share one batched matmul instead of a Python
    loop of small float64 matmuls per layer (≈ 64 layers at the default targets).

    The lease block must not be dropped here: the bilevel step projects every B gradient through
    this class, so ignoring U lets B leave the lease during training, and the trainer's last exact
    projection would then cut the trained B down without refitting A (issue 17)."""

    def __init__(self, projectors: list[NullSpaceProjector]):
        self.projectors = projectors
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, p in enumerate(projectors):
            if p._basis is None and p._within is None:
                continue  # P = I: v is returned as it is, like NullSpaceProjector.project
            width = 0 if p._within is None else p._within.shape[1]
            groups.setdefault((p.in_features, p.used, width), []).append(i)
        self._groups = list(groups.values())
        # device → per group (indices, stacked 𝔅 or None, stacked G⁻¹ or None, stacked U or None)
        self._on: dict[str, list[tuple[list[int], Tensor | None, Tensor | None, Tensor | None]]] = {}

    def _groups_on(self, device: torch.device):
        key = str(device)
        if key not in self._on:  # stacked on the device only: no second host copy of a full bank
            def stack(idx: list[int], attr: str) -> Tensor | None:
                parts = [getattr(self.projectors[i], attr) for i in idx]
                return None if parts[0] is None else torch.stack([t.to(device) for t in parts])

            self._on[key] = [(idx, stack(idx, "_basis"), stack(idx, "_gram_inv"), stack(idx, "_within"))
                             for idx in self._groups]
        return self._on[key]

    def __call__(self, vs: list[Tensor]) -> list[Tensor]:
        """[P_i v_i] for v_i of shape (m_i, r), in each v_i's dtype."""
        out = list(vs)
        if not vs:
            return out
        # basis (L, m, k), gram_inv (L, k, k), within (L, m, w); None where the group has none
        for idx, basis, gram_inv, within in self._groups_on(vs[0].device):
            v64 = torch.stack([vs[i] for i in idx]).to(torch.float64)  # (L, m, r)
            if within is not None:
                v64 = within @ (within.transpose(1, 2) @ v64)
            if basis is not None:
                v64 = v64 - basis @ (gram_inv @ (basis.transpose(1, 2) @ v64))
            for j, i in enumerate(idx):
                out[i] = v64[j].to(vs[i].dtype)
        return out


def orthonormal_factors(a: Tensor, b: Tensor, projector: NullSpaceProjector | None = None
                        ) -> tuple[Tensor, Tensor]:
    """The same residual A Bᵀ with orthonormal B: B = Q R (float64) → (A Rᵀ, Q), float32 on the CPU.

    Done once, when a concept is frozen. Later concepts are projected against this B with the
    regularised projector P = I − 𝔅(𝔅ᵀ𝔅 + εI)⁻¹𝔅ᵀ, whose exactness (and the float32 rounding
    of the Gram) degrades with 𝔅's conditioning: a trained B can have columns of very
    different lengths. With orthonormal columns 𝔅ᵀ𝔅 = I and the projection is exact to
    rounding, whatever the training did. ``projector`` (the concept's own, None for an
    unconstrained method) projects Q once more, so that QR's rounding does not carry Q out of the
    free space; the correction is at rounding level, so QᵀQ = I and A Bᵀ are unchanged to fp32
    rounding.
    """
    a64 = a.detach().to("cpu", torch.float64)
    q, r = torch.linalg.qr(b.detach().to("cpu", torch.float64))
    if projector is not None:
        q = projector.project(q)
    return (a64 @ r.T).to(torch.float32), q.to(torch.float32)
