"""Export a subset of a bank as one standard kohya-format LoRA plus standard embedding files.

Per adapted layer the LoRA holds ``<key>.lora_up.weight`` = [A_1 … A_k] (n × R),
``<key>.lora_down.weight`` = [B_1 … B_k]ᵀ (R × m) and ``<key>.alpha`` = R, R = Σ r_i, so that
up · down · (alpha / R) = Σ_i A_i B_iᵀ exactly — what stock ComfyUI and A1111 loaders apply.
Keys: ``lora_unet_<path>`` / ``lora_te_<path>`` with the canonical path's dots as underscores.
Each concept's token embedding is written as ``<id>.safetensors`` with the single tensor
``emb_params`` (k × d), the layout both hosts' embedding loaders read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .atomic import save_many_atomic
from .format import Bank
from ..errors import InputError

PREFIXES = (("unet.", "lora_unet_"), ("text_encoder.", "lora_te_"))


def kohya_key(layer: str) -> str:
    for ours, theirs in PREFIXES:
        if layer.startswith(ours):
            return theirs + layer[len(ours):].replace(".", "_")
    raise ValueError(f"layer {layer} has no unet. or text_encoder. prefix")


def lora_state_dict(bank: Bank, ids: list[str] | None = None,
                    strengths: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Kohya keys → tensors for the chosen concepts, strengths folded into the up factors."""
    out = {}
    for layer, (a_cat, b_cat) in bank.composed_factors(ids, strengths).items():
        key = kohya_key(layer)
        rank = a_cat.shape[1]
        out[f"{key}.lora_up.weight"] = a_cat.float().contiguous()
        out[f"{key}.lora_down.weight"] = b_cat.T.float().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(rank))
    return out


def embeddings_dir_for(out: Path) -> Path:
    return out.with_name(out.stem + "_embeddings")


def export_lora(bank: Bank, ids: list[str] | None, out: str | os.PathLike,
                embeddings_dir: str | os.PathLike | None = None) -> tuple[Path, list[Path]]:
    """Write the LoRA to ``out`` and the embeddings to ``embeddings_dir`` (default
    ``<out stem>_embeddings/``; a host passes its own embeddings folder, A1111 must, since its
    Lora loader lists every file under its Lora folder as a LoRA); returns the paths. All files are
    written to temp files first and renamed together, so a full disk or a name too long for the
    file system (a long id) leaves no half-written export, only one sentence."""
    out = Path(out)
    emb_dir = Path(embeddings_dir) if embeddings_dir is not None else embeddings_dir_for(out)
    concepts = bank.select(ids)
    if not concepts:
        raise InputError("The bank has no concepts to export.")
    meta = {"seqlora_concepts": json.dumps([{"id": c.id, "token": c.token} for c in concepts]),
            "seqlora_base": json.dumps(bank.base)}
    files = [(lora_state_dict(bank, [c.id for c in concepts]), out, meta)]
    written = [emb_dir / f"{c.id}.safetensors" for c in concepts]
    files += [({"emb_params": c.embedding.float().contiguous()}, path, {"token": c.token})
              for c, path in zip(concepts, written)]
    save_many_atomic(files, what="any earlier export under those names")  # all or nothing
    return out, written
