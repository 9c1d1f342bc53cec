"""The basis bank: every concept's factors and token embedding in one shareable file.

Format v1 (exact; other tools read it) — a safetensors file holding
  concept.<id>.A.<layer>    (n × r) float32
  concept.<id>.B.<layer>    (m × r) float32
  concept.<id>.embedding    (k × d)
and metadata ``format`` = "seqlora.bank", ``format_version`` = "1", ``concepts`` (JSON list in
training order: id, token, init_word, rank, method, created, settings, final_loss, targets),
``base`` (JSON: architecture, fingerprint) and ``eps``. ``<layer>`` is the canonical
(diffusers) module path with a ``unet.`` / ``text_encoder.`` prefix.

Files are written atomically (temp file in the same folder, fsync, rename) and validated in full
on load; any defect is reported as one sentence (:class:`BankError`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor

from .atomic import save_safetensors_atomic
from ..settings import CONSTRAINED_METHODS, METHODS
from ..errors import BankError, InputError
from ..method.lora import Factors, compose_factors
from ..method.projector import NullSpaceProjector, normalised_overlap

FORMAT = "seqlora.bank"
FORMAT_VERSION = "1"
ID_PATTERN = re.compile(r"^[a-z0-9_-]+$")
ORTHOGONALITY_TOLERANCE = 1e-4
DEFAULT_EPS = 1e-8


def token_to_id(token: str) -> str:
    """'<astro>' → 'astro'; refuses tokens that cannot make a valid id."""
    inner = token.strip()
    if inner.startswith("<") and inner.endswith(">"):
        inner = inner[1:-1]
    ident = inner.lower()
    if not ID_PATTERN.match(ident):
        raise InputError(f"Token '{token}' must look like <name> with name made of a-z, 0-9, _ or -.")
    return ident


def parse_strengths(items: list[str]) -> dict[str, float]:
    """['chelsea=0.8', …] → {'chelsea': 0.8}; one sentence for a malformed item."""
    out = {}
    for item in items:
        ident, _, value = item.partition("=")
        try:
            out[ident.strip()] = float(value)
        except ValueError:
            raise InputError(f"Strength '{item}' should look like id=0.8.") from None
    return out


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


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

    @property
    def constrained(self) -> bool:
        return self.method in CONSTRAINED_METHODS

    def meta(self) -> dict:
        return {"id": self.id, "token": self.token, "init_word": self.init_word, "rank": self.rank,
                "method": self.method, "created": self.created, "settings": self.settings,
                "final_loss": self.final_loss, "layers": len(self.A)}


@dataclass
class Bank:
    base: dict  # {"architecture": ..., "fingerprint": ...}
    eps: float = DEFAULT_EPS
    concepts: list[Concept] = field(default_factory=list)

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

    def projector(self, layer: str, in_features: int) -> NullSpaceProjector:
        """Null-space projector of ``layer`` against every constrained concept's basis."""
        earlier = [c.B[layer] for c in self.concepts if c.constrained and layer in c.B]
        return NullSpaceProjector(in_features, earlier, self.eps)

    @property
    def rank(self) -> int:
        """The rank capacity is counted in: the latest concept's (4 for an empty bank)."""
        return self.concepts[-1].rank if self.concepts else 4

    def layer_table(self, rank: int | None = None) -> list[dict]:
        """Per adapted layer: width, concepts held, and how many it can hold at ``rank``."""
        rank = rank or self.rank
        rows = []
        for name, (n, m) in self.layer_shapes().items():
            held = [c for c in self.concepts if c.constrained and name in c.B]
            used_width = sum(c.B[name].shape[1] for c in held)
            rows.append({"name": name, "in_features": m, "out_features": n, "used": len(held),
                         "capacity": len(held) + (m - used_width) // rank, "free_width": m - used_width})
        return rows

    def width_summary(self) -> list[dict]:
        """Per input width: how many layers, the most concepts any holds, the least any can hold."""
        widths: dict[int, dict] = {}
        for r in self.layer_table():
            w = widths.setdefault(r["in_features"], {"width": r["in_features"], "layers": 0, "used": 0,
                                                     "capacity": r["capacity"]})
            w["layers"] += 1
            w["used"] = max(w["used"], r["used"])
            w["capacity"] = min(w["capacity"], r["capacity"])
        return sorted(widths.values(), key=lambda w: w["width"])

    def max_orthogonality_error(self, constrained_only: bool = True) -> float:
        """Worst normalised overlap between two concepts' bases on any layer (by default among
        the orthogonality-constrained concepts only, the ones the guarantee covers)."""
        worst = 0.0
        for name in self.layer_shapes():
            bases = [c.B[name] for c in self.concepts if (c.constrained or not constrained_only) and name in c.B]
            for j in range(len(bases)):
                for i in range(j + 1, len(bases)):
                    worst = max(worst, normalised_overlap(bases[j], bases[i]))
        return worst

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

    # -- changes -----------------------------------------------------------------------------
    def with_concept(self, concept: Concept) -> "Bank":
        if any(c.id == concept.id for c in self.concepts):
            raise InputError(f"The bank already has a concept '{concept.id}' (token {concept.token}).")
        return Bank(dict(self.base), self.eps, self.concepts + [concept])

    def without(self, ident: str) -> "Bank":
        self.get(ident)
        return Bank(dict(self.base), self.eps, [c for c in self.concepts if c.id != ident])

    def check_base(self, architecture: str, fingerprint: str, allow_other_base: bool = False) -> None:
        arch = self.base.get("architecture")
        if arch != architecture:
            raise BankError(f"This bank was made for a {arch} base, not for the loaded {architecture} model.")
        if not allow_other_base and self.base.get("fingerprint") not in (None, fingerprint):
            raise BankError("This bank was made for another base model (weights fingerprint "
                            f"{self.base.get('fingerprint')}, loaded model {fingerprint}); "
                            "pass --allow-other-base to use it anyway.")

    # -- file --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for c in self.concepts:
            for name in c.A:
                out[f"concept.{c.id}.A.{name}"] = c.A[name].detach().to("cpu", torch.float32).contiguous()
                out[f"concept.{c.id}.B.{name}"] = c.B[name].detach().to("cpu", torch.float32).contiguous()
            out[f"concept.{c.id}.embedding"] = c.embedding.detach().to("cpu", torch.float32).contiguous()
        return out

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "concepts": json.dumps([c.meta() for c in self.concepts]),
                "base": json.dumps(self.base), "eps": repr(float(self.eps))}

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a reader sees the old file or the new one, never a mix."""
        save_safetensors_atomic(self.tensors(), path, self.metadata())


def load_bank(path: str | os.PathLike) -> Bank:
    """Read and validate a bank file; every defect becomes one BankError sentence."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BankError(f"Bank file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise BankError(f"{path.name} is not a readable safetensors file ({type(exc).__name__}).") from None
    return bank_from_parts(meta, tensors, path.name)


def _json(meta: dict, key: str, name: str):
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError):
        raise BankError(f"{name} has missing or malformed '{key}' metadata.") from None


def bank_from_parts(meta: dict, tensors: dict[str, Tensor], name: str = "bank") -> Bank:
    if meta.get("format") != FORMAT:
        raise BankError(f"{name} is not a SeqLoRA bank (format is {meta.get('format')!r}).")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BankError(f"{name} has bank format version {meta.get('format_version')!r}; this SeqLoRA reads version {FORMAT_VERSION}.")
    entries = _json(meta, "concepts", name)
    base = _json(meta, "base", name)
    try:
        eps = float(meta.get("eps", DEFAULT_EPS))
    except ValueError:
        raise BankError(f"{name} has a malformed 'eps' value.") from None
    if not isinstance(entries, list) or not isinstance(base, dict):
        raise BankError(f"{name} has malformed concept or base metadata.")
    concepts, seen, used_keys, shapes = [], set(), set(), {}
    for entry in entries:
        try:
            ident, rank, method = entry["id"], int(entry["rank"]), entry["method"]
        except (KeyError, TypeError, ValueError):
            raise BankError(f"{name} has a concept entry without id, rank or method.") from None
        if not isinstance(ident, str) or not ID_PATTERN.match(ident) or ident in seen:
            raise BankError(f"{name} has an invalid or repeated concept id {ident!r}.")
        if method not in METHODS:
            raise BankError(f"{name}: concept '{ident}' has unknown method {method!r}.")
        seen.add(ident)
        A, B = {}, {}
        prefix_a, prefix_b = f"concept.{ident}.A.", f"concept.{ident}.B."
        for key, t in tensors.items():
            if key.startswith(prefix_a):
                A[key[len(prefix_a):]] = t
            elif key.startswith(prefix_b):
                B[key[len(prefix_b):]] = t
        emb_key = f"concept.{ident}.embedding"
        if emb_key not in tensors:
            raise BankError(f"{name}: concept '{ident}' has no token embedding.")
        if not A or set(A) != set(B):
            raise BankError(f"{name}: concept '{ident}' does not have matching A and B factors for every layer.")
        for layer in A:
            a, b = A[layer], B[layer]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != rank or b.shape[1] != rank:
                raise BankError(f"{name}: concept '{ident}' layer {layer} has factors of shape "
                                f"{tuple(a.shape)} and {tuple(b.shape)}, not rank {rank}.")
            expected = shapes.setdefault(layer, (a.shape[0], b.shape[0]))
            if expected != (a.shape[0], b.shape[0]):
                raise BankError(f"{name}: layer {layer} has width {expected} for one concept and "
                                f"{(a.shape[0], b.shape[0])} for '{ident}'.")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise BankError(f"{name}: concept '{ident}' layer {layer} holds non-finite values.")
        emb = tensors[emb_key]
        if emb.dim() != 2 or not torch.isfinite(emb).all():
            raise BankError(f"{name}: concept '{ident}' has a malformed token embedding.")
        used_keys.update(f"{prefix_a}{k}" for k in A)
        used_keys.update(f"{prefix_b}{k}" for k in B)
        used_keys.add(emb_key)
        concepts.append(Concept(
            id=ident, token=entry.get("token", f"<{ident}>"), init_word=entry.get("init_word", ""),
            rank=rank, method=method, A=A, B=B, embedding=emb, created=entry.get("created", ""),
            settings=entry.get("settings", {}), final_loss=entry.get("final_loss")))
    stray = set(tensors) - used_keys
    if stray:
        raise BankError(f"{name} holds tensors of no listed concept (e.g. {sorted(stray)[0]}).")
    widths = {e.shape[1] for e in (c.embedding for c in concepts)}
    if len(widths) > 1:
        raise BankError(f"{name} mixes token embeddings of widths {sorted(widths)}.")
    bank = Bank(base, eps, concepts)
    err = bank.max_orthogonality_error()
    if err > ORTHOGONALITY_TOLERANCE:
        raise BankError(f"{name} breaks orthogonality: two concepts' bases overlap by {err:.2e} "
                        f"(tolerance {ORTHOGONALITY_TOLERANCE:.0e}).")
    return bank
