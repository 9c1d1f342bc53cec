"""Merging banks that grew apart: exact for returned leases, orthogonal rebase for forks.

Rules (README "Merging banks"):

* every input has the same base (architecture and fingerprint);
* a concept present in several inputs with the same content hash is one concept; the same id with
  different contents is refused unless ``--rename OLD=NEW`` renames it in every input after the
  first that holds it (command-line order);
* a concept that one input's history records as removed (and that input no longer holds) is not
  brought back by another input that still has it;
* the output's concepts are in a canonical order (creation time, then hash), so merging the same
  files in any order gives the same concepts with the same tensors;
* concepts from leases merge exactly (their bases are orthogonal by construction): their tensors
  are copied bit for bit, and a lease whose lease file is among the inputs is marked returned;
* concepts trained apart without a lease overlap: the merge is refused, naming the overlapping
  pairs, unless ``rebase``: then each later concept's B is projected onto the null space of the
  kept ones (and of the leases still out), re-orthonormalised, and its A refitted in closed form so
  that ``A' B'ᵀ x ≈ A Bᵀ x`` on the concept's own inputs: with Σ̂ its input second moment rebuilt
  from the stored activation statistics (``linalg.moments.second_moment_times``, never formed as an m × m matrix),
  A' = A Bᵀ Σ̂ B' (B'ᵀ Σ̂ B')⁻¹, the minimiser of tr((ΔW − A'B'ᵀ) Σ̂ (ΔW − A'B'ᵀ)ᵀ). The relative
  residual change ‖ΔW − A'B'ᵀ‖_Σ̂ / ‖ΔW‖_Σ̂ (over all layers) is reported per rebased concept.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..errors import BankError, CapacityError, InputError
from ..linalg.moments import second_moment_times
from ..linalg.projector import NullSpaceProjector
from .fingerprint import Fingerprint, same_base
from .format import ID_PATTERN, ORTHOGONALITY_TOLERANCE, Bank, Concept
from .lease import Lease
from .provenance import history_entry, merged_history, now_iso


@dataclass
class MergeResult:
    bank: Bank
    rebased: list[tuple[str, float]] = field(default_factory=list)  # (id, relative residual change)
    returned: list[str] = field(default_factory=list)  # lease ids
    renamed: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # removed in some input's history


def parse_renames(items: list[str]) -> dict[str, str]:
    """['old=new', …] → {'old': 'new'}; one sentence for a malformed item."""
    out = {}
    for item in items:
        old, sep, new = (s.strip() for s in item.partition("="))
        if not sep or not ID_PATTERN.match(old) or not ID_PATTERN.match(new):
            raise InputError(f"Rename '{item}' should look like old_id=new_id (a-z, 0-9, _ or -).")
        out[old] = new
    return out


def _check_bases(banks: list[Bank], names: list[str]) -> None:
    first = banks[0].base
    for bank, name in zip(banks[1:], names[1:]):
        if bank.base.get("architecture") != first.get("architecture"):
            key = "architecture"
        elif not same_base(first, Fingerprint.recorded(bank.base)):
            key = "fingerprint"
        else:
            continue
        raise BankError(f"{name} was made for another base model than {names[0]} ({key} "
                        f"{bank.base.get(key)} vs {first.get(key)}); only banks of one base merge.")


def _renamed(concept: Concept, new_id: str) -> Concept:
    return replace(concept, id=new_id, token=f"<{new_id}>")


def _collect(banks: list[Bank], names: list[str], renames: dict[str, str], author: str | None):
    """Unique concepts of all inputs (with renames applied), dropped ids, history entries."""
    chosen: dict[str, tuple[Concept, str]] = {}  # id → (concept, input name)
    removed = set()
    for bank in banks:
        present = {c.hash for c in bank.concepts}
        removed |= {c["hash"] for e in bank.history if e["action"] == "remove" for c in e["concepts"]} - present
    renamed, dropped, entries = [], [], []
    for bank, name in zip(banks, names):
        for concept in bank.concepts:
            if concept.hash in removed:
                dropped.append(concept.id)
                continue
            held = chosen.get(concept.id)
            if held is not None and held[0].hash == concept.hash:
                continue
            if held is not None:
                new_id = renames.get(concept.id)
                if new_id is None:
                    raise InputError(f"Concept '{concept.id}' is in {held[1]} and in {name} with different "
                                     f"contents; pass --rename {concept.id}=NEW_ID to keep both.")
                if new_id in chosen:
                    raise InputError(f"Cannot rename '{concept.id}' to '{new_id}': that id is taken.")
                entries.append(history_entry("rename", [(new_id, concept.hash)], author, note=f"was {concept.id} in {name}"))
                renamed.append((concept.id, new_id))
                concept = _renamed(concept, new_id)
            chosen[concept.id] = (concept, name)
    for old in renames:
        if old not in {o for o, _ in renamed}:
            raise InputError(f"--rename {old}=…: no second input holds a different concept '{old}'.")
    concepts = sorted((c for c, _ in chosen.values()), key=lambda c: (c.created, c.hash))
    return concepts, sorted(set(dropped)), entries, renamed


def _merge_leases(banks: list[Bank], names: list[str]) -> tuple[list[Lease], list[str]]:
    """Union of lease records: returned when any input returned it or is its lease file."""
    records: dict[str, Lease] = {}
    returning = {b.confined_to for b in banks if b.confined_to}
    for bank, name in zip(banks, names):
        for lease in bank.leases:
            held = records.get(lease.id)
            if held is None:
                records[lease.id] = lease
            elif held.active and lease.active:
                same = held.blocks.keys() == lease.blocks.keys() and all(
                    torch.equal(held.blocks[k], lease.blocks[k]) for k in held.blocks)
                if not same:
                    raise BankError(f"Lease '{lease.id}' has different blocks in {name} than in another input.")
            elif not lease.active and (held.active or lease.returned < held.returned):
                records[lease.id] = lease
    returned = []
    for ident in sorted(records):
        if ident in returning and records[ident].active:
            records[ident] = records[ident].returned_copy(now_iso())
            returned.append(ident)
    leases = sorted(records.values(), key=lambda l: (l.created, l.id))
    return leases, returned


def rebase_concept(concept: Concept, kept: dict[str, list[Tensor]], eps: float) -> tuple[Concept, float]:
    """Project ``concept``'s bases off ``kept`` (layer → column blocks), re-orthonormalise, refit
    A on its input statistics; returns the new concept and its relative residual change."""
    new_a, new_b = {}, {}
    err2 = norm2 = 0.0
    gen = torch.Generator().manual_seed(int(concept.hash[:8], 16))
    for layer, b in concept.B.items():
        m, r = b.shape
        blocks = kept.get(layer, [])
        projector = NullSpaceProjector(m, [torch.cat([k.to(torch.float64) for k in blocks], 1)] if blocks else [], eps)
        if projector.free_width < r:
            raise CapacityError(f"Layer {layer} has {projector.free_width} free input dimensions left, "
                                f"too few to rebase '{concept.id}' (rank {r}).")
        b_new = _orthonormal_in_free_space(projector, b.to(torch.float64), gen)
        stats = concept.stats.get(layer) if concept.stats else None
        both = torch.cat([b.to(torch.float64), b_new], dim=1)  # [B, B'] (m, 2r)
        gram = both.T @ second_moment_times(stats, both)  # [B, B']ᵀ Σ̂ [B, B'] (2r, 2r)
        g_old_new, g_new_new = gram[:r, r:], gram[r:, r:]
        a64 = concept.A[layer].to(torch.float64)
        a_new = torch.linalg.solve(g_new_new, (a64 @ g_old_new).T).T  # A Bᵀ Σ̂ B' (B'ᵀ Σ̂ B')⁻¹
        coef = torch.cat([a64, -a_new], dim=1)  # ΔW − A'B'ᵀ = [A, −A'] [B, B']ᵀ
        err2 += float(torch.trace(coef @ gram @ coef.T))
        norm2 += float(torch.trace(a64 @ gram[:r, :r] @ a64.T))
        new_a[layer] = a_new.to(torch.float32)
        new_b[layer] = b_new.to(torch.float32)
    change = (max(err2, 0.0) / norm2) ** 0.5 if norm2 > 0 else 0.0
    return replace(concept, A=new_a, B=new_b, lease=None, hash=""), change


def _orthonormal_in_free_space(projector: NullSpaceProjector, b: Tensor, gen: torch.Generator) -> Tensor:
    """Orthonormal (m × r) float64 basis of span(P b), completed inside the free space when P b
    has lost rank; projected twice so rounding leaves no component along the kept bases."""
    m, r = b.shape
    u, s, _ = torch.linalg.svd(projector.project(b), full_matrices=False)
    keep = u[:, s > 1e-6 * max(float(s.max()), 1e-300)] if s.numel() and float(s.max()) > 0 else u[:, :0]
    if keep.shape[1] < r:
        extra = NullSpaceProjector(m, [projector._basis, keep] if projector._basis is not None else [keep],
                                   projector.eps)
        keep = torch.cat([keep, extra.random_orthonormal(r - keep.shape[1], gen).to(torch.float64)], dim=1)
    q, _ = torch.linalg.qr(projector.project(keep))
    q, _ = torch.linalg.qr(projector.project(q))
    return q


def merge_banks(banks: list[Bank], names: list[str], rebase: bool = False,
                renames: dict[str, str] | None = None, author: str | None = None) -> MergeResult:
    """Merge ``banks`` (named ``names`` in messages) into a new Bank (see the module docstring)."""
    if len(banks) < 2:
        raise InputError("Give at least two banks to merge.")
    _check_bases(banks, names)
    concepts, dropped, entries, renamed = _collect(banks, names, renames or {}, author)
    leases, returned = _merge_leases(banks, names)
    eps = min(b.eps for b in banks)
    active = [l for l in leases if l.active]
    labels, worst = Bank(dict(banks[0].base), eps, concepts, leases).pairwise_overlaps()
    rebased: list[tuple[str, float]] = []
    if worst.numel() == 0 or float(worst.max()) <= ORTHOGONALITY_TOLERANCE:
        out = concepts  # the exact case (leases, disjoint forks): tensors copied as they are
    elif not rebase:
        pairs = [(labels[j], labels[i], float(worst[j, i])) for j in range(len(labels))
                 for i in range(j + 1, len(labels)) if float(worst[j, i]) > ORTHOGONALITY_TOLERANCE]
        shown = "; ".join(f"{a} and {b} overlap by {v:.2e}" for a, b, v in pairs[:6])
        more = f" (and {len(pairs) - 6} more)" if len(pairs) > 6 else ""
        raise BankError(f"These banks were extended apart without a lease: {shown}{more}; "
                        "pass --rebase to make the later concepts orthogonal to the earlier ones.")
    else:
        out = _rebase_in_order(concepts, active, eps, rebased, entries, author)
    for ident in returned:
        entries.append(history_entry("return", [(c.id, c.hash) for c in out if c.lease == ident], author, lease=ident))
    entries.append(history_entry("merge", [(c.id, c.hash) for c in out], author,
                                 note=f"{len(banks)} inputs" + (f", dropped removed {', '.join(dropped)}" if dropped else "")))
    history = merged_history([b.history for b in banks]) + entries
    merged = Bank(dict(banks[0].base), eps, out, leases, None, history)
    from .reader import check_geometry

    check_geometry(merged, "the merged bank")
    return MergeResult(merged, rebased, returned, renamed, dropped)


def _rebase_in_order(concepts: list[Concept], active: list[Lease], eps: float, rebased: list,
                     entries: list, author: str | None) -> list[Concept]:
    """Keep concepts in order; rebase each constrained one that overlaps what was kept before it
    (or an outstanding lease) onto the null space of all of that."""
    kept: dict[str, list[Tensor]] = {}  # layer → blocks a later basis must avoid
    for lease in active:
        for layer, block in lease.blocks.items():
            kept.setdefault(layer, []).append(block)
    out = []
    for concept in concepts:
        if concept.constrained:
            if _overlaps_kept(concept, kept):
                concept, change = rebase_concept(concept, kept, eps)
                rebased.append((concept.id, change))
                entries.append(history_entry("rebase", [(concept.id, concept.hash)], author,
                                             note=f"relative residual change {change:.3g}"))
            for layer, b in concept.B.items():
                kept.setdefault(layer, []).append(b)
        out.append(concept)
    return out


def _overlaps_kept(concept: Concept, kept: dict[str, list[Tensor]]) -> bool:
    """Whether any kept block overlaps the concept's basis beyond the tolerance on some layer:
    ‖K_jᵀB‖_F / (‖K_j‖_F ‖B‖_F) for concept blocks, ‖UᵀB‖_F / ‖B‖_F for (orthonormal) lease
    blocks — both at most ‖K_jᵀB‖_F / ‖B‖_F / min(1, ‖K_j‖_F), one product per layer."""
    for layer, b in concept.B.items():
        blocks = [k for k in kept.get(layer, []) if k.shape[0] == b.shape[0]]
        if not blocks:
            continue
        b64 = b.to(torch.float64)
        b_norm = float(b64.norm())
        if b_norm == 0:
            continue
        for k in blocks:
            k64 = k.to(torch.float64)
            scale = min(1.0, float(k64.norm())) or 1.0
            if float((k64.T @ b64).norm()) / (b_norm * scale) > ORTHOGONALITY_TOLERANCE:
                return True
    return False

def merge_files(out, inputs: list, rebase: bool = False, renames: dict[str, str] | None = None,
                wait: bool = False, author: str | None = None) -> MergeResult:
    """Merge bank files into ``out`` (which may be one of them) under ``out``'s lock. An existing
    ``out`` that is not an input is refused, so no bank is replaced by accident."""
    from pathlib import Path

    from .format import load_bank
    from .lock import BankSession

    out, inputs = Path(out), [Path(p) for p in inputs]
    if len(inputs) < 2:
        raise InputError("Give at least two banks to merge.")
    if out.exists() and out.resolve() not in {p.resolve() for p in inputs}:
        raise InputError(f"{out.name} exists and is not one of the banks merged; name it as an input too, "
                         "or write the merge to a new file.")
    with BankSession(out, wait, "merging banks") as session:
        banks = [session.bank if p.resolve() == out.resolve() and session.bank is not None else load_bank(p)
                 for p in inputs]
        result = merge_banks(banks, [p.name for p in inputs], rebase, renames, author)
        session.commit(result.bank, removed=set(result.dropped), what="the merged bank")
    return result
