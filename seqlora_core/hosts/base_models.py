"""Loading an SD-1.5 base for the standalone path, offline, from shipped configs or local files.

``tiny``        SD-1.5 block structure with small widths, random weights from a fixed seed, the
                real CLIP BPE vocabulary: the embedded default for tests and the demo.
``toy``         ``tiny``'s modules pretrained here on a procedural, captioned toy world
                (``seqlora_core/toy``): a base that has learned, for measuring quality; its
                fp16 weights ship in ``weights/`` and are checked against their recorded hash.
``sd15-random`` the full-size SD-1.5 architecture with random weights (benchmarks).
PATH            a real SD-1.5: a diffusers folder, or one original-format ``.safetensors`` file
                (converted by diffusers' single-file loaders against our shipped configs).
Nothing here reaches a hub.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError

CONFIGS = Path(__file__).parent / "configs"
BASE_SEED = 20260521
TOY_WEIGHTS = Path(__file__).parent / "weights" / "toy.safetensors"
TOY_RECORD = TOY_WEIGHTS.with_suffix(".json")
EMBEDDED_BASES = ("tiny", "toy", "sd15-random")


@dataclass
class Components:
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler_config: dict
    architecture: str  # "sd15" or "sd15-tiny"


def _read(path: Path) -> dict:
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def random_components(name: str) -> Components:
    """Random-weight SD-1.5-architecture modules from the shipped configs, seeded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer_data import load_clip_tokenizer

    folder = CONFIGS / ("tiny" if name == "tiny" else "sd15")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASE_SEED)
        unet = UNet2DConditionModel(**_read(folder / "unet" / "config.json"))
        vae = AutoencoderKL(**_read(folder / "vae" / "config.json"))
        te_cfg = _read(folder / "text_encoder" / "config.json")
        te_cfg.pop("architectures", None)
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    return Components(unet, vae, text_encoder, load_clip_tokenizer(),
                      _read(folder / "scheduler" / "scheduler_config.json"),
                      "sd15-tiny" if name == "tiny" else "sd15")


def toy_record(weights: Path = TOY_WEIGHTS) -> dict:
    """What ``toy.json`` records of the shipped toy weights: hash, latent scale, provenance, figures."""
    path = weights.with_suffix(".json")
    if not path.exists():
        raise InputError(f"The toy base's weights are missing ({path}); rebuild them with "
                         "python -m seqlora_core.toy.pretrain.")
    return json.loads(path.read_text())


def toy_components(weights: Path = TOY_WEIGHTS) -> Components:
    """``tiny``'s modules with the shipped pretrained weights (the token-embedding table, never
    trained, comes from ``tiny``'s seed), after checking the file against its recorded sha256."""
    import hashlib

    from safetensors.torch import load as load_safetensors

    record = toy_record(weights)
    data = weights.read_bytes() if weights.exists() else b""
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise InputError(f"{weights.name} does not match the sha256 in {weights.with_suffix('.json').name} (missing, truncated "
                         "or replaced); rebuild it with python -m seqlora_core.toy.pretrain.")
    state = load_safetensors(data)
    parts = random_components("tiny")
    for prefix, module in (("unet", parts.unet), ("vae", parts.vae), ("text_encoder", parts.text_encoder)):
        own = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if prefix == "text_encoder" and not any(k.startswith("text_model.") for k in module.state_dict()):
            own = {k.removeprefix("text_model."): v for k, v in own.items()}  # transformers >= 5
        missing, unexpected = module.load_state_dict(own, strict=False)
        missing = [k for k in missing if not k.endswith(("token_embedding.weight", "position_ids"))]
        if missing or unexpected:
            raise InputError(f"{weights.name} does not fit the tiny {prefix} "
                             f"({len(missing)} missing, {len(unexpected)} unexpected weights).")
    parts.vae.register_to_config(scaling_factor=record["vae_scaling_factor"])
    return parts


def folder_components(path: Path) -> Components:
    """A diffusers-format SD-1.5 folder (unet/, vae/, text_encoder/, optional tokenizer/)."""
    missing = [part for part in ("unet", "vae", "text_encoder") if not (path / part / "config.json").is_file()]
    if missing:  # before diffusers, whose error for it is a multi-line traceback
        raise InputError(f"{path} is not a diffusers SD-1.5 folder (no {missing[0]}/config.json).")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .tokenizer_data import load_clip_tokenizer

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
    tok_dir = path / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True) if tok_dir.is_dir() else load_clip_tokenizer()
    sched_file = path / "scheduler" / "scheduler_config.json"
    scheduler = _read(sched_file) if sched_file.exists() else _read(CONFIGS / "sd15" / "scheduler" / "scheduler_config.json")
    width = text_encoder.config.hidden_size
    return Components(unet, vae, text_encoder, tokenizer, scheduler, "sd15" if width == 768 else "sd15-tiny")


CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.")  # the text encoder: checked when loaded


def check_checkpoint(path: Path) -> None:
    """Refuse, from the header alone, a file that is no original-format SD-1.5 checkpoint (a LoRA,
    an embedding, a diffusers part, not safetensors at all), before diffusers tries to convert it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise InputError(f"{path.name} is not a readable .safetensors file ({str(exc).splitlines()[0]}).") from None
    absent = [p for p in CHECKPOINT_PREFIXES if not any(k.startswith(p) for k in keys)]
    if absent:
        raise InputError(f"{path.name} is not an SD-1.5 checkpoint (no {absent[0]}* weights; a LoRA or an "
                         "embedding is not a base model).")


def single_file_components(path: Path) -> Components:
    """One original-format checkpoint (model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.transformer.*), converted with diffusers' single-file loaders."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer_data import load_clip_tokenizer

    check_checkpoint(path)
    cfg = str(CONFIGS / "sd15")
    unet = UNet2DConditionModel.from_single_file(str(path), config=cfg, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_single_file(str(path), config=cfg, subfolder="vae", local_files_only=True)
    te_cfg = _read(CONFIGS / "sd15" / "text_encoder" / "config.json")
    te_cfg.pop("architectures", None)
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    prefix = "cond_stage_model.transformer."
    state = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    model_has_level = any(k.startswith("text_model.") for k in text_encoder.state_dict())
    if model_has_level and not any(k.startswith("text_model.") for k in state):
        state = {"text_model." + k: v for k, v in state.items()}
    if not model_has_level:  # transformers >= 5 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    missing, _ = text_encoder.load_state_dict(state, strict=False)
    if missing:
        raise InputError(f"{path.name} has no SD-1.5 text encoder ({len(missing)} weights missing, e.g. {missing[0]}).")
    return Components(unet, vae, text_encoder, load_clip_tokenizer(),
                      _read(CONFIGS / "sd15" / "scheduler" / "scheduler_config.json"), "sd15")


def load_components(base: str) -> Components:
    if base in ("tiny", "sd15-random"):
        return random_components(base)
    if base == "toy":
        return toy_components()
    if not base.strip():  # Path('') is the current folder
        raise InputError("Base is empty; give tiny, toy, sd15-random, a diffusers folder or a .safetensors checkpoint.")
    path = Path(os.path.expanduser(base))
    if path.is_dir():
        return folder_components(path)
    if path.is_file() and path.suffix == ".safetensors":
        return single_file_components(path)
    raise InputError(f"Base '{base}' is neither tiny, toy, sd15-random, a diffusers folder nor a .safetensors checkpoint.")
