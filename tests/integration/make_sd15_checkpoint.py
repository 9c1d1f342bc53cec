"""Write a random-weight SD-1.5 checkpoint in the original (CompVis) key format.

Needs a ComfyUI checkout on sys.path (its converters map diffusers names to the original ones):
    python make_sd15_checkpoint.py COMFYUI_PATH OUT.safetensors [--dtype fp16|fp32]
Used by the integration tests (the ComfyUI fixture) and by the single-file loader test.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    out_sd = {k: v.to(torch_dtype).contiguous() for k, v in out_sd.items()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(out_sd, out, metadata={"seqlora_test": json.dumps({"seed": seed})})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("comfy_path")
    p.add_argument("out")
    p.add_argument("--dtype", default="fp16")
    a = p.parse_args()
    build(a.comfy_path, a.out, a.dtype)
