"""Write a random-weight SD-1.5 checkpoint in the original (CompVis) key format.

Needs a ComfyUI checkout on sys.path (its converters map diffusers names to the original ones):
    python make_sd15_checkpoint.py COMFYUI_PATH OUT.safetensors [--dtype fp16|fp32]
Used by the integration tests (the ComfyUI and A1111 fixtures) and by the single-file loader test.

Random initialisation leaves the text encoder's final LayerNorm with bias 0, so every token's
output has mean 0 and the whole prompt's hidden states sum to (often exactly) 0. A1111 divides by
that mean (its "Original" emphasis restores the mean after weighting: ``z * (mean / new_mean)``),
so a third of prompts came back as 0/0 = NaN ("A tensor with NaNs was produced in Unet"). A real
CLIP's final LayerNorm has a non-zero bias; ``give_text_norm_a_bias`` gives the random one a
seeded bias with a clearly non-zero mean. An older checkpoint is fixed in place with
    python make_sd15_checkpoint.py --fix-text-norm CKPT.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT_NORM_BIAS = "cond_stage_model.transformer.text_model.final_layer_norm.bias"


def give_text_norm_a_bias(state: dict, seed: int = 0) -> dict:
    """``state`` (original key names) with the text encoder's final LayerNorm bias set to a seeded
    vector of mean about 0.1: hidden states whose mean is never 0 (see the module's docstring)."""
    import torch

    bias = state[TEXT_NORM_BIAS]
    gen = torch.Generator().manual_seed(seed)
    state[TEXT_NORM_BIAS] = (0.1 + 0.02 * torch.randn(bias.shape, generator=gen)).to(bias.dtype)
    return state


def text_norm_is_degenerate(path: str) -> bool:
    """True for a checkpoint written before ``give_text_norm_a_bias`` (final LayerNorm bias all 0)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return bool((f.get_tensor(TEXT_NORM_BIAS) == 0).all())


def fix_text_norm(path: str) -> None:
    """Give an existing checkpoint's final LayerNorm its bias, in place (atomically), metadata kept."""
    import os

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    state = give_text_norm_a_bias(load_file(path), json.loads((metadata or {}).get("seqlora_test", "{}")).get("seed", 0))
    tmp = path + ".tmp"
    save_file(state, tmp, metadata=metadata)
    os.chmod(tmp, os.stat(path).st_mode & 0o777)
    os.replace(tmp, path)


def build(comfy_path: str, out: str, dtype: str = "fp16", seed: int = 0) -> None:
    sys.path.insert(0, comfy_path)
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: no CUDA probing
    import comfy.diffusers_convert
    import comfy.model_detection
    import comfy.utils
    from seqlora_core.hosts.base_models import random_components

    torch.manual_seed(seed)
    parts = random_components("sd15-random")
    unet_sd = parts.unet.state_dict()
    unet_config = comfy.model_detection.unet_config_from_diffusers_unet(unet_sd)
    mapping = comfy.utils.unet_to_diffusers(unet_config)  # diffusers key -> original key
    out_sd = {}
    for diff_key, orig_key in mapping.items():
        if diff_key in unet_sd:
            out_sd["model.diffusion_model." + orig_key] = unet_sd[diff_key]
    missing = set(unet_sd) - set(mapping)
    if missing:
        raise SystemExit(f"{len(missing)} UNet weights have no original name, e.g. {sorted(missing)[:3]}")
    for k, v in comfy.diffusers_convert.convert_vae_state_dict(parts.vae.state_dict()).items():
        out_sd["first_stage_model." + k] = v
    for k, v in parts.text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k  # transformers >= 5 dropped the level
        out_sd["cond_stage_model.transformer." + k] = v
    give_text_norm_a_bias(out_sd, seed)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    out_sd = {k: v.to(torch_dtype).contiguous() for k, v in out_sd.items()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(out_sd, out, metadata={"seqlora_test": json.dumps({"seed": seed})})


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fix-text-norm"]:
        for ckpt in sys.argv[2:]:
            fix_text_norm(ckpt)
        raise SystemExit(0)
    p = argparse.ArgumentParser()
    p.add_argument("comfy_path")
    p.add_argument("out")
    p.add_argument("--dtype", default="fp16")
    a = p.parse_args()
    build(a.comfy_path, a.out, a.dtype)
