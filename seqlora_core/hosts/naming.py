"""Canonical layer names ↔ the CompVis (original SD) module paths that ComfyUI and A1111 use.

The bank names layers by diffusers module path (``unet.down_blocks.0.attentions.0.
transformer_blocks.0.attn2.to_k``); ComfyUI and A1111 run the original CompVis UNet
(``input_blocks.1.1.transformer_blocks.0.attn2.to_k``). SD-1.5's layout is fixed, so the mapping
is written out here once, without importing any host, and serves both hosts. Only the spatial
transformer blocks (where every adaptable attention layer lives) need mapping; the text encoder
keeps transformers' names (``text_model.encoder.layers.N.self_attn.k_proj``) in all hosts.
"""
from __future__ import annotations

import re

from torch import nn

LAYERS_PER_BLOCK = 2  # SD-1.5

# diffusers block prefix → CompVis block prefix (spatial-transformer blocks only)
def _block_table() -> dict[str, str]:
    table = {}
    for i in range(3):  # CrossAttnDownBlock2D × 3
        for j in range(LAYERS_PER_BLOCK):
            table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{3 * i + j + 1}.1"
    table["mid_block.attentions.0"] = "middle_block.1"
    for i in range(1, 4):  # CrossAttnUpBlock2D × 3
        for j in range(LAYERS_PER_BLOCK + 1):
            table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{3 * i + j}.1"
    return table


DIFFUSERS_TO_COMPVIS = _block_table()
COMPVIS_TO_DIFFUSERS = {v: k for k, v in DIFFUSERS_TO_COMPVIS.items()}
_DIFF_RE = re.compile(r"^((?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.0)\.(.+)$")
_COMP_RE = re.compile(r"^((?:input_blocks|output_blocks)\.\d+\.1|middle_block\.1)\.(.+)$")


def unet_canonical_to_compvis(name: str) -> str:
    """'unet.down_blocks.0.attentions.0.X' → 'input_blocks.1.1.X' (no 'unet.' / model prefix)."""
    path = name.removeprefix("unet.")
    m = _DIFF_RE.match(path)
    if not m or m.group(1) not in DIFFUSERS_TO_COMPVIS:
        raise KeyError(f"{name} is not a layer of an SD-1.5 spatial transformer block")
    return f"{DIFFUSERS_TO_COMPVIS[m.group(1)]}.{m.group(2)}"


def unet_compvis_to_canonical(path: str) -> str | None:
    """'input_blocks.1.1.X' → 'unet.down_blocks.0.attentions.0.X'; None outside transformer blocks."""
    m = _COMP_RE.match(path)
    if not m or m.group(1) not in COMPVIS_TO_DIFFUSERS:
        return None
    return f"unet.{COMPVIS_TO_DIFFUSERS[m.group(1)]}.{m.group(2)}"


def text_canonical(path: str) -> str | None:
    """Any host's CLIP-L module path ending in 'text_model.…' → 'text_encoder.text_model.…'."""
    i = path.find("text_model.")
    return None if i < 0 else "text_encoder." + path[i:]


def compvis_layers(unet: nn.Module, text_encoder: nn.Module | None = None) -> dict[str, nn.Linear]:
    """Canonical name → Linear for a host's CompVis UNet and (optionally) its CLIP-L text encoder."""
    out = {}
    for path, module in unet.named_modules():
        if isinstance(module, nn.Linear) and (name := unet_compvis_to_canonical(path)):
            out[name] = module
    if text_encoder is not None:
        for path, module in text_encoder.named_modules():
            if isinstance(module, nn.Linear) and (name := text_canonical(path)):
                out[name] = module
    return out


def lora_paths(canonical: str) -> list[tuple[str, str]]:
    """The (side, path with '_' for '.') under which LoRA files name a canonical layer
    (``bank.lora_file`` brings every layout to that form): kohya's and diffusers' keys use the
    diffusers path (``lora_unet_down_blocks_0_…``), some older trainers the CompVis one
    (``lora_unet_input_blocks_1_1_…``); the text encoder is ``te`` with transformers' path."""
    if canonical.startswith("unet."):
        out = [("unet", canonical[len("unet."):].replace(".", "_"))]
        try:
            out.append(("unet", unet_canonical_to_compvis(canonical).replace(".", "_")))
        except KeyError:
            pass
        return out
    if canonical.startswith("text_encoder."):
        return [("te", canonical[len("text_encoder."):].replace(".", "_"))]
    return []


# Layers whose input is the text conditioning itself: the text encoder's, and the UNet's
# cross-attention keys and values. Their input statistics can be had from prompts alone.
TEXT_INPUT_LAYERS = re.compile(r"^text_encoder\.|^unet\..*attn2\.to_[kv]$")
