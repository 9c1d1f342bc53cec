"""LoRA factor pairs and their exact composition: Σ s_i A_i B_iᵀ = [s_1A_1 …] [B_1 …]ᵀ.

Used by ``method.lora`` (the hooks add the composed pair) and by ``bank.format``
(``Bank.composed_factors``).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

Factors = tuple[Tensor, Tensor]  # (A: n × r, B: m × r)


def compose_factors(parts: Iterable[tuple[float, Tensor, Tensor]]) -> Factors:
    """Stack (scale, A, B) triples into one pair with A_cat B_catᵀ = Σ scale·A Bᵀ."""
    parts = list(parts)
    a_cat = torch.cat([s * a for s, a, _ in parts], dim=1)  # (n, Σr)
    b_cat = torch.cat([b for _, _, b in parts], dim=1)  # (m, Σr)
    return a_cat, b_cat
