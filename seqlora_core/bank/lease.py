"""Subspace leases: a block of every adapted layer's free input space, reserved for one artist.

Several people can extend the same bank apart (different machines, same week) and merge back
*exactly* when each trains inside their own lease: ``grant_lease`` carves, out of every adapted
layer's free space, an orthonormal block U (m × N·R) orthogonal to every concept of the bank and
to every lease still out. The bank records the lease (and keeps U, so that neither its own new
concepts nor later leases can use that width); the lease file is a copy of the bank confined to U
(``Bank.confined_to``): each basis trained there lives in span(U) and stays orthogonal to the
lease's earlier concepts, so N concepts of rank R fit. Concepts from different leases are
orthogonal by construction, and a merge copies their tensors bit for bit (``bank.merge``).

A lease is *returned* by merging its file back; the bank then drops U (its concepts now hold
their own width; the rest is free again) and keeps the record. A concept trained in a lease
after it was returned merges like any concept: checked, and rebased only on request.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import CapacityError, InputError
from .provenance import now_iso

LEASE_ID_PATTERN = re.compile(r"^[a-z0-9_-]+$")


@dataclass
class Lease:
    id: str
    name: str
    concepts: int  # N: how many concepts of rank ``rank`` the block holds
    rank: int  # R
    blocks: dict[str, Tensor]  # layer → U (m, N·R) float32, orthonormal columns; empty once returned
    created: str = field(default_factory=now_iso)
    author: str | None = None
    returned: str | None = None  # when it was merged back; None while out

    @property
    def width(self) -> int:
        return self.concepts * self.rank

    @property
    def active(self) -> bool:
        return self.returned is None

    def meta(self) -> dict:
        return {"id": self.id, "name": self.name, "concepts": self.concepts, "rank": self.rank,
                "width": self.width, "created": self.created, "author": self.author, "returned": self.returned}

    def returned_copy(self, when: str | None = None) -> "Lease":
        return Lease(self.id, self.name, self.concepts, self.rank, {}, self.created, self.author,
                     self.returned or when or now_iso())


def lease_id_for(name: str) -> str:
    """A readable, practically unique id: the name's slug and 8 random hex digits."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.strip().lower()).strip("-")[:40] or "lease"
    return f"{slug}-{hashlib.sha256(os.urandom(16)).hexdigest()[:8]}"


def carve_block(taken: list[Tensor], in_features: int, width: int, eps: float,
                generator: torch.Generator) -> Tensor:
    """Orthonormal columns (m × width, float32) orthogonal to every column block in ``taken``."""
    from ..linalg.projector import NullSpaceProjector

    blocks = [torch.cat([t.to(torch.float64) for t in taken], 1)] if taken else []  # one Gram inverse
    projector = NullSpaceProjector(in_features, blocks, eps)
    return projector.random_orthonormal(width, generator)


def grant(bank, name: str, concepts: int, rank: int, author: str | None = None,
          seed: int | None = None) -> Lease:
    """A new lease of ``bank`` (a Bank; not modified): one block per adapted layer, orthogonal to
    every concept and to every lease still out. Refuses, naming the layer, when one is too full."""
    if concepts < 1 or rank < 1:
        raise InputError("A lease needs at least 1 concept of rank at least 1.")
    if not name.strip():
        raise InputError("A lease needs a name (--name), e.g. the artist who will train in it.")
    if bank.confined_to is not None:
        raise InputError("This file is itself a lease; grant leases from the bank it came from.")
    shapes = bank.layer_shapes()
    if not shapes:
        raise InputError("The bank has no adapted layers yet; train one concept before granting leases.")
    width = concepts * rank
    gen = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    blocks = {}
    for layer, (_, m) in shapes.items():
        taken = bank.taken_bases(layer)
        free = m - sum(t.shape[1] for t in taken)
        if free < width:
            raise CapacityError(f"Layer {layer} has {free} free input dimensions, the lease needs "
                                f"{width} ({concepts} concepts of rank {rank}).")
        blocks[layer] = carve_block(taken, m, width, bank.eps, gen)
    lease = Lease(lease_id_for(name), name.strip(), concepts, rank, blocks, author=author)
    return lease
