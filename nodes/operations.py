"""What the SeqLoRA nodes do, on ComfyUI objects; the node classes in ``node_defs`` only declare I/O.

Nothing here re-implements the method: training is ``seqlora_core.method.trainer.train_concept`` on a
:class:`ComfyHost`, composition is the core's kohya export handed to ComfyUI's own LoRA loader
(clone + patches, exactly like a stock LoraLoader; no weight is copied per concept).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from seqlora_core.bank.format import Bank, load_bank
from seqlora_core.bank.lock import BankSession
from seqlora_core.bank.merge import merge_banks, parse_renames
from seqlora_core.errors import BankError, InputError
from seqlora_core.bank.export import lora_state_dict
from seqlora_core.bank.fingerprint import base_fingerprint
from seqlora_core.hosts.naming import compvis_layers
from seqlora_core.app.plot import loss_curve_image
from seqlora_core.method.trainer import TrainSettings, new_bank, train_concept

from .concept_tokenizer import ConceptTokenizer

FOLDER = "seqlora"
SAFE_NAME = re.compile(r"^[A-Za-z0-9 _.()-]+$")


# -- folders -------------------------------------------------------------------------------------
def register_folder() -> str:
    """models/seqlora as a ComfyUI model folder (file picker lists its .safetensors)."""
    import folder_paths

    path = os.path.join(folder_paths.models_dir, FOLDER)
    os.makedirs(path, exist_ok=True)
    folder_paths.add_model_folder_path(FOLDER, path, is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, {".safetensors"})
    return path


def bank_files() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(FOLDER)


# -- base checks ---------------------------------------------------------------------------------
def model_layers(model, clip=None) -> dict[str, torch.nn.Linear]:
    """Canonical name → Linear for a Comfy MODEL (and CLIP), without loading anything."""
    return compvis_layers(model.model.diffusion_model, clip.cond_stage_model if clip is not None else None)


def check_model(model) -> None:
    from .comfy_host import is_sd15

    if not is_sd15(model):
        raise InputError(f"SeqLoRA needs an SD-1.5 model; this MODEL is {type(model.model.model_config).__name__}.")


def check_bank_for(bank: Bank, model, clip=None) -> None:
    check_model(model)
    bank.check_base("sd15", base_fingerprint(model_layers(model, clip)))


# -- bank nodes ----------------------------------------------------------------------------------
def bank_file_identity(name: str) -> str:
    """Name plus inode, size and modification time: changes whenever the bank file is rewritten
    (saves are atomic renames), so Load Basis Bank re-runs then."""
    import folder_paths

    path = folder_paths.get_full_path(FOLDER, name)
    try:
        st = os.stat(path) if path else None
    except OSError:
        st = None
    return f"{name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}" if st else f"{name}:missing"


def load_bank_file(name: str, model=None) -> Bank:
    import folder_paths

    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise BankError(f"No bank named {name} in models/{FOLDER}.")
    bank = load_bank(path)
    if model is not None:
        check_bank_for(bank, model)
    return bank


def save_bank_file(bank: Bank, name: str, overwrite: bool = False) -> str:
    """Atomic save into models/seqlora; an existing file is only replaced with ``overwrite``,
    otherwise the name gets a numbered suffix (another artist's bank is never lost)."""
    import folder_paths

    name = name.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name or not SAFE_NAME.match(name):
        raise InputError(f"Bank name '{name}' may only use letters, digits, spaces and _ . ( ) -.")
    folder = Path(folder_paths.get_folder_paths(FOLDER)[0])
    path = folder / f"{name}.safetensors"
    counter = 1
    while path.exists() and not overwrite:
        path = folder / f"{name}_{counter:05d}.safetensors"
        counter += 1
    # under the bank's lock; a bank on disk holding a concept this one lacks (another workflow or
    # the tab appended meanwhile) is kept, and this one goes to a pending file beside it
    with BankSession(path, purpose="ComfyUI Save Basis Bank") as session:
        if session.bank is None or _keeps(bank, session.bank):
            bank.save(path)
        else:
            session.write_pending(bank, "this bank")
    return path.name


def _keeps(bank: Bank, disk: Bank) -> bool:
    """Whether writing ``bank`` keeps every concept and outstanding lease of ``disk``."""
    ours = {(c.id, c.hash) for c in bank.concepts}
    return all((c.id, c.hash) in ours for c in disk.concepts) and \
        {l.id for l in disk.active_leases} <= {l.id for l in bank.leases}


def merge(banks: list[Bank], rebase: bool, renames_text: str) -> tuple[Bank, str]:
    """The Merge Basis Banks node: the core merge, and a report of what it did."""
    renames = parse_renames([p.strip() for p in renames_text.split(",") if p.strip()])
    result = merge_banks(banks, [f"bank {i + 1}" for i in range(len(banks))], rebase, renames)
    lines = [f"merged {len(banks)} banks: {len(result.bank.concepts)} concept(s)"]
    lines += [f"renamed {old} -> {new}" for old, new in result.renamed]
    lines += [f"left out {i} (removed in an input's history)" for i in result.dropped]
    lines += [f"rebased {i}: relative residual change {c:.4f}" for i, c in result.rebased]
    lines += [f"lease {i} returned" for i in result.returned]
    return result.bank, "\n".join(lines)


def bank_tokens() -> dict[str, list[str]]:
    """Every bank in models/seqlora → its concept tokens, from the file headers only (cheap)."""
    import folder_paths
    from safetensors import safe_open

    out = {}
    for name in bank_files():
        try:
            with safe_open(folder_paths.get_full_path(FOLDER, name), framework="pt") as f:
                entries = json.loads((f.metadata() or {}).get("concepts", "[]"))
            out[name] = [e["token"] for e in entries if isinstance(e, dict) and "token" in e]
        except Exception:  # a damaged file just offers no tokens here; loading it says why
            out[name] = []
    return out


def info_text(bank: Bank) -> str:
    summary = bank.summary()
    lines = [f"{len(bank.concepts)} concept(s), base {bank.base.get('architecture')} "
             f"(fingerprint {bank.base.get('fingerprint')})"]
    for c in summary["concepts"]:
        loss = f"{c['final_loss']:.4f}" if isinstance(c["final_loss"], (int, float)) else "-"
        lines.append(f"  {c['token']}  rank {c['rank']}  {c['method']}  loss {loss}")
    if summary["fullest"]:
        f = summary["fullest"]
        lines.append(f"{len(summary['layers'])} layers; fullest {f['name']} holds {f['used']}/{f['capacity']}")
    for lease in summary["leases"]:
        state = "returned" if lease["returned"] else "out"
        lines.append(f"lease {lease['name']} ({lease['id']}): {lease['used']}/{lease['concepts']} concepts "
                     f"of rank {lease['rank']}, {state}")
    lines.append(f"max orthogonality error {summary['max_orthogonality_error']:.2e}")
    return "\n".join(lines)


def panel_data(bank: Bank) -> dict:
    """What the js bank panel draws: concepts and capacity per layer width."""
    summary = bank.summary()
    return {"concepts": [{k: c[k] for k in ("id", "token", "method", "rank")} for c in summary["concepts"]],
            "widths": summary["widths"], "leases": summary["leases"],
            "orthogonality": summary["max_orthogonality_error"]}


def compose(model, clip, bank: Bank, ids: list[str], strengths: dict[str, float]):
    """MODEL and CLIP clones with Σ s_i A_i B_iᵀ patched in and the concept tokens usable."""
    import comfy.sd

    if not ids:
        return model, clip
    check_bank_for(bank, model, clip)
    lora = lora_state_dict(bank, ids, strengths)
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    if new_clip is not None:
        new_clip.tokenizer = ConceptTokenizer(new_clip.tokenizer, bank.embeddings(ids))
    return new_model, new_clip


# -- train ---------------------------------------------------------------------------------------
def images_to_pixels(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """ComfyUI IMAGE (b, H, W, 3) in [0, 1] → (b, 3, R, R) in [-1, 1], centre-cropped."""
    from PIL import Image

    from seqlora_core.app.images import pil_to_tensor

    frames = []
    for frame in image.detach().float().cpu():
        arr = (frame.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        frames.append(pil_to_tensor(Image.fromarray(arr), resolution))
    return torch.stack(frames)


def train(model, clip, vae, image, token: str, init_word: str, bank: Bank | None, settings: TrainSettings,
          progress=None):
    """Train one concept inside ComfyUI; returns (bank, model, clip, loss curve IMAGE)."""
    import comfy.model_management as mm

    from .comfy_host import ComfyHost

    check_model(model)
    if bank is not None:
        check_bank_for(bank, model, clip)
    pixels = images_to_pixels(image, settings.resolution)
    host = ComfyHost(model, clip, vae)
    with host.training():
        result = train_concept(host, bank if bank is not None else new_bank(host, settings.eps), pixels, token,
                               init_word, settings, progress,
                               should_stop=lambda: mm.throw_exception_if_processing_interrupted() or False)
    new_model, new_clip = compose(model, clip, result.bank, [c.id for c in result.bank.concepts], {})
    curve = torch.from_numpy(loss_curve_image(result.losses).astype(np.float32) / 255.0).unsqueeze(0)
    return result.bank, new_model, new_clip, curve
