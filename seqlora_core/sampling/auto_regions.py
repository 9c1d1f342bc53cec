"""Regions without drawing: each concept's region read from its token's cross-attention.

SD-1.5's cross-attention maps say where each prompt token lands (prompt-to-prompt; FreeFuse uses
the same signal to confine subject LoRAs). During the first denoising steps the conditional row's
attention probabilities to each concept token's positions are summed over every cross-attention
layer and head, brought to the latent grid and normalised per concept; each latent position then
goes to the concept whose map is highest there, if that map reaches ``THRESHOLD`` of its own
maximum (else to no concept: the global prompt keeps it). Two concepts whose maps cannot be told
apart (correlation above ``MAX_CORRELATION``, or a concept left with under ``MIN_SHARE`` of the
picture) are refused in one sentence: the user draws boxes instead.

The masks then drive a confined regional composition (``sampling.confined``) for the remaining
steps: each region is the whole prompt with only its concept's residuals.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from .regions import Region

AUTO_SHARE = 0.25  # the share of the steps whose attention finds the regions
THRESHOLD = 0.3  # a position belongs to a concept when its map reaches this share of the map's maximum
MAX_CORRELATION = 0.9  # two concepts' maps more alike than this cannot be separated
MIN_SHARE = 0.02  # a concept must own at least this share of the picture


class AttentionMapRecorder:
    """diffusers attention processor for attn2 layers: plain attention (as AttnProcessor2_0), and,
    while ``recording``, the conditional rows' attention to ``positions`` (concept → token
    indices) summed into per-concept maps at the latent grid."""

    def __init__(self, positions: dict[str, list[int]], latent_hw: tuple[int, int], rows: Tensor):
        self.positions, self.latent_hw, self.rows = positions, latent_hw, rows
        self.recording = True
        self.maps = {c: torch.zeros(latent_hw) for c in positions}

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        b, n, _ = hidden_states.shape
        heads = attn.heads
        ctx = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        d = k.shape[-1] // heads
        qh, kh, vh = (t.view(t.shape[0], -1, heads, d).transpose(1, 2) for t in (q, k, v))
        if self.recording:
            add_attention_maps(self.maps, qh, kh, self.rows, self.positions, self.latent_hw)
        out = F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, -1, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def add_attention_maps(maps: dict[str, Tensor], qh: Tensor, kh: Tensor, rows: Tensor,
                       positions: dict[str, list[int]], latent_hw: tuple[int, int]) -> None:
    """Add one cross-attention layer's evidence to ``maps`` (concept → (h, w) at the latent grid):
    the softmax attention of the conditional ``rows`` to each concept's token ``positions``, summed
    over those positions, averaged over rows and heads, brought from the layer's grid to the latent
    one. ``qh``: (b, heads, n, d) queries; ``kh``: (b, heads, 77, d) keys. Shared by the diffusers
    processor above and ComfyUI's attn2 patch (``nodes/auto_regions.py``), so both read the maps
    the same way."""
    from .regions import layer_grid

    rows = torch.nonzero(rows.to(qh.device)).flatten()
    if not len(rows):
        return
    probs = torch.softmax((qh[rows].float() @ kh[rows].float().transpose(-1, -2)) / qh.shape[-1] ** 0.5, dim=-1)
    grid = layer_grid(qh.shape[2], latent_hw)
    for concept, idx in positions.items():
        m = probs[..., idx].sum(-1).mean(dim=(0, 1))  # (n,)
        m = m.reshape(1, 1, *grid).cpu()
        maps[concept] += F.interpolate(m, size=latent_hw, mode="bilinear", align_corners=False)[0, 0]


def token_positions(host, prompt: str, tokens: dict[str, str], embeddings: dict[str, Tensor]) -> dict[str, list[int]]:
    """Concept id → the indices of its token in ``prompt``'s 77 ids (diffusers host)."""
    ids = host.tokens.input_ids([prompt], embeddings)[0]
    out = {}
    for ident, token in tokens.items():
        where = torch.nonzero(ids == host.tokens.token_id(token)).flatten().tolist()
        if where:
            out[ident] = where
    return out


def require_positions(found: dict) -> dict:
    """``found`` (concept → its token positions, or its map) when it holds any concept; else one
    sentence. Hosts call it before sampling, so a prompt whose tokens fall past the 77-token
    window is refused before any step is spent on it."""
    if not found:
        raise InputError("None of the concepts' tokens was found within the prompt's first 75 tokens; "
                         "move them to the front or draw a box for each.")
    return found


def masks_from_maps(maps: dict[str, Tensor], names: dict[str, str] | None = None) -> dict[str, Tensor]:
    """Concept → (h, w) 0/1 mask: each position to the concept with the highest normalised map,
    where that map reaches THRESHOLD of its maximum. One sentence when the maps cannot be
    separated (see the module docstring)."""
    require_positions(maps)
    names = names or {c: c for c in maps}
    ids = list(maps)
    norm = torch.stack([m / m.max().clamp_min(1e-12) for m in (maps[c] for c in ids)])  # (C, h, w)
    flat = norm.reshape(len(ids), -1)
    centred = flat - flat.mean(1, keepdim=True)
    corr = (centred @ centred.T) / (centred.norm(dim=1)[:, None] * centred.norm(dim=1)[None]).clamp_min(1e-12)
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            if float(corr[i, j]) > MAX_CORRELATION:
                raise InputError(f"The attention of {names[ids[i]]} and {names[ids[j]]} covers the same place "
                                 f"(correlation {float(corr[i, j]):.2f}); draw a box for each instead.")
    best = norm.argmax(0)
    out = {}
    for k, c in enumerate(ids):
        mask = ((best == k) & (norm[k] >= THRESHOLD)).float()
        if float(mask.mean()) < MIN_SHARE:
            raise InputError(f"{names[c]} found no place of its own in the picture (under {MIN_SHARE:.0%} of it); "
                             "draw a box for it instead.")
        out[c] = mask
    return out


def concepts_to_find(bank, prompt: str, ids, drawn: Sequence[Region]) -> list[str]:
    """The concepts ``prompt`` names (among ``ids``; None: all) that no drawn region already
    places; one sentence when there are none."""
    from .confined import named_concepts

    named = named_concepts(bank, prompt, ids)
    taken = {i for r in drawn for i in (r.concepts if r.concepts is not None else named_concepts(bank, r.prompt, ids))}
    wanted = [i for i in named if i not in taken]
    if not wanted:
        raise InputError("Automatic regions need a prompt that names concepts by their tokens, e.g. "
                         "'a photo of <chelsea> and <coffee>'.")
    return wanted


def found_regions(maps: dict[str, Tensor], prompt: str, names: dict[str, str], drawn: Sequence[Region],
                  pixel_hw: tuple[int, int]) -> list[Region]:
    """One region per concept of ``maps`` (the whole ``prompt``, that concept's residuals only),
    its mask at the latent grid from :func:`masks_from_maps`, with the drawn regions' area (pixel
    boxes or masks at ``pixel_hw``) cut out of it: drawn regions win."""
    masks = masks_from_maps(maps, names)
    return cut_out([Region(prompt, mask=m, concepts=[i]) for i, m in masks.items()], drawn, pixel_hw)


def cut_out(found: Sequence[Region], drawn: Sequence[Region], pixel_hw: tuple[int, int]) -> list[Region]:
    """``found`` regions (masks on any grid) less the area of the ``drawn`` ones (pixel boxes or
    masks, at ``pixel_hw`` = (H, W)): where the user drew, the drawing wins."""
    from dataclasses import replace

    from .regions import region_masks

    if not drawn:
        return list(found)
    covered = region_masks(drawn, *pixel_hw).sum(0).clamp(max=1)  # (H, W), as drawn
    out = []
    for region in found:
        here = F.interpolate(covered[None, None], size=tuple(region.mask.shape), mode="area")[0, 0]
        out.append(replace(region, mask=region.mask.float() * (1 - here)))
    return out
