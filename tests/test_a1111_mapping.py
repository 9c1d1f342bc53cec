"""The layer names A1111 and ComfyUI hosts use, checked against the CompVis module naming of SD-1.5."""
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from seqlora_core.hosts.naming import compvis_layers
from seqlora_core.hosts.base_models import CONFIGS
from seqlora_core.method.targets import select_layers

NAMES = Path(__file__).parent / "data" / "compvis_sd15_linear_modules.txt"


def compvis_unet() -> nn.Module:
    """A module tree with every Linear of the original SD-1.5 UNet at its CompVis path."""
    root = nn.Module()
    for line in NAMES.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        parent = root
        *path, leaf = line.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(1, 1, device="meta"))
    return root


def sd15_meta(sub):
    cfg = {k: v for k, v in json.loads((CONFIGS / "sd15" / sub / "config.json").read_text()).items()
           if not k.startswith("_") and k != "architectures"}
    with torch.device("meta"):
        return UNet2DConditionModel(**cfg) if sub == "unet" else CLIPTextModel(CLIPTextConfig(**cfg))


def test_every_compvis_attention_linear_maps_onto_a_diffusers_layer():
    te = sd15_meta("text_encoder")
    layers = compvis_layers(compvis_unet(), te)
    diffusers_names = {f"unet.{n}" for n, m in sd15_meta("unet").named_modules() if isinstance(m, nn.Linear)}
    unet_names = {n for n in layers if n.startswith("unet.")}
    assert len(unet_names) == 16 * 10  # q, k, v, out × 2 attentions, proj ff ×2 … per transformer block
    assert unet_names <= diffusers_names  # each CompVis path lands on a real diffusers layer
    for preset in ("default", "unet-cross", "full"):
        wanted = {n for n in select_layers({n: None for n in diffusers_names} | {n: None for n in layers
                                                                               if n.startswith("text_encoder.")},
                                           preset)}
        got = set(select_layers(layers, preset))
        assert got == wanted  # A1111 offers exactly the layers the bank's presets name
