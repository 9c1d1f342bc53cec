"""A short fingerprint of a base model's adaptable weights, stored in every bank.

A bank's residuals only mean something on the base they were trained on, so banks record the
architecture and this fingerprint, and refuse another base. It samples 64 entries of every
UNet attention projection (the UNet part of the ``full`` preset, so neither the choice of targets
nor having the text encoder at hand changes it — a ComfyUI MODEL alone is enough), rounded to
float16 so that fp16 and fp32 loads of the same checkpoint agree exactly.

A bfloat16 load rounds the weights more coarsely, so its digest differs. Banks therefore also keep
a *sketch*: a few of the same samples per layer, rounded to bfloat16. Two loads whose digests
differ are still the same base when every sketch value agrees within two bfloat16 steps
(`same_base`); a fine-tuned checkpoint moves many sampled weights much further and is refused.
Banks written before the sketch existed are matched by digest alone.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

import torch
from torch import nn

from ..settings import PRESETS

SAMPLES = 64
SKETCH_EVERY = 16  # every 16th of the 64 samples: 4 values per layer go into the bank's header
SKETCH_TOLERANCE = 2.0 ** -7  # two bfloat16 steps (8 significant bits), relative


class Fingerprint(str):
    """The 16-hex digest (compared, printed and stored as before) carrying the sketch made from
    the same samples, so that callers passing a fingerprint around need not change."""

    sketch: tuple[float, ...]

    def __new__(cls, digest: str, sketch: tuple[float, ...] = ()):
        self = super().__new__(cls, digest)
        self.sketch = tuple(sketch)
        return self

    @classmethod
    def recorded(cls, base: Mapping) -> "Fingerprint":
        """The fingerprint a bank's ``base`` record holds (digest and sketch), to compare two banks."""
        return cls(base.get("fingerprint") or "", base.get("sketch") or ())

    def base_fields(self) -> dict:
        """What a bank made on this base records in ``Bank.base`` (besides its architecture)."""
        return {"fingerprint": str(self), "sketch": list(self.sketch)}


def base_fingerprint(layers: Mapping[str, nn.Linear]) -> Fingerprint:
    regexes = [re.compile(p) for p in PRESETS["full"]]
    digest = hashlib.sha256()
    sketch: list[float] = []
    for name in sorted(n for n in layers if n.startswith("unet.") and any(r.search(n) for r in regexes)):
        w = layers[name].weight.detach().reshape(-1)
        idx = torch.linspace(0, w.numel() - 1, SAMPLES, device=w.device).long()
        samples = w[idx].to("cpu")
        digest.update(name.encode())
        digest.update(samples.to(torch.float16).numpy().tobytes())
        sketch += samples[::SKETCH_EVERY].to(torch.bfloat16).float().tolist()
    return Fingerprint(digest.hexdigest()[:16], tuple(sketch))


def same_base(recorded: Mapping, fingerprint: str) -> bool:
    """Whether a bank's ``base`` record (``fingerprint``, optional ``sketch``) names the loaded
    base: equal digests, or — when both sides have a sketch — sketches within the tolerance.
    A record without a fingerprint matches any base of its architecture."""
    made_for = recorded.get("fingerprint")
    if made_for is None or made_for == fingerprint:
        return True
    theirs, ours = recorded.get("sketch"), getattr(fingerprint, "sketch", ())
    if not isinstance(theirs, (list, tuple)) or not ours or len(theirs) != len(ours):
        return False
    try:
        return all(abs(float(a) - b) <= SKETCH_TOLERANCE * max(abs(float(a)), abs(b)) + 1e-12
                   for a, b in zip(theirs, ours))
    except (TypeError, ValueError):
        return False
