"""What the SeqLoRA nodes do, on ComfyUI objects; the node classes in ``node_defs`` only declare I/O.

Nothing here re-implements the method: training is ``seqlora_core.method.trainer.train_concept`` on a
:class:`ComfyHost`, composition is the core's kohya export handed to ComfyUI's own LoRA loader
(clone + patches, exactly like a stock LoraLoader; no weight is copied per concept).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from seqlora_core.bank.format import Bank, load_bank
from seqlora_core.bank.lock import BankSession
from seqlora_core.bank.merge import merge_banks, parse_renames
from seqlora_core.bank.names import check_bank_name  # the rule lives in the core: A1111 shares it
from seqlora_core.errors import BankError, InputError
from seqlora_core.bank.export import lora_state_dict
from seqlora_core.bank.fingerprint import base_fingerprint
from seqlora_core.bank.on_disk import file_identity
from seqlora_core.hosts.naming import compvis_layers, unet_canonical_to_compvis
from seqlora_core.app.plot import loss_curve_image
from seqlora_core.method.trainer import TrainSettings, new_bank, train_concept

from .concept_tokenizer import ConceptTokenizer

FOLDER = "seqlora"
# Inside ComfyUI a bank for another base is used only with the node's toggle, never a CLI flag.
OTHER_BASE_HINT = "turn on allow_other_base to use it anyway"


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
    """Bank files in models/seqlora; none before the folder is registered (the extension's on_load).
    Hidden files and folders (a name part starting with a dot) are left out: Save Basis Bank never
    writes one, and ComfyUI's own listing would show them."""
    import folder_paths

    if FOLDER not in folder_paths.folder_names_and_paths:
        return []
    return [name for name in folder_paths.get_filename_list(FOLDER)
            if not any(part.startswith(".") for part in name.replace("\\", "/").split("/"))]


def bank_path(name: str) -> str | None:
    import folder_paths

    if FOLDER not in folder_paths.folder_names_and_paths:
        return None
    return folder_paths.get_full_path(FOLDER, name)


def bank_file_identity(name: str):
    """Changes whenever the named bank file changes on disk (Load Basis Bank's change check)."""
    path = bank_path(name)
    return (name, file_identity(path) if path else None)


# -- base checks ---------------------------------------------------------------------------------
def model_layers(model, clip=None) -> dict[str, torch.nn.Linear]:
    """Canonical name → Linear for a Comfy MODEL (and CLIP), without loading anything."""
    return compvis_layers(model.model.diffusion_model, clip.cond_stage_model if clip is not None else None)


def check_model(model) -> None:
    from .comfy_host import is_sd15

    if not is_sd15(model):
        raise InputError(f"SeqLoRA needs an SD-1.5 model; this MODEL is {type(model.model.model_config).__name__}.")


class _Weight:
    """What ``base_fingerprint`` reads of a layer: its weight."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight


def unpatched_unet_layers(model) -> dict[str, _Weight]:
    """Canonical UNet layer name → the base weight without any LoRA patch.

    After sampling with a patched clone (Compose Concepts, a stock LoRA), ComfyUI leaves the patched
    weights in the shared UNet until another model is loaded, keeping the originals in the patcher's
    ``backup`` (shared by all clones; ``hook_backup`` for hook patches). Reading those first gives
    the weights of the base itself, whatever was sampled last."""
    unet = model.model.diffusion_model
    backup = getattr(model, "backup", {}) or {}
    hook_backup = getattr(model, "hook_backup", {}) or {}
    out = {}
    for name, layer in compvis_layers(unet).items():
        key = f"diffusion_model.{unet_canonical_to_compvis(name)}.weight"
        weight = layer.weight
        if key in backup:
            weight = backup[key].weight
        if key in hook_backup:
            weight = hook_backup[key][0]
        out[name] = _Weight(weight)
    return out


def base_fingerprint_of(model) -> str:
    return base_fingerprint(unpatched_unet_layers(model))


def check_bank_for(bank: Bank, model, allow_other_base: bool = False) -> Bank:
    """Refuse a bank made for another base; with ``allow_other_base`` return a copy re-signed for
    this model (the trainer checks the base again), the bank passed in is never modified."""
    check_model(model)
    fingerprint = base_fingerprint_of(model)
    bank.check_base("sd15", fingerprint, allow_other_base, hint=OTHER_BASE_HINT)
    if allow_other_base and bank.base.get("fingerprint") not in (None, fingerprint):
        bank = dataclasses.replace(bank, base={**bank.base, **fingerprint.base_fields()})
    return bank


# -- bank nodes ----------------------------------------------------------------------------------
def load_bank_file(name: str, model=None, allow_other_base: bool = False) -> Bank:
    path = bank_path(name)
    if path is None:
        raise BankError(f"No bank named {name} in models/{FOLDER}.")
    bank = load_bank(path)
    if model is not None:
        bank = check_bank_for(bank, model, allow_other_base)
    return bank


def save_bank_file(bank: Bank, name: str, overwrite: bool = False) -> str:
    """Atomic save into models/seqlora; an existing file is only replaced with ``overwrite``,
    otherwise the name gets a numbered suffix (another artist's bank is never lost)."""
    import folder_paths

    problem = check_bank_name(name)
    if problem:
        raise InputError(problem)
    name = name.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
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
    """Whether writing ``bank`` keeps every concept and outstanding lease of ``disk``; a concept that
    ``bank``'s own history records as removed (the Remove Concept node) may go."""
    ours = {(c.id, c.hash) for c in bank.concepts} | bank.removed_concepts()
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


def bank_tokens(only: str | None = None) -> dict[str, list[str]]:
    """Every bank in models/seqlora (or just ``only``) → its concept tokens, from file headers only."""
    from seqlora_core.bank.on_disk import concepts_in_file

    out = {}
    for name in bank_files():
        if only is not None and name != only:
            continue
        try:
            out[name] = [e["token"] for e in concepts_in_file(bank_path(name)) if "token" in e]
        except Exception:  # noqa: BLE001 - a damaged file just offers no tokens here; loading it says why
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
    """What the js bank panel draws: concepts (with final loss), capacity per layer width, the
    orthogonality error and the base model's fingerprint."""
    summary = bank.summary()
    return {"concepts": [{**{k: c[k] for k in ("id", "token", "method", "rank")},
                          "loss": c["final_loss"] if isinstance(c["final_loss"], (int, float)) else None}
                         for c in summary["concepts"]],
            "widths": summary["widths"], "leases": summary["leases"],
            "orthogonality": summary["max_orthogonality_error"], "fingerprint": bank.base.get("fingerprint")}


def interference_info(bank: Bank, worst: int = 3) -> tuple[str, dict | None]:
    """Basis Bank Info's interference: the report in words (``app.interference_report``) and what
    the js panel draws as a heat map (tokens, matrix with None on the diagonal and in rows without
    statistics, the worst layers, the random-weight note); no panel data for an empty bank."""
    from seqlora_core.app.interference_report import honesty_line, interference_text, worst_layers_json
    from seqlora_core.method.interference import bank_interference

    if not bank.concepts:
        return interference_text(bank), None
    result = bank_interference(bank)
    panel = {"concepts": result.concepts, "tokens": [bank.get(i).token for i in result.concepts],
             "matrix": result.matrix, "worst_layers": worst_layers_json(result, worst),
             "missing_stats": result.missing_stats, "note": honesty_line(bank)}
    return interference_text(bank, worst, result), panel


def remove_concept(bank: Bank, concept: str) -> Bank:
    """The bank without ``concept`` (id or token); the bank passed in is unchanged."""
    from seqlora_core.bank.format import token_to_id

    return bank.without(token_to_id(concept))


def export_lora_file(bank: Bank, selection: str, name: str, overwrite: bool = False) -> str:
    """One kohya LoRA in models/loras and the embeddings in models/embeddings/<name>/; returns
    what was written and how to use it, in one line."""
    import folder_paths

    from seqlora_core.bank.export import export_lora

    problem = check_bank_name(name, "LoRA name")
    if problem:
        raise InputError(problem)
    ids, _ = bank.parse_selection(selection)
    stem = name.strip().removesuffix(".safetensors")
    loras = Path(folder_paths.get_folder_paths("loras")[0])
    path, counter = loras / f"{stem}.safetensors", 1
    while path.exists() and not overwrite:
        path, counter = loras / f"{stem}_{counter:05d}.safetensors", counter + 1
    embeddings = Path(folder_paths.get_folder_paths("embeddings")[0]) / path.stem
    out, written = export_lora(bank, ids, path, embeddings)
    uses = ", ".join(f"embedding:{path.stem}/{p.stem}" for p in written)
    return f"wrote loras/{out.name}; in prompts use {uses}"


def lora_files() -> list[str]:
    """The LoRA files ComfyUI lists in models/loras (the stock Load LoRA node's list)."""
    import folder_paths

    return [n for n in folder_paths.get_filename_list("loras") if n.lower().endswith(".safetensors")]


def import_lora_file(model, clip, vae, lora_name: str, token: str, trigger: str, strength: float, rank: int,
                     bank: Bank | None, images=None, allow_other_base: bool = False):
    """The Import LoRA into Bank node: the core import (``seqlora_core.app.import_lora``) on the
    loaded model; returns (bank, model and clip with every concept applied, report)."""
    import folder_paths

    from seqlora_core.app.import_lora import import_lora, report_lines
    from seqlora_core.bank.lora_file import read_lora_file

    from .comfy_host import ComfyHost

    path = folder_paths.get_full_path("loras", lora_name)
    if not path:
        raise InputError(f"There is no LoRA {lora_name} in models/loras.")
    lora = read_lora_file(path)  # refused here, before the model is loaded
    check_model(model)
    if bank is not None:
        bank = check_bank_for(bank, model, allow_other_base)
        bank.check_new_token(token)
    if images is not None and vae is None:
        raise InputError("Connect the VAE too: the images are encoded with it.")
    host = ComfyHost(model, clip, vae)
    pixels = None if images is None else images_to_pixels(images, 512)
    with host.training():
        result = import_lora(host, bank if bank is not None else new_bank(host), lora, token, trigger.strip() or None,
                             strength, rank or None, None, pixels, allow_other_base=allow_other_base)
    new_model, new_clip = compose(model, clip, result.bank, [c.id for c in result.bank.concepts], {})
    return result.bank, new_model, new_clip, "\n".join(report_lines(result))


# -- compose -------------------------------------------------------------------------------------
def compose(model, clip, bank: Bank, ids: list[str], strengths: dict[str, float]):
    """MODEL and CLIP clones with Σ s_i A_i B_iᵀ patched in and the concept tokens usable."""
    import comfy.sd

    if not ids:
        return model, clip
    check_bank_for(bank, model)
    lora = lora_state_dict(bank, ids, strengths)
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    if new_clip is not None:
        new_clip.tokenizer = ConceptTokenizer(new_clip.tokenizer, bank.embeddings(ids))
    return new_model, new_clip


# -- train ---------------------------------------------------------------------------------------
# A first run on a CPU (issue 23): 512 px and 200 minibatches suit a GPU, but a real SD-1.5 on a
# CPU takes about 38 s per minibatch at 64 px on 2 cores, so Train Concept's quick_on_cpu (on by
# default) caps a CPU run at this size and length: a few minutes, enough to see the whole workflow
# work, not enough to learn the concept well. A GPU run is never changed.
QUICK_CPU_RESOLUTION = 64
QUICK_CPU_STEPS = 4


def runs_on_cpu() -> bool:
    """Whether ComfyUI computes on the CPU (no GPU, or --cpu)."""
    import comfy.model_management as mm

    return mm.get_torch_device().type == "cpu"


def quick_cpu_settings(settings: TrainSettings) -> tuple[TrainSettings, str]:
    """``settings`` capped to the quick CPU run, and one line saying what was changed ('' if nothing)."""
    quick = dataclasses.replace(settings, resolution=min(settings.resolution, QUICK_CPU_RESOLUTION),
                                steps=min(settings.steps, QUICK_CPU_STEPS))
    if quick == settings:
        return settings, ""
    return quick, (f"Quick first run on the CPU: {quick.resolution} px and {quick.steps} minibatches instead of "
                   f"{settings.resolution} px and {settings.steps} (turn quick_on_cpu off to train as set; on a "
                   f"CPU that takes hours).")


def is_cancel(exc: BaseException) -> bool:
    """True for ComfyUI's Cancel (its interrupt exception) and the trainer's own interruption."""
    from seqlora_core.method.trainer import Interrupted

    return isinstance(exc, Interrupted) or type(exc).__name__ == "InterruptProcessingException"


def preview(model, clip, vae, token: str, resolution: int, steps: int, seed: int) -> torch.Tensor:
    """IMAGE of 'a photo of <token>' on the composed model; black when ``steps`` is 0."""
    if steps <= 0:
        return torch.zeros(1, resolution, resolution, 3)
    from .preview import sample_preview

    return sample_preview(model, clip, vae, f"a photo of {token}", resolution, steps, seed)

# Train Concept's MASK input. ComfyUI's convention (Load Image's MASK is 1 - alpha, 1 where the PNG
# is transparent; the mask editor paints what it erases): by default the mask marks the background,
# so a photo with a transparent background trains on its subject, wired straight from Load Image or
# Load Image Folder. Segmentation nodes give 1 on the subject: that is the other choice.
MASK_MEANINGS = ("background", "subject")
# the labels of the first release (too long for the widget, issue 23); workflows saved with them still run
OLD_MASK_MEANINGS = {"background (Load Image: transparent = 1)": "background",
                     "subject (segmentation: subject = 1)": "subject"}


def masks_to_weights(mask: torch.Tensor, image: torch.Tensor, resolution: int, meaning: str = MASK_MEANINGS[0]) -> torch.Tensor:
    """ComfyUI MASK ((b, H, W) or (H, W), any size; one mask for every image or one per image) →
    (N, R, R) training weights, 1 = subject, cropped like ``images_to_pixels`` crops the images."""
    from PIL import Image

    from seqlora_core.app.images import pil_to_mask

    meaning = OLD_MASK_MEANINGS.get(meaning, meaning)
    if meaning not in MASK_MEANINGS:
        raise InputError(f"mask_means must be one of: {', '.join(MASK_MEANINGS)}.")
    mask = mask.detach().float().cpu()
    mask = mask[None] if mask.dim() == 2 else mask
    n, h, w = image.shape[0], image.shape[1], image.shape[2]
    if mask.dim() != 3 or len(mask) not in (1, n):
        raise InputError(f"Give one mask, or one per image: {n} image(s), {len(mask)} mask(s).")
    if meaning == MASK_MEANINGS[0]:
        mask = 1 - mask
    mask = torch.nn.functional.interpolate(mask[:, None], size=(h, w), mode="bilinear")[:, 0]
    out = []
    for m in mask.expand(n, h, w):
        arr = (m.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        out.append(pil_to_mask(Image.fromarray(arr), resolution))  # uint8 (H, W): mode L
    return torch.stack(out)


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
          progress=None, allow_other_base: bool = False, forecast: bool = False, on_forecast=None,
          mask=None, mask_means: str = MASK_MEANINGS[0]):
    """Train one concept inside ComfyUI; returns (bank, model, clip, loss curve IMAGE, report).

    With ``forecast`` the core's forecast (``method.forecast``: one pass over the images, before any
    step) is handed to ``on_forecast(text)`` before training, and ``report`` holds it followed by
    the new concept's measured interference row and column; otherwise ``report`` is empty.
    ``mask``: a ComfyUI MASK read as ``mask_means`` says (``masks_to_weights``); only the subject
    is learned."""
    import comfy.model_management as mm

    from seqlora_core.app.interference_report import after_training_text, forecast_text
    from seqlora_core.method.forecast import forecast_training

    from .comfy_host import ComfyHost

    check_model(model)
    if bank is not None:
        bank = check_bank_for(bank, model, allow_other_base)
    pixels = images_to_pixels(image, settings.resolution)
    weights = None if mask is None else masks_to_weights(mask, image, settings.resolution, mask_means)
    host = ComfyHost(model, clip, vae)
    before = ""
    with host.training():
        start = bank if bank is not None else new_bank(host, settings.eps)
        if forecast:
            fc = forecast_training(host, start, pixels, token, init_word, settings)
            before = forecast_text(fc, token if token.startswith("<") else f"<{token}>", start)
            if on_forecast is not None:
                on_forecast(before)
        result = train_concept(host, start, pixels, token, init_word, settings, progress,
                               should_stop=lambda: mm.throw_exception_if_processing_interrupted() or False,
                               masks=weights)
    new_model, new_clip = compose(model, clip, result.bank, [c.id for c in result.bank.concepts], {})
    curve = torch.from_numpy(loss_curve_image(result.losses).astype(np.float32) / 255.0).unsqueeze(0)
    report = before + "\n" + after_training_text(result.bank, result.concept.id, fc) if forecast else ""
    return result.bank, new_model, new_clip, curve, report
