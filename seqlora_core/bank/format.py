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
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor

from .atomic import save_safetensors_atomic
from ..settings import CONSTRAINED_METHODS, METHODS
from ..errors import BankError, InputError
from ..method.lora import Factors, compose_factors
from ..method.projector import NullSpaceProjector, block_overlaps, probably_orthogonal

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
    # (id, created) of concepts deliberately removed in memory (never saved): overwriting a file
    # that still holds them is then no loss (bank.on_disk.refuse_dropping_concepts)
    removed: frozenset = field(default_factory=frozenset, compare=False, repr=False)

    def copy(self) -> "Bank":
        """A Bank of its own (list and base dict) sharing the concepts' tensors."""
        return Bank(dict(self.base), self.eps, list(self.concepts), self.removed)

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

    def width_summary(self, layers: list[dict] | None = None) -> list[dict]:
        """Per input width: how many layers, the most concepts any holds, the least any can hold."""
        widths: dict[int, dict] = {}
        for r in layers if layers is not None else self.layer_table():
            w = widths.setdefault(r["in_features"], {"width": r["in_features"], "layers": 0, "used": 0,
                                                     "capacity": r["capacity"]})
            w["layers"] += 1
            w["used"] = max(w["used"], r["used"])
            w["capacity"] = min(w["capacity"], r["capacity"])
        return sorted(widths.values(), key=lambda w: w["width"])

    def max_orthogonality_error(self, constrained_only: bool = True) -> float:
        """Worst normalised overlap ‖B_jᵀB_i‖_F / (‖B_j‖_F ‖B_i‖_F) between two concepts' bases on
        any layer (by default among the orthogonality-constrained concepts, the ones the guarantee
        covers). One Gram matrix of the stacked bases per layer, not a loop over concept pairs."""
        worst = 0.0
        for name in self.layer_shapes():
            bases = [c.B[name] for c in self.concepts if (c.constrained or not constrained_only) and name in c.B]
            if len(bases) > 1:
                worst = max(worst, float(block_overlaps(bases).max()))
        return worst

    def summary(self) -> dict:
        """Everything every surface shows about a bank (CLI ``bank info``, the ComfyUI panel and
        info text, the tab): concepts, per-layer and per-width capacity, the fullest layer, the
        orthogonality error. JSON-ready."""
        layers = self.layer_table()
        return {"base": dict(self.base), "eps": self.eps, "rank": self.rank,
                "concepts": [{"id": c.id, "token": c.token, "rank": c.rank, "method": c.method,
                              "init_word": c.init_word, "created": c.created, "final_loss": c.final_loss}
                             for c in self.concepts],
                "layers": layers, "widths": self.width_summary(layers),
                "fullest": min(layers, key=lambda r: r["capacity"] - r["used"]) if layers else None,
                "max_orthogonality_error": self.max_orthogonality_error()}

    def parse_selection(self, text: str) -> tuple[list[str], dict[str, float]]:
        """The one concept-selection syntax of every surface: 'chelsea:0.8, <coffee>' → ids in the
        order given and strengths (default 1.0); '', 'all' or '*' → every concept at 1.0. The same
        ``ID:STRENGTH`` form as A1111's ``<seqlora:BANK:ID:STRENGTH>``."""
        text = (text or "").strip()
        if text in ("", "all", "*"):
            return [c.id for c in self.concepts], {}
        ids, strengths = [], {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            ident, _, value = item.partition(":")
            ident = ident.strip().strip("<>").lower()
            self.get(ident)
            ids.append(ident)
            if value.strip():
                try:
                    strengths[ident] = float(value)
                except ValueError:
                    raise InputError(f"Strength in '{item}' is not a number; write id:0.8.") from None
        return ids, strengths

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
    def check_new_token(self, token: str) -> str:
        """The id a new concept with ``token`` gets; refuses a token whose id the bank already has."""
        ident = token_to_id(token)
        if any(c.id == ident for c in self.concepts):
            raise InputError(f"The bank already has a concept '{ident}'; choose another token.")
        return ident

    def with_concept(self, concept: Concept) -> "Bank":
        self.check_new_token(concept.id)
        return Bank(dict(self.base), self.eps, self.concepts + [concept], self.removed)

    def without(self, ident: str) -> "Bank":
        gone = self.get(ident)
        return Bank(dict(self.base), self.eps, [c for c in self.concepts if c.id != ident],
                    self.removed | {(gone.id, gone.created)})

    def check_base(self, architecture: str, fingerprint: str, allow_other_base: bool = False,
                   hint: str = "pass --allow-other-base to use it anyway") -> None:
        """Refuse another architecture always, another base's weights unless allowed; ``hint`` is
        how the surface at hand lets the user override (a flag, a toggle)."""
        arch = self.base.get("architecture")
        if arch != architecture:
            raise BankError(f"This bank was made for a {arch} base, not for the loaded {architecture} model.")
        if not allow_other_base and self.base.get("fingerprint") not in (None, fingerprint):
            raise BankError("This bank was made for another base model (weights fingerprint "
                            f"{self.base.get('fingerprint')}, loaded model {fingerprint}); {hint}.")

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


_CACHE: "OrderedDict[tuple, Bank]" = OrderedDict()
_CACHE_SIZE = 4  # banks can be hundreds of MiB; hosts reload the same one on every generation


def _file_identity(path: Path) -> tuple:
    """Changes whenever the file does: atomic saves rename a new inode into place."""
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


def load_bank(path: str | os.PathLike) -> Bank:
    """Read and validate a bank file; every defect becomes one BankError sentence.

    Validated banks are cached by file identity (path, inode, size, mtime), so a host that loads
    the same bank for every generation pays once; callers get their own Bank object (the tensors
    are shared and never modified in place)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BankError(f"Bank file {path} does not exist.")
    key = _file_identity(path)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key].copy()
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # safetensors raises several types for damaged files
        raise BankError(f"{path.name} is not a readable safetensors file.") from None
    bank = bank_from_parts(meta, tensors, path.name)
    _CACHE[key] = bank
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return bank.copy()


def _json(meta: dict, key: str, name: str):
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError):
        raise BankError(f"{name} has missing or malformed '{key}' metadata.") from None


def _header(meta: dict, name: str) -> tuple[list, dict, float]:
    """Format, version, concept entries, base and ε from the metadata, checked."""
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
    return entries, base, eps


def _group_tensors(tensors: dict[str, Tensor], name: str) -> dict[str, dict]:
    """One pass over the keys: id → {"A": {layer: t}, "B": {layer: t}, "embedding": t}."""
    grouped: dict[str, dict] = {}
    for key, t in tensors.items():
        parts = key.split(".", 3)  # concept . <id> . A|B . <layer>   or   concept . <id> . embedding
        if parts[0] != "concept" or len(parts) < 3:
            raise BankError(f"{name} holds a tensor of no listed concept ({key}).")
        slot = grouped.setdefault(parts[1], {"A": {}, "B": {}, "embedding": None})
        if parts[2] in ("A", "B") and len(parts) == 4:
            slot[parts[2]][parts[3]] = t
        elif parts[2] == "embedding" and len(parts) == 3:
            slot["embedding"] = t
        else:
            raise BankError(f"{name} holds a tensor of no listed concept ({key}).")
    return grouped


def _concept(entry, slot: dict | None, name: str, seen: set) -> Concept:
    """One concept from its metadata entry and tensors, with its shapes checked."""
    try:
        ident, rank, method = entry["id"], int(entry["rank"]), entry["method"]
    except (KeyError, TypeError, ValueError):
        raise BankError(f"{name} has a concept entry without id, rank or method.") from None
    if not isinstance(ident, str) or not ID_PATTERN.match(ident) or ident in seen:
        raise BankError(f"{name} has an invalid or repeated concept id {ident!r}.")
    if method not in METHODS:
        raise BankError(f"{name}: concept '{ident}' has unknown method {method!r}.")
    seen.add(ident)
    if slot is None or slot["embedding"] is None:
        raise BankError(f"{name}: concept '{ident}' has no token embedding.")
    A, B, emb = slot["A"], slot["B"], slot["embedding"]
    if not A or set(A) != set(B):
        raise BankError(f"{name}: concept '{ident}' does not have matching A and B factors for every layer.")
    for layer in A:
        a, b = A[layer], B[layer]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != rank or b.shape[1] != rank:
            raise BankError(f"{name}: concept '{ident}' layer {layer} has factors of shape "
                            f"{tuple(a.shape)} and {tuple(b.shape)}, not rank {rank}.")
    if emb.dim() != 2:
        raise BankError(f"{name}: concept '{ident}' has a malformed token embedding.")
    return Concept(id=ident, token=entry.get("token", f"<{ident}>"), init_word=entry.get("init_word", ""),
                   rank=rank, method=method, A=A, B=B, embedding=emb, created=entry.get("created", ""),
                   settings=entry.get("settings", {}), final_loss=entry.get("final_loss"))


def _finite(tensors: list[Tensor]) -> bool:
    """All values finite: a float64 sum is NaN or ±inf iff some value is (one pass, no mask)."""
    return all(bool(torch.isfinite(t.sum(dtype=torch.float64))) for t in tensors)


def _check_layers(concepts: list[Concept], name: str) -> None:
    """Per layer, stacked once: one width for every concept, finite values, orthogonal bases."""
    by_layer: dict[str, list[Concept]] = {}
    for c in concepts:
        for layer in c.A:
            by_layer.setdefault(layer, []).append(c)
    for layer, held in by_layer.items():
        widths = {(c.A[layer].shape[0], c.B[layer].shape[0]) for c in held}
        if len(widths) > 1:
            raise BankError(f"{name}: layer {layer} has factors of different widths {sorted(widths)}.")
        if not (_finite([c.A[layer] for c in held]) and _finite([c.B[layer] for c in held])):
            bad = next(c.id for c in held if not _finite([c.A[layer], c.B[layer]]))
            raise BankError(f"{name}: concept '{bad}' layer {layer} holds non-finite values.")
        bases = [c.B[layer] for c in held if c.constrained]
        if len(bases) > 1 and not probably_orthogonal(bases, ORTHOGONALITY_TOLERANCE):
            err = float(block_overlaps(bases).max())
            if err > ORTHOGONALITY_TOLERANCE:
                raise BankError(f"{name} breaks orthogonality: two concepts' bases overlap by {err:.2e} "
                                f"on {layer} (tolerance {ORTHOGONALITY_TOLERANCE:.0e}).")
    embeddings = [c.embedding for c in concepts]
    if len({e.shape[1] for e in embeddings}) > 1:
        raise BankError(f"{name} mixes token embeddings of widths {sorted({e.shape[1] for e in embeddings})}.")
    if embeddings and not _finite(embeddings):
        bad = next(c.id for c in concepts if not _finite([c.embedding]))
        raise BankError(f"{name}: concept '{bad}' has a malformed token embedding.")


def bank_from_parts(meta: dict, tensors: dict[str, Tensor], name: str = "bank") -> Bank:
    """A validated Bank from a file's metadata and tensors (every defect: one BankError)."""
    entries, base, eps = _header(meta, name)
    grouped = _group_tensors(tensors, name)
    seen: set[str] = set()
    concepts = [_concept(entry, grouped.get(entry.get("id") if isinstance(entry, dict) else None), name, seen)
                for entry in entries]
    stray = set(grouped) - seen
    if stray:
        raise BankError(f"{name} holds tensors of no listed concept (e.g. concept '{sorted(stray)[0]}').")
    _check_layers(concepts, name)
    return Bank(base, eps, concepts)
