"""Training a half-precision model (fp16 / bf16) with fp32 factors: the pieces that keep it exact.

Hosts run SD-1.5 in fp16 on a GPU. The method keeps everything it owns in fp32 — the factors A
and B, the token embedding, the optimiser state — and touches the model's precision in only
three places:

* the LoRA branch is computed in fp32 and added back in the model's dtype (``lora.lora_delta``);
* the one pass whose graph is differentiated twice runs its normalisation layers in fp32
  (:class:`Fp32Normalisation`): with ``create_graph=True`` torch's GroupNorm switches to a
  double-differentiable backward that cubes ``rstd``; in fp16 that overflows once a group's
  standard deviation is below about 0.025, which makes every entry of ∇_B and of the
  cross-Hessian term non-finite while first-order passes stay finite;
* fp16 gradients are taken of a scaled loss (:class:`LossScale`), so that small gradients do
  not underflow; a pass whose gradients are non-finite is skipped, reported, and the scale
  halved — not mistaken for divergence. bf16 has fp32's range and needs no scale.

Why not ``torch.autocast``: its CPU policy keeps group_norm and layer_norm in bf16 (checked on
torch 2.13), so it cannot be tested here, and with fp16-stored weights a bf16 autocast would
re-cast every weight on every call. The explicit fp32 islands above do what autocast's fp32 list
would, on every device and every host.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

HALF = (torch.float16, torch.bfloat16)
_NORMS = {F.group_norm, F.layer_norm, torch.group_norm, torch.layer_norm}


def _up(value):
    return value.float() if isinstance(value, Tensor) and value.dtype in HALF else value


class Fp32Normalisation(TorchFunctionMode):
    """Inside this context every group / layer norm on a half tensor computes in fp32 and
    returns the input's dtype. A torch-function mode, so it needs no access to the host's
    modules (diffusers, ComfyUI's ops and ldm's GroupNorm32 all call ``F.group_norm``) and is
    local to the thread that enters it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)]
        if func in _NORMS and tensors and any(t.dtype in HALF for t in tensors):
            dtype = tensors[0].dtype  # the input's: ldm's GroupNorm32 passes x.float() with half weights
            out = func(*(_up(a) for a in args), **{k: _up(v) for k, v in kwargs.items()})
            return out.to(dtype)
        return func(*args, **kwargs)


class LossScale:
    """Dynamic loss scale for fp16 (GradScaler's rule, on plain tensors lists): gradients are taken
    of ``loss · scale`` and divided by ``scale``; a non-finite pass halves the scale, every
    ``growth_interval`` finite passes in a row double it. ``scale`` stays 1 for fp32 and bf16."""

    def __init__(self, dtype: torch.dtype, initial: float = 2.0 ** 14, growth_interval: int = 200,
                 minimum: float = 1.0, maximum: float = 2.0 ** 24):
        self.dynamic = dtype == torch.float16
        self.scale = initial if self.dynamic else 1.0
        self.growth_interval, self.minimum, self.maximum = growth_interval, minimum, maximum
        self._good = 0

    def update(self, finite: bool) -> None:
        if not self.dynamic:
            return
        if not finite:
            self.scale = max(self.scale / 2, self.minimum)
            self._good = 0
            return
        self._good += 1
        if self._good >= self.growth_interval:
            self.scale = min(self.scale * 2, self.maximum)
            self._good = 0


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """0-d bool tensor: every entry of every tensor is finite. One batched reduction on the
    tensors' device; the caller decides when to read it (one host sync)."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.tensor(True)
    norms = torch._foreach_norm([t.detach() for t in tensors])  # inf / nan propagate into the norm
    return torch.isfinite(torch.stack([n.float() for n in norms])).all()
