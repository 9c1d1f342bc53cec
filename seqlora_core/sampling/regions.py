"""Region-aware cross-attention (Mix-of-Show style, latent-couple cost).

A global prompt plus regions, each a box or a mask with its own prompt. In every cross-attention
layer the query attends separately to the global context and to each region's context; the
outputs are blended per spatial position by the regions' weights:

    out(p) = (1 − Σ_r w_r(p)) · Attn(q, c_global)(p) + Σ_r w_r(p) · Attn(q, c_r)(p)

where w_r is region r's mask at the layer's resolution (soft edges allowed), renormalised so that
Σ_r w_r ≤ 1 where regions overlap. Inside a region only its own prompt contributes (the others'
terms are multiplied by an exact 0), so changing one region's prompt leaves every other region's
features bit-for-bit unchanged. The work added is cross-attention only — one extra K/V projection
and attention per region — never a UNet pass per region.

Host-agnostic maths here; ``RegionalAttnProcessor`` plugs it into diffusers, and the ComfyUI node
patches Comfy's cross-attention modules with the same ``blend`` function.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError


@dataclass
class Region:
    """One region: a prompt and a box (x0, y0, x1, y1 in pixels) or a mask (H, W) in [0, 1]."""
    prompt: str
    box: tuple[float, float, float, float] | None = None
    mask: Tensor | None = None
    feather: float = 0.0  # soft edge width in pixels (boxes only)
    concepts: list[str] | None = None  # confined residuals: this region's concepts (None: those its prompt names)


def parse_region(spec: str) -> Region:
    """'x0,y0,x1,y1:prompt' → Region (the command line's --region)."""
    coords, sep, prompt = spec.partition(":")
    try:
        box = tuple(float(v) for v in coords.split(","))
    except ValueError:
        box = ()
    if not sep or len(box) != 4 or not prompt.strip():
        raise InputError(f"Region '{spec}' should look like x0,y0,x1,y1:prompt.")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise InputError(f"Region box {coords} is empty (need x0 < x1 and y0 < y1).")
    return Region(prompt.strip(), box=box)


def box_mask(box: Sequence[float], height: int, width: int, feather: float = 0.0) -> Tensor:
    """(H, W) mask of a pixel box; with ``feather`` > 0 the edge ramps linearly over that width."""
    x0, y0, x1, y1 = box
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    if feather <= 0:
        my = ((ys >= y0) & (ys < y1)).float()
        mx = ((xs >= x0) & (xs < x1)).float()
    else:
        my = ((ys - y0) / feather + 0.5).clamp(0, 1) * ((y1 - ys) / feather + 0.5).clamp(0, 1)
        mx = ((xs - x0) / feather + 0.5).clamp(0, 1) * ((x1 - xs) / feather + 0.5).clamp(0, 1)
    return my[:, None] * mx[None, :]


def region_masks(regions: Sequence[Region], height: int, width: int) -> Tensor:
    """(R, H, W) masks in [0, 1] at image resolution."""
    out = []
    for r in regions:
        if r.mask is not None:
            m = r.mask.float()
            if m.shape != (height, width):
                m = F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
            out.append(m.clamp(0, 1))
        elif r.box is not None:
            out.append(box_mask(r.box, height, width, r.feather))
        else:
            raise InputError(f"Region '{r.prompt}' has neither a box nor a mask.")
    return torch.stack(out) if out else torch.zeros(0, height, width)


def layer_grid(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of a UNet layer with ``tokens`` positions, from the latent size."""
    h, w = latent_hw
    for _ in range(8):
        if h * w == tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(f"no downsampling of {latent_hw} has {tokens} positions")


def layer_weights(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """(R, h·w) region weights at a layer's grid: area-averaged masks, renormalised where Σ > 1."""
    if masks.shape[0] == 0:
        return masks.reshape(0, grid[0] * grid[1])
    small = F.adaptive_avg_pool2d(masks[:, None], grid)[:, 0].reshape(masks.shape[0], -1)
    total = small.sum(0, keepdim=True)
    return torch.where(total > 1, small / total.clamp_min(1e-12), small)


def blend(global_out: Tensor, region_outs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """(1 − Σ w_r)·global + Σ w_r·region_r; outputs (b, N, c), weights (R, N)."""
    w = weights.to(global_out.dtype)
    out = (1 - w.sum(0))[None, :, None] * global_out
    for r, region_out in enumerate(region_outs):
        out = out + w[r][None, :, None] * region_out
    return out


@dataclass
class RegionalState:
    """What the attention layers read during one sampling run.

    ``contexts`` are the regions' prompt embeddings (R, 77, d); ``rows`` says which batch rows are
    regional (under classifier-free guidance the unconditional rows are not); ``latent_hw`` is
    set before each UNet call.
    """
    masks: Tensor  # (R, H, W) at image resolution
    contexts: Tensor  # (R, 77, d)
    rows: Tensor | None = None  # (b,) bool
    latent_hw: tuple[int, int] = (64, 64)
    # confined residuals (``sampling.confined``): context key ("global" or the region's index) →
    # a context manager under which K/V are projected with that context's concepts only
    confine: Callable[[object], contextlib.AbstractContextManager] | None = None
    # confined residuals: the negative prompt encoded with each region's concepts (R, 77, d); the
    # unconditional rows then blend per region too, so that inside a region both rows of
    # classifier-free guidance see the model that region asks for (base + its concepts)
    uncond_contexts: Tensor | None = None
    _cache: dict = field(default_factory=dict)

    def weights(self, tokens: int, device, dtype) -> Tensor:
        key = (tokens, str(device), dtype)
        if key not in self._cache:
            grid = layer_grid(tokens, self.latent_hw)
            self._cache[key] = layer_weights(self.masks, grid).to(device, dtype)
        return self._cache[key]


def regional_cross_attention(query_fn: Callable[[], Tensor], attend: Callable[[Tensor, Tensor], Tensor],
                             hidden_tokens: int, context: Tensor, state: RegionalState) -> Tensor:
    """Shared by hosts: ``attend(q, ctx)`` projects K/V from ``ctx`` and attends; returns (b, N, c)."""
    confine = state.confine or (lambda key: contextlib.nullcontext())
    q = query_fn()
    with confine("global"):
        out = attend(q, context)
    if state.contexts.shape[0] == 0:
        return out
    rows = (state.rows if state.rows is not None else torch.ones(q.shape[0], dtype=torch.bool)).to(q.device)
    groups = [(torch.nonzero(rows).flatten(), state.contexts)]
    if state.uncond_contexts is not None:  # confined: the other rows are regional too, with their own contexts
        groups.append((torch.nonzero(~rows).flatten(), state.uncond_contexts))
    weights = state.weights(hidden_tokens, q.device, out.dtype)
    result = None
    for idx, contexts in groups:
        if idx.numel() == 0:
            continue
        q_r = q[idx]
        region_outs = []
        for r, ctx in enumerate(contexts.to(q.device)):
            with confine(r):
                region_outs.append(attend(q_r, ctx[None].expand(len(idx), -1, -1).to(context.dtype)))
        result = out.clone() if result is None else result
        result[idx] = blend(out[idx], region_outs, weights)
    return out if result is None else result


class RegionalAttnProcessor:
    """diffusers attention processor for cross-attention (attn2) layers."""

    def __init__(self, state: RegionalState):
        self.state = state

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        b, n, _ = hidden_states.shape
        heads = attn.heads

        def attend(q: Tensor, ctx: Tensor) -> Tensor:
            k, v = attn.to_k(ctx), attn.to_v(ctx)
            d = k.shape[-1] // heads
            qh = q.view(q.shape[0], -1, heads, d).transpose(1, 2)
            kh = k.view(k.shape[0], -1, heads, d).transpose(1, 2)
            vh = v.view(v.shape[0], -1, heads, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(qh, kh, vh)
            return o.transpose(1, 2).reshape(q.shape[0], -1, heads * d)

        out = regional_cross_attention(lambda: attn.to_q(hidden_states), attend, n, encoder_hidden_states, self.state)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class regional_unet:
    """Context manager: the UNet's cross-attention layers use ``RegionalAttnProcessor``."""

    def __init__(self, unet, state: RegionalState):
        self.unet, self.state = unet, state

    def __enter__(self) -> RegionalState:
        self.saved = dict(self.unet.attn_processors)
        processor = RegionalAttnProcessor(self.state)
        self.unet.set_attn_processor({k: (processor if ".attn2." in k else p) for k, p in self.saved.items()})
        return self.state

    def __exit__(self, *exc) -> None:
        self.unet.set_attn_processor(self.saved)
