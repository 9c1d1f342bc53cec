"""Bank files in, validated bank fields out: every defect of a file becomes one BankError sentence.

A bank travels between machines and people, so nothing in it is trusted: metadata values are
type-checked before use, every tensor must belong to a listed concept or lease and have the
documented shape, dtype and finite values, recorded content hashes must match the tensors, lease
blocks must be orthonormal, and no two constrained bases (or a basis and an outstanding lease)
may overlap. Reads format versions 1 and 2 (v1 has no statistics, leases, hashes or history).
"""
from __future__ import annotations

import json
import math

import torch
from torch import Tensor

from ..errors import BankError
from ..settings import BANK_METHODS
from .lease import LEASE_ID_PATTERN, Lease
from .provenance import bank_digest, valid_history
from .spec import DEFAULT_EPS, DIGEST_KEY, FORMAT, ID_PATTERN, ORTHOGONALITY_TOLERANCE, READABLE_VERSIONS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _json(meta: dict, key: str, name: str, default=None):
    if key not in meta and default is not None:
        return default
    try:
        return json.loads(meta[key])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise BankError(f"{name} has missing or malformed '{key}' metadata.") from None


def _show(value, limit: int = 80) -> str:
    """A name from the file, safe for a one-line message: escaped and shortened."""
    return str(value).encode("unicode_escape").decode("ascii")[:limit]


def _opt_str(value) -> bool:
    return value is None or isinstance(value, str)


def _split_keys(tensors: dict[str, Tensor], name: str) -> tuple[dict, dict]:
    """One pass over the keys: concept id → {part → {layer → tensor}}, lease id → {layer → U}.
    Keys are ``concept.<id>.<A|B>.<layer>``, ``concept.<id>.stats.<values|vectors>.<layer>``,
    ``concept.<id>.embedding`` and ``lease.<id>.U.<layer>``; layers hold dots, ids do not."""
    concepts: dict[str, dict] = {}
    leases: dict[str, dict] = {}
    for key, t in tensors.items():  # tight: 30,720 keys in a 192-concept bank
        fields = key.split(".", 3)  # head, id, kind, layer
        head = fields[0]
        if head == "concept" and len(fields) >= 3:
            ident, kind, layer = fields[1], fields[2], fields[3] if len(fields) == 4 else None
            parts = concepts.get(ident)
            if parts is None:
                parts = concepts[ident] = {"A": {}, "B": {}, "stats.values": {}, "stats.vectors": {}}
            if (kind == "A" or kind == "B") and layer:
                parts[kind][layer] = t
            elif kind == "embedding" and layer is None:
                parts["embedding"] = t
            else:
                which, _, inner = (layer or "").partition(".")
                if kind != "stats" or which not in ("values", "vectors") or not inner:
                    raise BankError(f"{name} holds a tensor of unknown kind ({_show(key)}).")
                parts["stats." + which][inner] = t
        elif head == "lease" and len(fields) == 4 and fields[2] == "U" and fields[3]:
            leases.setdefault(fields[1], {})[fields[3]] = t
        else:
            raise BankError(f"{name} holds a tensor of no listed concept (e.g. {_show(key)}).")
    return concepts, leases


class _Finiteness:
    """Which tensors hold NaN or ±inf: the keys ``tensor_file.read_tensor_file`` found in its one
    pass over the file (so no tensor is summed again here), or, for tensors handed in without
    that (``nonfinite=None``), a check of each tensor's values."""

    def __init__(self, nonfinite: set[str] | None):
        self.nonfinite = nonfinite
        self.none = nonfinite is not None and not nonfinite  # known: every tensor is finite

    def __call__(self, key: str, t: Tensor) -> bool:
        if self.nonfinite is not None:
            return key not in self.nonfinite
        return bool(torch.isfinite(t).all())


def _check_matrix(t: Tensor, key: str, finite: _Finiteness, name: str, what) -> None:
    """``what()`` names the tensor in a message; called only on a refusal (30,000 tensors in a big bank)."""
    if t.dtype not in FLOAT_DTYPES:
        raise BankError(f"{name}: {what()} has dtype {t.dtype}, not a floating-point type.")
    if not finite(key, t):
        raise BankError(f"{name}: {what()} holds non-finite values.")


def _concept(entry, all_parts: dict, shapes: dict, name: str, version: str, finite: _Finiteness) -> dict:
    """The validated fields of one ``Concept``; its recorded content hash is checked by
    :func:`check_hashes` once the bank is built (a hash left empty is computed by ``Concept``)."""
    if not isinstance(entry, dict):
        raise BankError(f"{name} has a concept entry that is not an object.")
    ident, rank, method = entry.get("id"), entry.get("rank"), entry.get("method")
    if not isinstance(ident, str) or not ID_PATTERN.match(ident):
        raise BankError(f"{name} has an invalid concept id {_show(ident, 60)!r}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise BankError(f"{name}: concept '{ident}' has an invalid rank.")
    if method not in BANK_METHODS:
        raise BankError(f"{name}: concept '{ident}' has unknown method {_show(method, 40)!r}.")
    for key in ("token", "init_word", "created", "author", "lease", "hash"):
        if not _opt_str(entry.get(key)):
            raise BankError(f"{name}: concept '{ident}' has a malformed '{key}'.")
    settings, loss = entry.get("settings", {}), entry.get("final_loss")
    if not isinstance(settings, dict) or not (loss is None or (isinstance(loss, (int, float)) and not isinstance(loss, bool))):
        raise BankError(f"{name}: concept '{ident}' has malformed settings or final loss.")
    lease = entry.get("lease")
    if lease is not None and not LEASE_ID_PATTERN.match(lease):
        raise BankError(f"{name}: concept '{ident}' names an invalid lease id.")
    parts = all_parts.get(ident)
    if parts is None or "embedding" not in parts:
        raise BankError(f"{name}: concept '{ident}' has no token embedding.")
    A, B = parts["A"], parts["B"]
    if not A or set(A) != set(B):
        raise BankError(f"{name}: concept '{ident}' does not have matching A and B factors for every layer.")
    for layer in A:  # tight: 80 layers × 192 concepts in a big bank
        a, b = A[layer], B[layer]
        sa, sb = a.shape, b.shape
        if len(sa) != 2 or len(sb) != 2 or sa[1] != rank or sb[1] != rank:
            raise BankError(f"{name}: concept '{ident}' layer {_show(layer)} has factors of shape "
                            f"{tuple(sa)} and {tuple(sb)}, not rank {rank}.")
        if not (finite.none and a.dtype in FLOAT_DTYPES and b.dtype in FLOAT_DTYPES):
            what = lambda: f"concept '{ident}' layer {_show(layer)}"  # noqa: E731
            _check_matrix(a, f"concept.{ident}.A.{layer}", finite, name, what)
            _check_matrix(b, f"concept.{ident}.B.{layer}", finite, name, what)
        widths = (sa[0], sb[0])
        expected = shapes.setdefault(layer, widths)
        if expected != widths:
            raise BankError(f"{name}: layer {_show(layer)} has width {expected} for one concept and "
                            f"{widths} for '{ident}'.")
    emb = parts["embedding"]
    if emb.dim() != 2 or emb.shape[0] < 1 or emb.dtype not in FLOAT_DTYPES or not finite(f"concept.{ident}.embedding", emb):
        raise BankError(f"{name}: concept '{ident}' has a malformed token embedding.")
    stats = _stats(ident, parts, B, name, finite)
    A, B, emb = {k: v.float() for k, v in A.items()}, {k: v.float() for k, v in B.items()}, emb.float()
    recorded = entry.get("hash") if version != "1" else None  # v1 banks record none: computed by Concept
    return dict(id=ident, token=entry.get("token") or f"<{ident}>", init_word=entry.get("init_word") or "",
                rank=rank, method=method, A=A, B=B, embedding=emb, created=entry.get("created") or "",
                settings=settings, final_loss=loss, stats=stats, author=entry.get("author"), lease=lease,
                hash=recorded or "")


def _stats(ident: str, parts: dict, B: dict, name: str, finite: _Finiteness):
    values, vectors = parts["stats.values"], parts["stats.vectors"]
    if not values and not vectors:
        return None
    if set(values) != set(B) or set(vectors) != set(B):
        raise BankError(f"{name}: concept '{ident}' has activation statistics for some layers but not all.")
    out = {}
    for layer in B:
        v, u = values[layer], vectors[layer]
        if v.dim() != 1 or u.dim() != 2 or u.shape != (B[layer].shape[0], v.shape[0]) or v.shape[0] < 1:
            raise BankError(f"{name}: concept '{ident}' layer {_show(layer)} has activation statistics of "
                            f"shape {tuple(v.shape)} and {tuple(u.shape)}.")
        what = lambda: f"concept '{ident}' statistics"  # noqa: E731
        _check_matrix(v, f"concept.{ident}.stats.values.{layer}", finite, name, what)
        _check_matrix(u, f"concept.{ident}.stats.vectors.{layer}", finite, name, what)
        if bool((v < 0).any()):
            raise BankError(f"{name}: concept '{ident}' has negative second-moment eigenvalues.")
        out[layer] = (v.float(), u.float())
    return out


def _leases(entries, blocks: dict, shapes: dict, name: str, finite: _Finiteness) -> list[Lease]:
    if not isinstance(entries, list):
        raise BankError(f"{name} has malformed 'leases' metadata.")
    leases, seen, lease_widths = [], set(), {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise BankError(f"{name} has a lease entry that is not an object.")
        ident, n, r = entry.get("id"), entry.get("concepts"), entry.get("rank")
        if not isinstance(ident, str) or not LEASE_ID_PATTERN.match(ident) or ident in seen:
            raise BankError(f"{name} has an invalid or repeated lease id {_show(ident, 60)!r}.")
        seen.add(ident)
        if any(isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= 1 << 20 for x in (n, r)):
            raise BankError(f"{name}: lease '{ident}' has an invalid size.")
        if not all(_opt_str(entry.get(k)) for k in ("name", "created", "author", "returned")):
            raise BankError(f"{name}: lease '{ident}' has malformed metadata.")
        own = blocks.get(ident, {})
        if entry.get("returned") is None and not own:
            raise BankError(f"{name}: lease '{ident}' is out but its blocks are missing.")
        if entry.get("returned") is not None and own:
            raise BankError(f"{name}: lease '{ident}' was returned but still holds blocks.")
        for layer, u in own.items():
            m = shapes[layer][1] if layer in shapes else lease_widths.setdefault(layer, u.shape[0] if u.dim() else -1)
            if u.dim() != 2 or u.shape[1] != n * r or u.shape[0] != m or u.shape[1] > u.shape[0]:
                raise BankError(f"{name}: lease '{ident}' layer {_show(layer)} has a block of shape {tuple(u.shape)}.")
            _check_matrix(u, f"lease.{ident}.U.{layer}", finite, name, lambda: f"lease '{ident}' layer {_show(layer)}")
            u64 = u.to(torch.float64)
            if float((u64.T @ u64 - torch.eye(u.shape[1], dtype=torch.float64)).abs().max()) > ORTHOGONALITY_TOLERANCE:
                raise BankError(f"{name}: lease '{ident}' layer {_show(layer)} has a block without orthonormal columns.")
        leases.append(Lease(ident, entry.get("name") or ident, n, r, {k: v.float() for k, v in own.items()},
                            entry.get("created") or "", entry.get("author"), entry.get("returned")))
    stray = set(blocks) - seen
    if stray:
        raise BankError(f"{name} holds blocks of an unlisted lease ({_show(sorted(stray)[0], 60)}).")
    return leases


def check_header(meta: dict, name: str = "bank") -> None:
    """The header's ``format`` and ``format_version``: checked from the metadata alone (safetensors
    reads only the header for it), so a file that is no bank — a multi-GB checkpoint in the bank
    folder — is refused before a single tensor is read."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        shown = meta.get("format") if isinstance(meta, dict) else None
        raise BankError(f"{name} is not a SeqLoRA bank (format is {_show(shown, 40)!r}).")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise BankError(f"{name} has bank format version {_show(version, 20)!r}; this SeqLoRA reads "
                        f"versions {', '.join(READABLE_VERSIONS)}.")


def read_parts(meta: dict, tensors: dict[str, Tensor], name: str = "bank",
               nonfinite: set[str] | None = None) -> dict:
    """The validated fields of a ``Bank`` (its concepts as ``Concept`` fields) from a file's
    metadata and tensors; ``bank.format.bank_from_parts`` builds the Bank and then calls
    :func:`check_geometry` and :func:`check_hashes`. Plain fields rather than a Bank because
    ``bank.format`` is the floor above: ``Bank.save`` reads back what it writes with this reader.
    ``nonfinite``: the keys of tensors holding NaN or ±inf when the caller already knows them
    (``tensor_file.read_tensor_file``); None checks every tensor here."""
    finite = _Finiteness(nonfinite)
    check_header(meta, name)
    version = meta.get("format_version")
    entries = _json(meta, "concepts", name)
    base = _json(meta, "base", name)
    try:
        eps = float(meta.get("eps", DEFAULT_EPS))
    except (TypeError, ValueError):
        raise BankError(f"{name} has a malformed 'eps' value.") from None
    if not math.isfinite(eps) or not 0 <= eps < 1e-2:
        raise BankError(f"{name} has an 'eps' of {eps}, outside [0, 0.01).")
    if not isinstance(entries, list) or not isinstance(base, dict) or not _opt_str(base.get("architecture")):
        raise BankError(f"{name} has malformed concept or base metadata.")
    parts, blocks = _split_keys(tensors, name)
    if version == "1" and blocks:
        raise BankError(f"{name} is a version 1 bank but holds lease blocks.")
    concepts, shapes, seen = [], {}, set()
    for entry in entries:
        concept = _concept(entry, parts, shapes, name, version, finite)
        if concept["id"] in seen:
            raise BankError(f"{name} lists concept '{concept['id']}' twice.")
        seen.add(concept["id"])
        if version == "1" and concept["stats"] is not None:
            raise BankError(f"{name} is a version 1 bank but holds activation statistics.")
        concepts.append(concept)
    stray = set(parts) - seen
    if stray:
        raise BankError(f"{name} holds tensors of no listed concept (e.g. concept {_show(sorted(stray)[0], 60)}).")
    widths = {c["embedding"].shape[1] for c in concepts}
    if len(widths) > 1:
        raise BankError(f"{name} mixes token embeddings of widths {sorted(widths)}.")
    leases = _leases(_json(meta, "leases", name, default=[]), blocks, shapes, name, finite)
    history = _json(meta, "history", name, default=[])
    if not valid_history(history):
        raise BankError(f"{name} has malformed 'history' metadata.")
    confined = meta.get("lease") or None
    if confined is not None and not any(l.id == confined and l.active for l in leases):
        raise BankError(f"{name} is a lease file of lease {_show(confined, 60)!r}, which it does not hold.")
    return dict(base=base, eps=eps, concepts=concepts, leases=leases, confined_to=confined, history=history)


def check_hashes(bank, meta: dict, name: str, data_sha256=None, recorded: set[str] | None = None) -> None:
    """Every concept's recorded content hash matches its tensors and settings. ``recorded``: the
    ids of the concepts whose hash came from the file (None: all); the others' hashes were just
    computed by ``Concept`` and are not computed again. ``data_sha256``:
    a callable giving the file's data region's sha256 (``TensorFile.data_sha256``, None when
    that hash failed), when it was hashed in the read.
    Where the file's digest (metadata ``data_sha256``, ``provenance.bank_digest``) matches it,
    nothing has changed since ``Bank.save`` wrote the file, and that save read back and checked
    every hash it recorded: the hashes are vouched for in one pass over the file instead of
    30,000 small ones. Otherwise (no digest, a file edited or written by another tool) each hash
    is computed and compared, as before. ``bank``: a built ``bank.format.Bank``."""
    hashed = data_sha256() if data_sha256 is not None else None
    if hashed is not None and meta.get(DIGEST_KEY) == bank_digest(hashed, meta):
        return
    for c in bank.concepts:
        if (recorded is None or c.id in recorded) and c.content_hash() != c.hash:
            raise BankError(f"{name}: concept '{c.id}' does not match its recorded content hash "
                            "(its tensors or settings were altered).")


def check_geometry(bank, name: str) -> None:
    """No two constrained bases (or a basis and an outstanding lease) overlap; a lease file's
    concepts lie inside its lease. ``bank``: a built ``bank.format.Bank`` (its methods are used;
    the class is not imported, see :func:`read_parts`)."""
    if bank.probably_orthogonal():  # the fast sufficient probe; the exact Gram decides otherwise
        labels, worst = [], torch.zeros(0)
    else:
        labels, worst = bank.pairwise_overlaps()
    if worst.numel() and float(worst.max()) > ORTHOGONALITY_TOLERANCE:
        j, i = divmod(int(worst.argmax()), worst.shape[1])
        layer = _worst_layer(bank, labels[j], labels[i])
        raise BankError(f"{name} breaks orthogonality: {labels[j]} and {labels[i]} overlap by "
                        f"{float(worst.max()):.2e} on {_show(layer)} (tolerance {ORTHOGONALITY_TOLERANCE:.0e}).")
    lease = bank.confinement
    if lease is None:
        return
    for c in bank.lease_concepts(lease.id):
        for layer, b in c.B.items():
            u = lease.blocks.get(layer)
            b64 = b.to(torch.float64)
            outside = b64 if u is None else b64 - u.to(torch.float64) @ (u.to(torch.float64).T @ b64)
            if float(outside.norm()) > ORTHOGONALITY_TOLERANCE * max(float(b64.norm()), 1e-12):
                raise BankError(f"{name}: concept '{c.id}' leaves its lease on layer {_show(layer)}.")


def _worst_layer(bank, first: str, second: str) -> str:
    """The layer on which two owners (concept ids or ``lease <id>`` labels) overlap most."""
    def blocks(label: str) -> dict[str, Tensor]:
        if label.startswith("lease "):
            return bank.get_lease(label[len("lease "):]).blocks
        b = bank.get(label).B
        return {k: v / v.norm().clamp_min(1e-30) for k, v in b.items()}

    one, two = blocks(first), blocks(second)
    shared = [k for k in one if k in two and one[k].shape[0] == two[k].shape[0]]
    return max(shared, key=lambda k: float((one[k].double().T @ two[k].double()).norm()), default="?")
