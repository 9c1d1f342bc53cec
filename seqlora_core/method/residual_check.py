"""Refusing a concept whose residual ΔW = A Bᵀ cannot be stored and used safely.

A concept whose factors hold a non-finite entry, or whose residual would overflow in half
precision, breaks every image of every bank it is merged into (one inf in a layer's output
turns the whole UNet pass into NaN), and it does so silently on other people's machines: banks
are shared, and fp16 GPU hosts are the common case. So the range is checked against the
narrower of the training host's dtype and float16, whatever precision the concept was trained
in, and the concept is refused, with the bank left as it was, before it can be written.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import SeqLoRAError

Eigenpairs = dict[str, tuple[Tensor, Tensor]]  # layer → (values (q,), vectors (m, q))


def residual_limit(dtype: torch.dtype) -> tuple[float, torch.dtype]:
    """The largest finite value of the narrower of ``dtype`` and float16, and that dtype (banks
    are shared with fp16 GPU hosts, so float16 bounds even an fp32 or bf16 training host)."""
    candidates = [torch.float16] + ([dtype] if dtype.is_floating_point else [])
    narrow = min(candidates, key=lambda d: torch.finfo(d).max)
    return float(torch.finfo(narrow).max), narrow


def check_residual_range(concept_id: str, a: dict[str, Tensor], b: dict[str, Tensor],
                         stats: Eigenpairs | None = None, dtype: torch.dtype = torch.float32) -> None:
    """Raise :class:`SeqLoRAError` (one line) when a layer's residual ΔW = A Bᵀ is unusable.

    Per layer (``a``: layer → (n, r), ``b``: layer → (m, r)) ΔW is formed in float64 (so the
    check itself cannot overflow) and refused when an entry is not finite, or its largest |entry|
    exceeds the limit of :func:`residual_limit`. Where ``stats`` holds the layer's top
    eigenpairs of the training inputs' second moment, ‖ΔW‖₂·√λ_max (an input of the RMS size of
    the inputs' top direction, times ΔW's largest gain) must stay under the limit too: small
    entries can still add up to an overflowing output. ‖ΔW‖₂ = ‖A Rᵀ‖₂ with B = QR, an n × r
    SVD instead of an n × m one. The layer named is the one furthest beyond the limit.
    """
    limit, narrow = residual_limit(dtype)
    name = str(narrow).removeprefix("torch.")
    worst: tuple[float, str, float, str] | None = None  # (ratio to the limit, layer, value, where)
    for layer, a_l in a.items():
        a64 = a_l.detach().to("cpu", torch.float64)
        b64 = b[layer].detach().to("cpu", torch.float64)
        delta = a64 @ b64.T
        if not torch.isfinite(delta).all():
            bad = float(delta[~torch.isfinite(delta)][0])
            raise SeqLoRAError(f"Concept '{concept_id}' was refused: its residual A·Bᵀ in layer {layer} is not "
                               f"finite ({bad}), so no {name} host could use it; lower the learning rates. "
                               "The bank was left as it was.")
        peak = float(delta.abs().max()) if delta.numel() else 0.0
        found = [(peak, "")]
        if stats is not None and layer in stats and stats[layer][0].numel() and delta.numel():
            lam = float(stats[layer][0].detach().to(torch.float64).max().clamp_min(0.0))
            r = torch.linalg.qr(b64)[1]
            gain = float(torch.linalg.svdvals(a64 @ r.T).max())  # ‖A Bᵀ‖₂
            found.append((gain * math.sqrt(lam), " on its training inputs' top direction"))
        for value, where in found:
            if value > limit and (worst is None or value / limit > worst[0]):
                worst = (value / limit, layer, value, where)
    if worst is not None:
        _, layer, value, where = worst
        raise SeqLoRAError(f"Concept '{concept_id}' was refused: its residual A·Bᵀ in layer {layer} reaches "
                           f"{value:.3g}{where}, beyond the largest {name} value ({limit:g}) of the hosts banks "
                           "are shared with; lower the learning rates. The bank was left as it was.")
