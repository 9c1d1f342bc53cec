"""Query-sliced attention for the twice-differentiated pass.

The pass whose graph is differentiated twice runs attention on torch's math kernel (the fused
ones have no double backward), which materialises the (queries × keys) scores and their softmax
for all heads at once: at 512 px the 4096-token self-attention layers hold 8 × 4096 × 4096 of
each. :class:`SlicedAttention` computes ``F.scaled_dot_product_attention`` in chunks of
``chunk`` queries (each row of the softmax depends on its own query only, so the result is the
same) from ordinary differentiable ops, so the double backward still works and only one
chunk's scores exist at a time while the pass runs forward.

What it does not do: the kept graph still saves every chunk's softmax (the backward needs it),
so the memory of the graph held for the cross-Hessian product is unchanged; the gain is the
transient peak of each attention call. A torch-function mode, like ``precision.Fp32Normalisation``:
it catches hosts that call torch's SDPA (diffusers, A1111's SDP optimisation), not ComfyUI's own
``attention_basic``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


class SlicedAttention(TorchFunctionMode):
    """Inside this context, SDPA over more than ``chunk`` queries is computed ``chunk`` queries at a
    time (same value, same gradients, a lower transient peak)."""

    default_chunk = 1024  # queries per slice (memory=slice): 8 heads × 1024 × 4096 scores at 512 px

    def __init__(self, chunk: int | None = None):
        chunk = self.default_chunk if chunk is None else chunk
        super().__init__()
        if chunk < 1:
            raise ValueError("the attention slice must hold at least one query")
        self.chunk = chunk

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _SDPA:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        bound = dict(zip(names, args), **kwargs)
        q = bound["query"]
        mask = bound.get("attn_mask")
        if (q.shape[-2] <= self.chunk or bound.get("is_causal") or bound.get("dropout_p", 0.0)
                or bound.get("enable_gqa")):
            return func(*args, **kwargs)
        outs = []
        for start in range(0, q.shape[-2], self.chunk):
            part = dict(bound, query=q[..., start:start + self.chunk, :])
            if mask is not None and mask.dim() >= 2 and mask.shape[-2] == q.shape[-2]:
                part["attn_mask"] = mask[..., start:start + self.chunk, :]
            outs.append(func(**part))
        return torch.cat(outs, dim=-2)
