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


def make_forward(module, masks: torch.Tensor, contexts: torch.Tensor):
    """A bound forward for one Comfy CrossAttention module, regional on conditional rows."""
    import comfy.ldm.modules.attention as attention

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        if context is None or value is not None or mask is not None:
            return type(self).forward(self, x, context=context, value=value, mask=mask,
                                      transformer_options=transformer_options)
        shape = transformer_options.get("original_shape", None)
        latent_hw = (shape[2], shape[3]) if shape else (64, 64)
        state = RegionalState(masks=masks, contexts=contexts.to(x.device, x.dtype),
                              rows=conditional_rows(transformer_options, x.shape[0]), latent_hw=latent_hw)

        def attend(q, ctx):
            return attention.optimized_attention(q, self.to_k(ctx), self.to_v(ctx), self.heads,
                                                 attn_precision=self.attn_precision)

        out = regional_cross_attention(lambda: self.to_q(x), attend, x.shape[1], context, state)
        return self.to_out(out)

    return types.MethodType(forward, module)


def apply_regions(model, clip, regions: list[Region], width: int, height: int):
    """A MODEL clone whose cross-attention is regional; ``clip`` encodes the region prompts."""
    if not regions:
        return model
    masks = region_masks(regions, height, width)
    contexts = encode_region_prompts(clip, [r.prompt for r in regions])
    patched = model.clone()
    unet = model.model.diffusion_model
    for path, module in unet.named_modules():
        if path.endswith(".attn2") and hasattr(module, "to_k"):
            patched.add_object_patch(f"diffusion_model.{path}.forward", make_forward(module, masks, contexts))
    return patched
