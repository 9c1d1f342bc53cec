"""Target presets on the full-size SD-1.5 architecture (built on the meta device: no memory)."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from seqlora_core.hosts.base_models import CONFIGS
from seqlora_core.hosts.diffusers_host import canonical_text_name
from seqlora_core.errors import InputError
from seqlora_core.method.targets import select_layers


@pytest.fixture(scope="module")
def sd15_layers():
    def cfg(sub):
        return {k: v for k, v in json.loads((CONFIGS / "sd15" / sub / "config.json").read_text()).items()
                if not k.startswith("_") and k != "architectures"}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg("unet"))
        te = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))
    layers = {f"unet.{n}": m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    layers.update({f"text_encoder.{canonical_text_name(n)}": m for n, m in te.named_modules()
                   if isinstance(m, torch.nn.Linear)})
    return layers


def test_default_preset_holds_at_least_101_concepts_at_rank_4(sd15_layers):
    chosen = select_layers(sd15_layers, "default")
    assert {m.in_features for m in chosen.values()} == {768}
    assert min(m.in_features // 4 for m in chosen.values()) == 192 >= 101
    assert len([n for n in chosen if n.startswith("unet.")]) == 32  # 16 cross-attentions × to_k, to_v
    assert len([n for n in chosen if n.startswith("text_encoder.")]) == 48  # 12 layers × q, k, v, out


def test_unet_cross_preset_leaves_the_text_encoder_alone(sd15_layers):
    chosen = select_layers(sd15_layers, "unet-cross")
    assert len(chosen) == 32 and all(n.startswith("unet.") and ".attn2.to_" in n for n in chosen)
    assert set(chosen) < set(select_layers(sd15_layers, "default"))  # the default's UNet half exactly
    assert min(m.in_features // 4 for m in chosen.values()) == 192


def test_full_preset_is_limited_by_its_320_wide_layers(sd15_layers):
    chosen = select_layers(sd15_layers, "full")
    assert min(m.in_features // 4 for m in chosen.values()) == 80
    assert any(n.endswith("attn1.to_q") for n in chosen)


def test_custom_patterns_and_errors(sd15_layers):
    chosen = select_layers(sd15_layers, r"attn2\.to_k$")
    assert len(chosen) == 16
    with pytest.raises(InputError):
        select_layers(sd15_layers, "no_such_layer")
    with pytest.raises(InputError):
        select_layers(sd15_layers, "(")
