"""Living with A1111's built-in Lora extension, which merges LoRAs into the weights in place.

After a prompt with ``<lora:…>``, every layer it touched keeps the merged weight (and a backup of
the original in ``network_weights_backup``) until the next forward pass with another set of
LoRAs. SeqLoRA needs the *base* weights twice: to fingerprint the loaded checkpoint (a bank only
applies to the base it was trained on) and to train (a concept learned on base + someone's LoRA
would not be a concept of the base). This module reads the backup for the first and, for the
second, unloads the Lora extension's networks for the duration (its own code restores the
weights, and re-merges them lazily on the next generation that asks for them).

Works whether or not the extension is present (``networks`` is its module, put on sys.path by
A1111's script loader).
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from types import SimpleNamespace

from torch import nn


def _networks():
    module = sys.modules.get("networks")
    if module is None or not hasattr(module, "loaded_networks") or not hasattr(module, "network_apply_weights"):
        return None
    return module


def base_weight_view(layers: Mapping[str, nn.Linear]) -> dict[str, object]:
    """name → an object whose ``.weight`` is the layer's base weight, without merged LoRAs."""
    out = {}
    for name, layer in layers.items():
        backup = getattr(layer, "network_weights_backup", None)
        merged = bool(getattr(layer, "network_current_names", ()))
        out[name] = SimpleNamespace(weight=backup) if merged and backup is not None else layer
    return out


@contextlib.contextmanager
def lora_extension_unloaded(layers: Mapping[str, nn.Linear]) -> Iterator[None]:
    """Base weights in ``layers`` (and, lazily, everywhere else) while the block runs."""
    networks = _networks()
    if networks is None or not networks.loaded_networks:
        yield
        return
    saved = list(networks.loaded_networks)
    networks.loaded_networks.clear()
    try:
        for layer in layers.values():
            networks.network_apply_weights(layer)  # with no networks wanted: restore from backup
        yield
    finally:
        networks.loaded_networks[:] = saved  # merged again by the extension on its next forward
