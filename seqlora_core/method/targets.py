"""Which linear layers a concept adapts: presets and custom name patterns.

``default``  inputs of width 768 on SD-1.5: UNet cross-attention to_k / to_v (they read the text
             embedding) and every text-encoder attention projection. Capacity 768 / 4 = 192
             concepts at rank 4, above the paper's largest stream (101).
``unet-cross``  UNet cross-attention to_k / to_v only; the text encoder is left alone, so a
             concept's residual acts on the text features inside the UNet only. Same capacity as
             ``default``; ``bench/forgetting.py`` measures which of the two leaks less.
``full``     every UNet attention projection (self- and cross-attention q, k, v, out) plus the
             text encoder's: higher fidelity, but the 320-wide layers of the outer blocks hold
             only 80 concepts at rank 4.
Anything else is read as comma-separated regular expressions over canonical layer names.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from ..errors import InputError

from ..settings import PRESETS, TEXT_ATTENTION  # noqa: F401 (defined there: bank.fingerprint reads them too)


def patterns_for(spec: str) -> list[str]:
    if spec in PRESETS:
        return PRESETS[spec]
    return [p.strip() for p in spec.split(",") if p.strip()]


def select_layers(layers: Mapping[str, nn.Linear], spec: str = "default") -> dict[str, nn.Linear]:
    """The layers whose canonical name matches the preset or patterns, in model order."""
    try:
        regexes = [re.compile(p) for p in patterns_for(spec)]
    except re.error as exc:
        raise InputError(f"Target pattern '{spec}' is not a valid regular expression ({exc}).") from None
    chosen = {name: mod for name, mod in layers.items() if any(r.search(name) for r in regexes)}
    if not chosen:
        raise InputError(f"Targets '{spec}' match no linear layer of this model.")
    return chosen
