"""A short fingerprint of a base model's adaptable weights, stored in every bank.

A bank's residuals only mean something on the base they were trained on, so banks record the
architecture and this fingerprint, and refuse another base. It samples 64 entries of every
UNet attention projection (the UNet part of the ``full`` preset, so neither the choice of targets
nor having the text encoder at hand changes it — a ComfyUI MODEL alone is enough), rounded to
float16 so that fp16 and fp32 loads of the same checkpoint agree.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

import torch
from torch import nn

from ..method.targets import PRESETS

SAMPLES = 64


def base_fingerprint(layers: Mapping[str, nn.Linear]) -> str:
    regexes = [re.compile(p) for p in PRESETS["full"]]
    digest = hashlib.sha256()
    for name in sorted(n for n in layers if n.startswith("unet.") and any(r.search(n) for r in regexes)):
        w = layers[name].weight.detach().reshape(-1)
        idx = torch.linspace(0, w.numel() - 1, SAMPLES, device=w.device).long()
        digest.update(name.encode())
        digest.update(w[idx].to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()[:16]
