"""The basis bank: every concept's factors and token embedding in one shareable file.

Format v2 (exact; other tools read it; README "Bank file format" lists every key) — a
safetensors file holding
  concept.<id>.A.<layer>               (n × r) float32
  concept.<id>.B.<layer>               (m × r) float32
  concept.<id>.embedding               (k × d)
  concept.<id>.stats.values.<layer>    (q,) float32, descending   } optional, for every layer
  concept.<id>.stats.vectors.<layer>   (m × q) float32            } of the concept or none
  lease.<lease id>.U.<layer>           (m × N·R) float32, orthonormal, for leases still out
and metadata ``format`` = "seqlora.bank", ``format_version`` = "2", ``concepts`` (JSON list in
training order: id, token, init_word, rank, method, created, settings, final_loss, layers, and
new in v2: hash, author, lease), ``base`` (JSON: architecture, fingerprint), ``eps``, and new
in v2: ``leases`` (JSON list), ``lease`` (the lease id a lease file is confined to, or ""),
``history`` (JSON list) and, optional, ``data_sha256`` (sha256 of the data region continued over
the ``concepts`` value, filled in by :meth:`Bank.save`). ``<layer>`` is the canonical (diffusers)
module path with a ``unet.`` / ``text_encoder.`` prefix. Version 1 files (no v2 keys) are still
read.

Files are written atomically (temp file in the same folder, fsync, rename) and validated in full
on load; any defect is reported as one sentence (:class:`BankError`).
"""
from __future__ import annotations

import gc
import json
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor

from .atomic import save_safetensors_atomic
from ..settings import CONSTRAINED_METHODS
from ..errors import BankError, CapacityError, InputError
from ..linalg.factors import Factors, compose_factors
from ..linalg.projector import NullSpaceProjector, block_overlaps, probably_orthogonal_layers
from .lease import Lease
from .provenance import bank_digest, content_hash, history_entry
from .reader import check_geometry, check_hashes, check_header, read_parts
from .spec import (  # noqa: F401 (importable from here, as before)
    DEFAULT_EPS, DIGEST_KEY, FORMAT, FORMAT_VERSION, ID_PATTERN, ORTHOGONALITY_TOLERANCE, READABLE_VERSIONS,
)
from .tensor_file import DIGEST_PLACEHOLDER, fill_digest, read_tensor_file

MAX_STRENGTH = 10.0  # |strength| of a composed concept; beyond it a picture only saturates


def token_to_id(token: str) -> str:
    """'<astro>' → 'astro'; refuses tokens that cannot make a valid id."""
    inner = token.strip()
    if inner.startswith("<") and inner.endswith(">"):
        inner = inner[1:-1]
    ident = inner.lower()
    if not ID_PATTERN.match(ident):
        raise InputError(f"Token '{token}' must look like <name> with name made of a-z, 0-9, _ or -.")
    return ident


def _token_key(token: str) -> str:
    """A token as prompts match it: CLIP lower-cases text, and '<x>' and 'x' name one concept."""
    inner = token.strip()
    return (inner[1:-1] if inner.startswith("<") and inner.endswith(">") else inner).lower()


def check_strength(strength: float, what: str = "A strength") -> float:
    """A composed concept's strength, finite and within ±MAX_STRENGTH (1e309, NaN or -1e30 gave
    an all-black picture), the one check of every surface (CLI, nodes, tab, A1111's tags)."""
    if not abs(strength) <= MAX_STRENGTH:  # also false for NaN
        raise InputError(f"{what} must be a finite number from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g}.")
    return strength


def parse_selection_text(text: str | None) -> list[tuple[str, float | None]] | None:
    """The one concept-selection syntax of every surface, checked without a bank:
    'chelsea:0.8, <coffee>' → [('chelsea', 0.8), ('coffee', None)]; '', 'all' or '*' → None
    (every concept). The same ``ID:STRENGTH`` form as A1111's ``<seqlora:BANK:ID:STRENGTH>``.
    Whether the ids exist is the bank's question (`Bank.parse_selection`)."""
    text = (text or "").strip()
    if text in ("", "all", "*"):
        return None
    chosen = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        ident, _, value = item.partition(":")
        try:
            ident = token_to_id(ident)
        except InputError:
            raise InputError(f"Concept '{ident.strip()}' in '{text}' is not a concept id "
                             "(letters, digits, _ or -).") from None
        strength = None
        if value.strip():
            try:
                strength = float(value)
            except ValueError:
                raise InputError(f"Strength in '{item}' is not a number; write id:0.8.") from None
            check_strength(strength, f"Strength in '{item}'")
        chosen.append((ident, strength))
    return chosen


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


Eigenpairs = dict[str, tuple[Tensor, Tensor]]  # layer → (values (q,), vectors (m, q)), float32


@dataclass
class Concept:
    id: str
    token: str
    init_word: str
    rank: int
    method: str
    A: dict[str, Tensor]  # layer → (n, r)
    B: dict[str, Tensor]  # layer → (m, r)
    embedding: Tensor  # (k, d)
    created: str = field(default_factory=now_iso)
    settings: dict = field(default_factory=dict)
    final_loss: float | None = None
    stats: Eigenpairs | None = None  # top eigenpairs of each layer's input second moment
    author: str | None = None
    lease: str | None = None  # id of the lease it was trained in
    hash: str = ""  # content hash (bank.provenance); computed when empty

    def __post_init__(self) -> None:
        if not self.hash:
            self.hash = self.content_hash()

    def content_hash(self) -> str:
        return content_hash(self.rank, self.method, self.init_word, self.settings, self.A, self.B, self.embedding)

    @property
    def constrained(self) -> bool:
        return self.method in CONSTRAINED_METHODS

    def meta(self) -> dict:
        return {"id": self.id, "token": self.token, "init_word": self.init_word, "rank": self.rank,
                "method": self.method, "created": self.created, "settings": self.settings,
                "final_loss": self.final_loss, "layers": len(self.A), "hash": self.hash,
                "author": self.author, "lease": self.lease}


@dataclass
class Bank:
    base: dict  # {"architecture": ..., "fingerprint": ...}
    eps: float = DEFAULT_EPS
    concepts: list[Concept] = field(default_factory=list)
    leases: list[Lease] = field(default_factory=list)  # every lease granted (or, in a lease file, its own)
    confined_to: str | None = None  # a lease file: new bases must lie in this lease's blocks
    history: list[dict] = field(default_factory=list)

    def copy(self) -> "Bank":
        """A Bank of its own (lists and base dict) sharing the concepts' and leases' tensors."""
        return self._with()

    # -- queries -----------------------------------------------------------------------------
    def get(self, ident: str) -> Concept:
        for c in self.concepts:
            if c.id == ident:
                return c
        known = ", ".join(c.id for c in self.concepts) or "none"
        raise InputError(f"The bank has no concept '{ident}' (it has: {known}).")

    def select(self, ids: list[str] | None) -> list[Concept]:
        return list(self.concepts) if not ids else [self.get(i) for i in ids]

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """layer → (out_features, in_features), over every concept, in first-seen order."""
        shapes: dict[str, tuple[int, int]] = {}
        for c in self.concepts:
            for name, a in c.A.items():
                shapes.setdefault(name, (a.shape[0], c.B[name].shape[0]))
        return shapes

    @property
    def active_leases(self) -> list[Lease]:
        return [lease for lease in self.leases if lease.active]

    def get_lease(self, ident: str) -> Lease:
        for lease in self.leases:
            if lease.id == ident:
                return lease
        raise InputError(f"The bank has no lease '{ident}'.")

    @property
    def confinement(self) -> Lease | None:
        """The lease this file is confined to (a lease file), else None."""
        return self.get_lease(self.confined_to) if self.confined_to else None

    def lease_concepts(self, lease_id: str) -> list[Concept]:
        return [c for c in self.concepts if c.lease == lease_id and c.constrained]

    def taken_bases(self, layer: str) -> list[Tensor]:
        """Column blocks of ``layer`` a new basis must avoid: every constrained concept's B and
        every outstanding lease's U (leased width counts as used)."""
        taken = [c.B[layer] for c in self.concepts if c.constrained and layer in c.B]
        return taken + [lease.blocks[layer] for lease in self.active_leases if layer in lease.blocks]

    def projector(self, layer: str, in_features: int) -> NullSpaceProjector:
        """Null-space projector of ``layer`` for a new constrained basis: against every taken
        block, or, in a lease file, inside the lease's block against the lease's concepts."""
        lease = self.confinement
        if lease is None:
            taken = self.taken_bases(layer)
            stacked = [torch.cat([t.to(torch.float64) for t in taken], 1)] if taken else []  # one Gram inverse
            return NullSpaceProjector(in_features, stacked, self.eps)
        if layer not in lease.blocks:
            raise CapacityError(f"Layer {layer} is not covered by lease '{lease.name}'; train with the "
                                "targets of the bank the lease came from.")
        earlier = [c.B[layer] for c in self.lease_concepts(lease.id) if layer in c.B]
        return NullSpaceProjector(in_features, earlier, self.eps, within=lease.blocks[layer])

    def check_room(self, rank: int) -> None:
        """In a lease file, refuse (by the lease's name) a concept the lease cannot hold."""
        lease = self.confinement
        if lease is None:
            return
        used = sum(c.rank for c in self.lease_concepts(lease.id))
        if used + rank > lease.width:
            held = len(self.lease_concepts(lease.id))
            raise CapacityError(f"Lease '{lease.name}' ({lease.id}) is full: it holds {held} concept(s) in "
                                f"{used} of its {lease.width} dimensions, rank {rank} needs more.")

    @property
    def rank(self) -> int:
        """The rank capacity is counted in: the latest concept's (4 for an empty bank)."""
        return self.concepts[-1].rank if self.concepts else 4

    def layer_table(self, rank: int | None = None) -> list[dict]:
        """Per adapted layer: width, concepts held, width leased out, and how many concepts it
        can hold at ``rank`` (in a lease file: inside the lease)."""
        rank = rank or self.rank
        lease = self.confinement
        rows = []
        for name, (n, m) in self.layer_shapes().items():
            if lease is None:
                held = [c for c in self.concepts if c.constrained and name in c.B]
                leased = sum(l.width for l in self.active_leases if name in l.blocks)
                room = m - leased
            else:
                held = [c for c in self.lease_concepts(lease.id) if name in c.B]
                leased, room = 0, lease.width if name in lease.blocks else 0
            used_width = sum(c.B[name].shape[1] for c in held)
            free = max(room - used_width, 0)
            rows.append({"name": name, "in_features": m, "out_features": n, "used": len(held),
                         "capacity": len(held) + free // rank, "free_width": free, "leased_width": leased})
        return rows

    def width_summary(self, layers: list[dict] | None = None) -> list[dict]:
        """Per input width: how many layers, the most concepts any holds, the least any can hold."""
        widths: dict[int, dict] = {}
        for r in layers if layers is not None else self.layer_table():
            w = widths.setdefault(r["in_features"], {"width": r["in_features"], "layers": 0, "used": 0,
                                                     "capacity": r["capacity"], "leased_width": 0})
            w["layers"] += 1
            w["used"] = max(w["used"], r["used"])
            w["capacity"] = min(w["capacity"], r["capacity"])
            w["leased_width"] = max(w["leased_width"], r["leased_width"])
        return sorted(widths.values(), key=lambda w: w["width"])

    def lease_table(self) -> list[dict]:
        """Each lease: id, name, N, R, width, created, author, returned, and concepts used."""
        return [dict(lease.meta(), used=sum(1 for c in self.concepts if c.lease == lease.id))
                for lease in self.leases]

    def pairwise_overlaps(self, constrained_only: bool = True) -> tuple[list[str], Tensor]:
        """Labels (concept ids, then ``lease <id>`` for leases still out) and the matrix of the
        worst overlap over layers between any two of them (float64, zero diagonal).

        Concept pairs: ‖B_jᵀB_i‖_F / (‖B_j‖_F ‖B_i‖_F); concept vs lease: ‖UᵀB‖_F / ‖B‖_F;
        lease vs lease: ‖U_jᵀU_i‖_F. One Gram matrix per layer, no loop over pairs. In a lease
        file the lease's own concepts are inside its block by design and are not compared with it.
        """
        concepts = [c for c in self.concepts if c.constrained or not constrained_only]
        leases = self.active_leases
        labels = [c.id for c in concepts] + [f"lease {l.id}" for l in leases]
        worst = torch.zeros(len(labels), len(labels), dtype=torch.float64)
        layers = dict.fromkeys(n for c in concepts for n in c.B)
        layers.update(dict.fromkeys(n for l in leases for n in l.blocks))
        for layer in layers:
            cols, owner = [], []
            for k, c in enumerate(concepts):
                if layer in c.B:
                    b = c.B[layer].to(torch.float64)
                    norm = b.norm()
                    cols.append(b / norm if norm > 0 else b)
                    owner += [k] * b.shape[1]
            for k, l in enumerate(leases, start=len(concepts)):
                if layer in l.blocks:
                    cols.append(l.blocks[layer].to(torch.float64))
                    owner += [k] * l.blocks[layer].shape[1]
            if len(set(owner)) < 2 or len({c.shape[0] for c in cols}) > 1:
                continue
            m = torch.cat(cols, dim=1)
            gram = m.T @ m
            onehot = torch.nn.functional.one_hot(torch.tensor(owner), len(labels)).to(torch.float64)
            worst = torch.maximum(worst, (onehot.T @ (gram * gram) @ onehot).clamp_min(0).sqrt())
        worst.fill_diagonal_(0.0)
        if self.confined_to:
            own = [k for k, c in enumerate(concepts) if c.lease == self.confined_to]
            if f"lease {self.confined_to}" in labels:
                j = labels.index(f"lease {self.confined_to}")
                worst[own, j] = 0.0
                worst[j, own] = 0.0
        return labels, worst

    def max_orthogonality_error(self, constrained_only: bool = True) -> float:
        """Worst normalised overlap between two concepts' bases (or a basis and a lease block,
        or two lease blocks) on any layer; by default among the orthogonality-constrained
        concepts only, the ones the guarantee covers.

        Remembered by content (:data:`_ORTHOGONALITY`): it is an exact float64 Gram per layer
        (2.9 s for 192 concepts on 80 layers of a 2-core CPU), and every surface that shows a
        bank asks for it, ComfyUI's bank nodes twice per run (their text and their panel), on
        copies of the same loaded bank."""
        key = (constrained_only, self.confined_to,
               tuple((c.id, c.hash, c.method, c.lease) for c in self.concepts),  # the hash covers A, B
               tuple((l.id, l.returned, tuple(l.blocks)) for l in self.leases))
        if key in _ORTHOGONALITY:
            _ORTHOGONALITY.move_to_end(key)
            return _ORTHOGONALITY[key]
        worst = self._orthogonality_error(constrained_only)
        _ORTHOGONALITY[key] = worst
        while len(_ORTHOGONALITY) > 16:
            _ORTHOGONALITY.popitem(last=False)
        return worst

    def _orthogonality_error(self, constrained_only: bool) -> float:
        if not self.active_leases:  # plain banks: one Gram per layer over the bases alone
            worst = 0.0
            for name in self.layer_shapes():
                bases = [c.B[name] for c in self.concepts if (c.constrained or not constrained_only) and name in c.B]
                if len(bases) > 1:
                    worst = max(worst, float(block_overlaps(bases).max()))
            return worst
        _, worst = self.pairwise_overlaps(constrained_only)
        return float(worst.max()) if worst.numel() else 0.0

    def probably_orthogonal(self) -> bool:
        """Fast sufficient check (``linalg.projector.probably_orthogonal``) that no two constrained
        bases and outstanding lease blocks overlap beyond the tolerance; False means "not shown",
        and the exact check decides. In a lease file the lease's own concepts sit inside its block,
        so the probe is skipped there."""
        if self.confined_to:
            return False
        constrained = [c for c in self.concepts if c.constrained]
        layers = dict.fromkeys(n for c in constrained for n in c.B)
        layers.update(dict.fromkeys(n for l in self.active_leases for n in l.blocks))
        per_layer = []
        for name in layers:
            blocks = [c.B[name] for c in constrained if name in c.B]
            blocks += [l.blocks[name] for l in self.active_leases if name in l.blocks]
            if len({b.shape[0] for b in blocks}) > 1:
                return False
            per_layer.append(blocks)
        return probably_orthogonal_layers(per_layer, ORTHOGONALITY_TOLERANCE)

    def summary(self) -> dict:
        """Everything every surface shows about a bank (CLI ``bank info``, the ComfyUI panel and
        info text, the tab): concepts with provenance, per-layer and per-width capacity (leased
        width counted as used), the fullest layer, leases, history, the orthogonality error.
        JSON-ready."""
        layers = self.layer_table()
        return {"base": dict(self.base), "eps": self.eps, "rank": self.rank,
                "concepts": [{"id": c.id, "token": c.token, "rank": c.rank, "method": c.method,
                              "init_word": c.init_word, "created": c.created, "final_loss": c.final_loss,
                              "hash": c.hash, "author": c.author, "lease": c.lease, "stats": c.stats is not None}
                             for c in self.concepts],
                "layers": layers, "widths": self.width_summary(layers),
                "fullest": min(layers, key=lambda r: r["capacity"] - r["used"]) if layers else None,
                "max_orthogonality_error": self.max_orthogonality_error(),
                "leases": self.lease_table(), "lease_file_of": self.confined_to, "history": list(self.history)}

    def parse_selection(self, text: str) -> tuple[list[str], dict[str, float]]:
        """`parse_selection_text` checked against this bank → ids in the order given and the
        strengths given (default 1.0 elsewhere); everything when the text selects all."""
        chosen = parse_selection_text(text)
        if chosen is None:
            return [c.id for c in self.concepts], {}
        for ident, _ in chosen:
            self.get(ident)
        return [i for i, _ in chosen], {i: s for i, s in chosen if s is not None}

    def composed_factors(self, ids: list[str] | None = None,
                         strengths: dict[str, float] | None = None) -> dict[str, Factors]:
        """Per layer one stacked pair with A Bᵀ = Σ_i s_i A_i B_iᵀ over the chosen concepts."""
        strengths = strengths or {}
        chosen = self.select(ids)
        out = {}
        for name in self.layer_shapes():
            parts = [(float(strengths.get(c.id, 1.0)), c.A[name], c.B[name]) for c in chosen if name in c.A]
            if parts:
                out[name] = compose_factors(parts)
        return out

    def embeddings(self, ids: list[str] | None = None) -> dict[str, Tensor]:
        return {c.token: c.embedding for c in self.select(ids)}

    # -- changes (each returns a new Bank with a history entry) ------------------------------
    def _with(self, **changes) -> "Bank":
        fields = dict(base=dict(self.base), eps=self.eps, concepts=list(self.concepts), leases=list(self.leases),
                      confined_to=self.confined_to, history=list(self.history))
        fields.update(changes)
        return Bank(**fields)

    def check_new_token(self, token: str) -> str:
        """The id a new concept with ``token`` gets; refuses a token whose id the bank already has."""
        ident = token_to_id(token)
        if any(c.id == ident for c in self.concepts):
            raise InputError(f"The bank already has a concept '{ident}'; choose another token.")
        # a concept's token may differ from its id (a hand-made or older bank); two concepts with
        # one token would share one embedding slot and a prompt would silently get only one of them
        clash = next((c for c in self.concepts if _token_key(c.token) == _token_key(token)), None)
        if clash is not None:
            raise InputError(f"The bank's concept '{clash.id}' already uses the token {clash.token}; choose another token.")
        return ident

    def with_concept(self, concept: Concept, author: str | None = None, **record) -> "Bank":
        """The bank with ``concept`` appended; ``record``: more fields of the history entry (an
        imported concept's source file and its sha256)."""
        self.check_new_token(concept.id)
        entry = history_entry("append", [(concept.id, concept.hash)], author or concept.author, lease=concept.lease,
                              **record)
        return self._with(concepts=self.concepts + [concept], history=self.history + [entry])

    def without(self, ident: str, author: str | None = None) -> "Bank":
        gone = self.get(ident)
        entry = history_entry("remove", [(gone.id, gone.hash)], author)
        return self._with(concepts=[c for c in self.concepts if c.id != ident], history=self.history + [entry])

    def removed_concepts(self) -> set[tuple[str, str]]:
        """(id, hash) of every concept this bank's history records as removed on purpose."""
        return {(c["id"], c["hash"]) for e in self.history if e.get("action") == "remove"
                for c in e.get("concepts", [])}

    def with_lease(self, lease: Lease) -> "Bank":
        entry = history_entry("lease", [], lease.author, lease=lease.id, note=f"{lease.name}: {lease.concepts} x rank {lease.rank}")
        return self._with(leases=self.leases + [lease], history=self.history + [entry])

    def lease_file(self, lease_id: str) -> "Bank":
        """The bank a lease holder trains in: same concepts and base, confined to the lease."""
        lease = self.get_lease(lease_id)
        return self._with(leases=[lease], confined_to=lease.id)

    def check_base(self, architecture: str, fingerprint: str, allow_other_base: bool = False,
                   hint: str = "pass --allow-other-base to use it anyway") -> None:
        """Refuse another architecture always, another base's weights unless allowed; ``hint`` is
        how the surface at hand lets the user override (a flag, a toggle)."""
        arch = self.base.get("architecture")
        if arch != architecture:
            raise BankError(f"This bank was made for a {arch} base, not for the loaded {architecture} model.")
        from .fingerprint import same_base

        if not allow_other_base and not same_base(self.base, fingerprint):
            raise BankError("This bank was made for another base model (weights fingerprint "
                            f"{self.base.get('fingerprint')}, loaded model {fingerprint}); {hint}.")

    # -- file --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        seen: set[int] = set()

        def f32(t: Tensor) -> Tensor:
            out = t.detach().to("cpu", torch.float32).contiguous()
            if out.data_ptr() in seen:  # two concepts sharing a tensor (a copy): safetensors needs its own
                out = out.clone()
            seen.add(out.data_ptr())
            return out

        out = {}
        for c in self.concepts:
            for name in c.A:
                out[f"concept.{c.id}.A.{name}"] = f32(c.A[name])
                out[f"concept.{c.id}.B.{name}"] = f32(c.B[name])
            out[f"concept.{c.id}.embedding"] = f32(c.embedding)
            for name, (values, vectors) in (c.stats or {}).items():
                out[f"concept.{c.id}.stats.values.{name}"] = f32(values)
                out[f"concept.{c.id}.stats.vectors.{name}"] = f32(vectors)
        for lease in self.active_leases:
            for name, block in lease.blocks.items():
                out[f"lease.{lease.id}.U.{name}"] = f32(block)
        return out

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "concepts": json.dumps([c.meta() for c in self.concepts]),
                "base": json.dumps(self.base), "eps": repr(float(self.eps)),
                "leases": json.dumps([l.meta() for l in self.leases]), "lease": self.confined_to or "",
                "history": json.dumps(self.history), DIGEST_KEY: DIGEST_PLACEHOLDER}

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a reader sees the old file or the new one, never a mix. What is about
        to be written is first read back with the bank reader; a bank the reader would refuse is
        never renamed into place (the old file stays, one BankError says why)."""
        path = Path(path)
        save_safetensors_atomic(self.tensors(), path, self.metadata(), seal=_seal,
                                check=lambda tmp: check_readable(tmp, path.name), what="the bank on disk")


def bank_from_parts(meta: dict, tensors: dict[str, Tensor], name: str = "bank",
                    nonfinite: set[str] | None = None, data_sha256=None) -> Bank:
    """A validated Bank from a file's metadata and tensors (``bank.reader`` checks every field and
    tensor, then the geometry of the built bank, then its content hashes). ``nonfinite``: see
    ``reader.read_parts``; ``data_sha256``: see ``reader.check_hashes`` (None computes every hash)."""
    fields = read_parts(meta, tensors, name, nonfinite)
    recorded = {c["id"] for c in fields["concepts"] if c["hash"]}  # the others: computed by Concept
    fields["concepts"] = [Concept(**c) for c in fields["concepts"]]
    bank = Bank(**fields)
    check_geometry(bank, name)
    check_hashes(bank, meta, name, data_sha256, recorded)
    return bank


def _seal(tmp: Path) -> None:
    """Fill in the written file's digest (``provenance.bank_digest``)."""
    fill_digest(tmp, DIGEST_KEY, bank_digest)


def check_readable(tmp: Path, name: str) -> None:
    """Raise BankError when the reader refuses the written file ``tmp`` (to be saved as ``name``).

    Why read the written file rather than validate the Bank in memory: the file is what every
    later run reads; a value that changes on the way (a float32 cast that overflows, a tensor
    left out) shows only there. Every content hash is computed here, whatever the digest says:
    a load later trusts the hashes this check passed when the file's digest still matches."""
    try:
        try:
            read = read_tensor_file(tmp)
        except (OSError, ValueError):
            raise BankError("it is not a readable safetensors file") from None
        bank_from_parts(read.meta, read.tensors, name, read.nonfinite)
    except BankError as exc:
        raise BankError(f"{name} was not written, because the bank reader would refuse the result "
                        f"({str(exc).rstrip('.')}); the bank on disk was left as it was.") from None


# a bank's content (ids, content hashes, methods, leases) → its max_orthogonality_error
_ORTHOGONALITY: "OrderedDict[tuple, float]" = OrderedDict()
_CACHE: "OrderedDict[tuple, Bank]" = OrderedDict()
_CACHE_SIZE = 4  # banks can be hundreds of MiB; hosts reload the same one on every generation


def _file_identity(path: Path) -> tuple:
    """Changes whenever the file does: atomic saves rename a new inode into place."""
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while a bank is read: a 192-concept bank makes about
    100,000 objects (tensors, dict entries, header entries), none of them in a cycle, and the
    collector's passes over the growing heap cost about a fifth of the load."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_bank(path: str | os.PathLike) -> Bank:
    """Read and validate a bank file (``bank.reader``); every defect becomes one BankError sentence.

    The file is read in one pass (``bank.tensor_file``: one read into one buffer, tensors as views
    of it, finiteness of each run of tensors in one sum) and closed before this returns, so a later
    save can rename over it on every platform.

    Validated banks are cached by file identity (path, inode, size, mtime), so a host that loads
    the same bank for every generation pays once; callers get their own Bank object (the tensors
    are shared and never modified in place)."""
    path = Path(path)
    if not path.is_file():
        raise BankError(f"Bank file {path} does not exist.")
    key = _file_identity(path)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key].copy()
    with _collector_paused():
        try:
            # one pass (tensor_file): the header first (a multi-GB checkpoint fails before any
            # tensor is read), then every tensor and which hold non-finite values, and the data
            # region's sha256 in the background (reader.check_hashes)
            read = read_tensor_file(path, lambda meta: check_header(meta, path.name), hash_data=True)
        except BankError:
            raise
        except Exception:  # OSError, ValueError (a damaged header or data region), MemoryError, ...
            raise BankError(f"{path.name} is not a readable safetensors file.") from None
        bank = bank_from_parts(read.meta, read.tensors, path.name, read.nonfinite, read.data_sha256)
    _CACHE[key] = bank
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return bank.copy()
