"""Regional prompts inside ComfyUI: the core's regional cross-attention as a model patch.

Every cross-attention module (attn2) of the UNet gets its ``forward`` replaced through
``ModelPatcher.add_object_patch`` on a clone of the MODEL (the stock mechanism; the original
model is untouched and nothing is copied). The replacement projects each region's prompt with the
module's own to_k / to_v (so composed concepts apply to region prompts too), attends with Comfy's
own attention function, and blends with ``seqlora_core.sampling.regions.blend``. Only conditional batch
rows are regional; ControlNet / T2I-Adapter conditioning chains on as usual.
"""
from __future__ import annotations

import json
import types

import torch

from seqlora_core.errors import InputError
from seqlora_core.hosts.naming import unet_compvis_to_canonical
from seqlora_core.sampling.confined import check_mode, context_concepts, split_layers
from seqlora_core.sampling.regions import Region, RegionalState, region_masks, regional_cross_attention



def parse_regions_json(text: str) -> tuple[list[Region], int, int]:
    """{"width": W, "height": H, "regions": [{"box": [x0, y0, x1, y1], "prompt": "…"}, …]}."""
    try:
        data = json.loads(text or "{}")
        width, height = int(data.get("width", 512)), int(data.get("height", 512))
        regions = [Region(str(r["prompt"]), box=tuple(float(v) for v in r["box"]), feather=float(r.get("feather", 0)))
                   for r in data.get("regions", []) if str(r.get("prompt", "")).strip()]
    except (ValueError, KeyError, TypeError):
        raise InputError("Regions must be JSON like {\"width\": 512, \"height\": 512, \"regions\": "
                         "[{\"box\": [0, 0, 256, 512], \"prompt\": \"…\"}]}.") from None
    for r in regions:
        if len(r.box) != 4 or r.box[2] <= r.box[0] or r.box[3] <= r.box[1]:
            raise InputError(f"Region '{r.prompt}' has an empty or malformed box {list(r.box)}.")
    return regions, width, height


def encode_region_prompts(clip, prompts: list[str]) -> torch.Tensor:
    """(R, 77, d) conditioning of each region prompt with the CLIP as given (concept tokens work)."""
    outs = []
    for prompt in prompts:
        cond = clip.encode_from_tokens(clip.tokenize(prompt))
        outs.append(cond[:, :77])
    return torch.cat(outs).float()


def conditional_rows(transformer_options: dict, batch: int) -> torch.Tensor:
    flags = transformer_options.get("cond_or_uncond")
    if not flags:
        return torch.ones(batch, dtype=torch.bool)
    per = batch // len(flags)
    return torch.tensor([f == 0 for f in flags]).repeat_interleave(per)


def make_forward(module, masks: torch.Tensor, contexts: torch.Tensor, residuals: dict | None = None):
    """A bound forward for one Comfy CrossAttention module, regional on conditional rows.

    ``residuals`` (confined mode): context key ("global", or a region's index) → {"k": (A, B) or
    None, "v": …}, the factors of the concepts that context names on this module's to_k / to_v;
    each context's keys and values are projected with the module's own (unpatched) weights plus
    exactly those (``seqlora_core.sampling.confined``)."""
    import contextlib

    import comfy.ldm.modules.attention as attention

    from seqlora_core.method.lora import factors_on, lora_delta

    current = {"key": "global"}
    on_device: dict = {}  # the factors copied to each input device once (not on every call)

    @contextlib.contextmanager
    def confine(key):
        before, current["key"] = current["key"], key
        try:
            yield
        finally:
            current["key"] = before

    def project(linear, ctx, which):
        out = linear(ctx)
        pair = (residuals or {}).get(current["key"], {}).get(which)
        if pair is not None:
            out = out + lora_delta(ctx, *factors_on(on_device, (current["key"], which), pair, ctx.device)).to(out.dtype)
        return out

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        if context is None or value is not None or mask is not None:
            return type(self).forward(self, x, context=context, value=value, mask=mask,
                                      transformer_options=transformer_options)
        shape = transformer_options.get("original_shape", None)
        latent_hw = (shape[2], shape[3]) if shape else (64, 64)
        rows = conditional_rows(transformer_options, x.shape[0])
        uncond = None
        if residuals is not None and bool((~rows).any()):
            # the unconditional rows are regional too (each region's K/V with its own concepts), on the
            # sampler's own negative context: exact for unet-cross banks; with text-encoder layers in
            # the bank the negative prompt lacks the region's text-encoder residual
            first = int(torch.nonzero(~rows)[0])
            uncond = context[first:first + 1].expand(contexts.shape[0], -1, -1)
        state = RegionalState(masks=masks, contexts=contexts.to(x.device, x.dtype), rows=rows, latent_hw=latent_hw,
                              confine=confine if residuals is not None else None, uncond_contexts=uncond)

        def attend(q, ctx):
            return attention.optimized_attention(q, project(self.to_k, ctx, "k"), project(self.to_v, ctx, "v"),
                                                 self.heads, attn_precision=self.attn_precision)

        out = regional_cross_attention(lambda: self.to_q(x), attend, x.shape[1], context, state)
        return self.to_out(out)

    return types.MethodType(forward, module)


def apply_regions(model, clip, regions: list[Region], width: int, height: int, bank=None,
                  residuals: str = "global"):
    """A MODEL clone whose cross-attention is regional; ``clip`` encodes the region prompts.

    With a ``bank`` and ``residuals="confined"`` the MODEL and CLIP must be the base's (no concept
    composed into them): each region's prompt is encoded with a CLIP carrying only the concepts it
    names, and its keys and values get only those concepts' residuals; the global prompt and the
    negative one (the sampler's own conditioning) stay the base's."""
    if not regions:
        return model
    masks = region_masks(regions, height, width)
    confined = bank is not None and check_mode(residuals) == "confined"
    sets = context_concepts(bank, "", regions, None) if confined else {}
    if confined:
        _check_confinable(model, bank)
        contexts = torch.cat([encode_region_prompts(_clip_for(model, clip, bank, sets[r]), [region.prompt])
                              for r, region in enumerate(regions)])
    else:
        contexts = encode_region_prompts(clip, [r.prompt for r in regions])
    patched = model.clone()
    unet = model.model.diffusion_model
    composed = {key: bank.composed_factors(ids) for key, ids in sets.items() if ids}  # once, not per module
    for path, module in unet.named_modules():
        if path.endswith(".attn2") and hasattr(module, "to_k"):
            residuals_here = _module_residuals(composed, path) if confined else None
            patched.add_object_patch(f"diffusion_model.{path}.forward",
                                     make_forward(module, masks, contexts, residuals_here))
    return patched


def _check_confinable(model, bank) -> None:
    """Confinement in ComfyUI covers the layers that read the text (the default and unet-cross
    targets) and needs a MODEL without composed concepts (their residuals would act everywhere)."""
    spatial = split_layers(dict.fromkeys(bank.layer_shapes()))[1]
    if spatial:
        raise InputError(f"Confined residuals in ComfyUI need a bank trained with the default or unet-cross targets; "
                         f"this one adapts spatial layers too (e.g. {next(iter(spatial))}). Choose global.")
    if any("attn2.to_k" in str(key) or "attn2.to_v" in str(key) for key in getattr(model, "patches", {})):
        raise InputError("With confined residuals connect the model straight from the checkpoint loader: this one "
                         "already has concepts (or LoRAs) on its cross-attention, which would act in every region.")


def _clip_for(model, clip, bank, ids: list[str]):
    """The CLIP with only ``ids`` composed (the base CLIP when none)."""
    if not ids:
        return clip
    from .operations import compose

    return compose(model, clip, bank, ids, {})[1]


def _module_residuals(composed: dict, path: str) -> dict:
    """Context key → {"k": factors, "v": factors} on the Comfy attn2 module at ``path``, from each
    context's composed factors (``composed``: key → layer → factors, contexts naming a concept)."""
    return {key: {which: per_layer.get(unet_compvis_to_canonical(f"{path}.to_{which}")) for which in ("k", "v")}
            for key, per_layer in composed.items()}
