"""Regions without drawing, inside ComfyUI: where each concept lands, read from its token's attention.

"Find Concept Regions" samples the first quarter of the steps with ComfyUI's own sampler (the seed
and settings the KSampler after it will use) on the MODEL and CLIP composed with every concept the
prompt names. Each attn2 module's ``forward`` is replaced on a clone of the MODEL
(``ModelPatcher.add_object_patch``, as Regional Concepts does) by one that attends as Comfy's own
does and adds the conditional rows' attention to each concept token to a map
(``seqlora_core.sampling.auto_regions.add_attention_maps``). The core then makes one region per
concept from the maps, with the same refusals as ``generate --auto-regions``: the node only wires
Comfy's sampler and attention to it.

The regions go to Regional Concepts (each region is the whole prompt with only its concept's
residuals, so with ``residuals=confined`` the two characters do not blend); their masks go to a
MASK output, to look at with a stock mask preview. Unlike the command line, which goes on from the
latents of those first steps, the KSampler after Regional Concepts samples every step again from
the same seed: ComfyUI's graph hands a model to a sampler, not a half-sampled trajectory.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor


def concept_positions(clip, prompt: str, embeddings: dict[str, Tensor], ids: dict[str, str]) -> dict[str, list[int]]:
    """Concept id → the positions of its vectors in the first 77-token window of ``prompt`` as
    ``clip`` (composed with the concepts, so its tokenizer puts their vectors in place of ids)
    tokenizes it. ``embeddings``: token → (k, d) vectors; ``ids``: concept id → token."""
    tokens = clip.tokenize(prompt)
    window = next(iter(tokens.values()))[0] if isinstance(tokens, dict) else tokens[0]
    out: dict[str, list[int]] = {}
    for ident, token in ids.items():
        rows = embeddings[token].float()
        where = [i for i, item in enumerate(window) if isinstance(item[0], Tensor)
                 and any(torch.equal(item[0].float().cpu(), row) for row in rows)]
        if where:
            out[ident] = where
    return out


def recording_forward(module, maps: dict[str, Tensor], positions: dict[str, list[int]], latent_hw: tuple[int, int]):
    """A bound forward for one Comfy CrossAttention: its own attention, unchanged, and the
    conditional rows' attention to ``positions`` added to ``maps``, which are (h, w) =
    ``latent_hw``: the size of the latent being sampled."""
    import comfy.ldm.modules.attention as attention

    from seqlora_core.sampling.auto_regions import add_attention_maps

    from .regional import conditional_rows

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        if context is None or value is not None or mask is not None:
            return type(self).forward(self, x, context=context, value=value, mask=mask,
                                      transformer_options=transformer_options)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if k.shape[0] == q.shape[0]:  # one context row per image row, as Comfy batches cond / uncond
            d = q.shape[-1] // self.heads
            qh = q.view(q.shape[0], -1, self.heads, d).transpose(1, 2)  # (b, heads, n, d)
            kh = k.view(k.shape[0], -1, self.heads, d).transpose(1, 2)  # (b, heads, 77, d)
            add_attention_maps(maps, qh, kh, conditional_rows(transformer_options, x.shape[0]), positions, latent_hw)
        out = attention.optimized_attention(q, k, v, self.heads, attn_precision=self.attn_precision)
        return self.to_out(out)

    return types.MethodType(forward, module)


def find_regions(model, clip, bank, prompt: str, negative: str, latent: dict, seed: int, steps: int, cfg: float,
                 sampler_name: str, scheduler: str) -> tuple[list, Tensor]:
    """(one Region per concept ``prompt`` names, their masks (N, H, W) in pixels) from the first
    quarter of the steps; an ``InputError`` sentence when the maps cannot be told apart."""
    import comfy.sample
    import comfy.utils

    from seqlora_core.sampling.auto_regions import AUTO_SHARE, concepts_to_find, found_regions, require_positions

    from .operations import check_bank_for, compose

    bank = check_bank_for(bank, model)  # an SD-1.5 MODEL, and the bank made for it
    wanted = concepts_to_find(bank, prompt, None, ())
    composed_model, composed_clip = compose(model, clip, bank, wanted, {})
    tokens = {i: bank.get(i).token for i in wanted}
    positions = require_positions(concept_positions(composed_clip, prompt, bank.embeddings(wanted), tokens))
    samples = latent["samples"]
    latent_hw = tuple(samples.shape[-2:])
    maps = {i: torch.zeros(latent_hw) for i in positions}
    patched = composed_model.clone()
    for path, module in model.model.diffusion_model.named_modules():
        if path.endswith(".attn2") and hasattr(module, "to_k"):
            patched.add_object_patch(f"diffusion_model.{path}.forward",
                                     recording_forward(module, maps, positions, latent_hw))

    def conditioning(text: str):
        cond, pooled = composed_clip.encode_from_tokens(composed_clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    image = comfy.sample.fix_empty_latent_channels(patched, samples)
    noise = comfy.sample.prepare_noise(image, seed, latent.get("batch_index"))
    early = max(1, round(steps * AUTO_SHARE))
    comfy.sample.sample(patched, noise, steps, cfg, sampler_name, scheduler, conditioning(prompt), conditioning(negative),
                        image, start_step=0, last_step=early, force_full_denoise=False, seed=seed,
                        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
    pixels = (latent_hw[0] * 8, latent_hw[1] * 8)
    regions = found_regions(maps, prompt, {i: tokens[i] for i in maps}, (), pixels)
    masks = torch.stack([F.interpolate(r.mask[None, None].float(), size=pixels, mode="nearest")[0, 0] for r in regions])
    return regions, masks
