"""Reading the LoRA files users own: kohya, diffusers and peft layouts, as one list of layers.

Layouts read (each layer's ΔW = up · down · scale):

* kohya / A1111 (``lora_unet_…`` / ``lora_te_…``): ``<stem>.lora_down.weight`` (r × m, or
  r × m × 1 × 1 for a 1 × 1 convolution), ``<stem>.lora_up.weight`` (n × r) and ``<stem>.alpha``
  (scale alpha / r; 1 when absent);
* peft / diffusers (``unet.…`` / ``text_encoder.…``, optionally under ``base_model.model.``):
  ``<path>.lora_A[.<adapter>].weight`` (r × m) and ``<path>.lora_B[.<adapter>].weight`` (n × r),
  scale 1 (peft keeps lora_alpha in a config file that does not travel with the weights, and
  diffusers' exports fold it in) unless an ``<path>.alpha`` tensor is present;
* diffusers' older attention-processor layout (``….processor.to_k_lora.down.weight``) and
  ``<path>.lora.down.weight`` / ``.lora.up.weight``.

Each layer is named by a *side* (``unet``, ``te``; ``te1`` / ``te2`` for two-encoder models) and
its module path with every ``.`` written as ``_``, the form all layouts can be brought to (kohya's
keys have lost the dots). Which model layer that path is, is the naming module's business
(``hosts.naming.lora_paths``): nothing here knows SD-1.5.

Anything else (a checkpoint, an embedding, a bank, LoHa / LoKr / DoRA weights) is refused or its
layers reported as unread, in one sentence each.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError
from .spec import FORMAT
from .tensor_file import read_header, read_tensor_file

# (suffix of the down key, suffix of the up key), in the order tried
_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora.down.weight", ".lora.up.weight"),
          (".down.weight", ".up.weight"))
_PEFT = re.compile(r"^(?P<stem>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
_SIDES = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te"))
_DOTTED_SIDES = (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te"),
                 ("transformer.", "transformer"))
_LORA_KEY = re.compile(r"(lora_down|lora_up|lora\.down|lora\.up|_lora\.down|lora_A|lora_B)")
UNSUPPORTED = ("hada_w1_a", "lokr_w1", "lokr_w1_a", "dora_scale", "oft_blocks", "b1.weight", "diff_b")


@dataclass
class LayerUpdate:
    side: str  # 'unet', 'te', …
    path: str  # module path with '_' for '.', e.g. 'down_blocks_0_attentions_0_…_attn2_to_k'
    key: str  # the file's key stem, for messages
    up: Tensor  # (n, r)
    down: Tensor  # (r, m)
    scale: float  # alpha / r (1 when the file records no alpha)

    @property
    def rank(self) -> int:
        return self.up.shape[1]


@dataclass
class LoRAFile:
    name: str
    sha256: str
    layout: str  # 'kohya', 'peft' or 'diffusers'
    layers: list[LayerUpdate]
    unread: list[str] = field(default_factory=list)  # key stems of layers in other formats
    metadata: dict[str, str] = field(default_factory=dict)

    def suggested_trigger(self) -> str | None:
        """The most frequent caption tag kohya's trainer recorded (``ss_tag_frequency``), if any."""
        try:
            freq = json.loads(self.metadata.get("ss_tag_frequency", "") or "{}")
            counts: dict[str, int] = {}
            for tags in freq.values():
                for tag, n in tags.items():
                    counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
        except (ValueError, AttributeError, TypeError):
            return None
        counts.pop("", None)
        return max(counts, key=counts.get) if counts else None


def _side(stem: str) -> tuple[str, str]:
    """A key stem → (side, path with '_' for '.')."""
    for prefix, side in _SIDES:
        if stem.startswith(prefix):
            return side, stem[len(prefix):]
    dotted = stem.removeprefix("base_model.model.")
    dotted = _PROCESSOR.sub(lambda m: "." + ("to_out.0" if m.group(1) == "to_out" else m.group(1)), dotted)
    for prefix, side in _DOTTED_SIDES:
        if dotted.startswith(prefix):
            return side, dotted[len(prefix):].replace(".", "_")
    return "", dotted.replace(".", "_")


def _matrix(t: Tensor, key: str, name: str) -> Tensor:
    """A 2-D weight (a 1 × 1 convolution's squeezed); one sentence for anything else."""
    if t.dim() == 4 and t.shape[2:] == (1, 1):
        t = t[:, :, 0, 0]
    if t.dim() != 2:
        raise _Skip(key)
    return t.detach().to(torch.float32)


class _Skip(Exception):
    """A layer whose update is not a plain low-rank product (a k × k convolution)."""


def read_lora_file(path: str | Path) -> LoRAFile:
    """Every low-rank layer of the LoRA file ``path``; one InputError sentence when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"LoRA file {path} does not exist.")
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{path.name}: only .safetensors LoRA files are read (a .ckpt / .pt file can run code when "
                         "loaded); convert it first.")
    try:
        with path.open("rb") as f:  # the header first: a multi-GB checkpoint is refused unread
            head, entries, _ = read_header(f, path.stat().st_size)
        if (head or {}).get("format") == FORMAT:
            raise InputError(f"{path.name} is a SeqLoRA bank, not a LoRA; merge banks with `bank merge`.")
        if not any(_LORA_KEY.search(k) for k in entries) and not any(s in k for k in entries for s in UNSUPPORTED):
            raise InputError(f"{path.name} is not a LoRA file the import reads: it has no lora_down / lora_up or "
                             "lora_A / lora_B weights.")
        read = read_tensor_file(path)
        meta, tensors, nonfinite = read.meta, read.tensors, read.nonfinite
    except InputError:
        raise
    except Exception:
        raise InputError(f"{path.name} is not a readable safetensors file.") from None
    if nonfinite:
        raise InputError(f"{path.name} holds non-finite values ({sorted(nonfinite)[0]}); it is damaged.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    layers, unread, layouts = [], [], set()
    used: set[str] = set()
    for key in sorted(tensors):
        for down_suffix, up_suffix in _PAIRS:
            if key.endswith(down_suffix) and (stem := key[: -len(down_suffix)]) + up_suffix in tensors:
                up_key = stem + up_suffix
                alpha = tensors.get(stem + ".alpha")
                layouts.add("kohya" if down_suffix == ".lora_down.weight" else "diffusers")
                _add(layers, unread, stem, tensors[up_key], tensors[key], alpha, path.name)
                used |= {key, up_key, stem + ".alpha"}
                break
        else:
            match = _PEFT.match(key)
            if match and match["which"] == "A":
                up_key = key[: match.start("which")] + "B" + key[match.end("which"):]
                if up_key in tensors:
                    stem = match["stem"]
                    layouts.add("peft")
                    _add(layers, unread, stem, tensors[up_key], tensors[key], tensors.get(stem + ".alpha"), path.name)
                    used |= {key, up_key, stem + ".alpha"}
    for key in tensors:
        if key not in used and any(key.endswith(s) or f".{s}" in key for s in UNSUPPORTED):
            stem = key.rsplit(".", 1)[0]
            if stem not in unread:
                unread.append(stem)
    if not layers:
        kind = "LoHa / LoKr / DoRA (LyCORIS) weights, which are not plain LoRA" if unread else \
            "no lora_down / lora_up or lora_A / lora_B weights"
        raise InputError(f"{path.name} is not a LoRA file the import reads: it has {kind}.")
    return LoRAFile(path.name, digest, "+".join(sorted(layouts)), layers, sorted(unread), dict(meta or {}))


def _add(layers: list, unread: list, stem: str, up: Tensor, down: Tensor, alpha: Tensor | None, name: str) -> None:
    try:
        up2, down2 = _matrix(up, stem, name), _matrix(down, stem, name)
    except _Skip:
        unread.append(stem)
        return
    if up2.shape[1] != down2.shape[0]:
        raise InputError(f"{name}: layer {stem} has an up factor of rank {up2.shape[1]} and a down factor of rank "
                         f"{down2.shape[0]}; the file is damaged.")
    rank = down2.shape[0]
    scale = 1.0 if alpha is None or alpha.numel() != 1 else float(alpha.reshape(())) / rank
    side, layer_path = _side(stem)
    layers.append(LayerUpdate(side, layer_path, stem, up2, down2, scale))
