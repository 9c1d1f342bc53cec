"""``<seqlora:BANK:CONCEPT[:strength]>`` in A1111 prompts, through its extra-networks mechanism.

``activate`` is called before every batch (with an empty list when the prompt names no SeqLoRA
concept); it replaces the composed residuals with exactly the concepts named, as forward hooks on
the loaded model's layers (the weights are never modified), and registers each concept's token
embedding with A1111's embedding database so ``<chelsea>`` in the prompt uses it. Banks live in
``models/seqlora``.
"""
from __future__ import annotations

import os

import torch

from seqlora_core.bank.format import load_bank
from seqlora_core.errors import InputError
from seqlora_core.method.lora import LoRAHooks
from seqlora_core.hosts.naming import compvis_layers


def bank_dir() -> str:
    from modules import paths

    folder = os.path.join(paths.models_path, "seqlora")
    os.makedirs(folder, exist_ok=True)
    return folder


def parse_params(params_list) -> list[tuple[str, str, float]]:
    """[(bank file, concept id, strength)] from A1111's ExtraNetworkParams."""
    out = []
    for params in params_list:
        items = list(params.positional)
        if len(items) < 2:
            raise InputError("Write <seqlora:BANK:CONCEPT> or <seqlora:BANK:CONCEPT:strength>.")
        bank, concept = items[0], items[1]
        strength = float(params.named.get("s", items[2] if len(items) > 2 else 1.0))
        out.append((bank if bank.endswith(".safetensors") else bank + ".safetensors", concept, strength))
    return out


def make_extra_network():
    from modules import extra_networks, sd_hijack, shared
    from modules.textual_inversion.textual_inversion import Embedding

    class ExtraNetworkSeqLoRA(extra_networks.ExtraNetwork):
        def __init__(self):
            super().__init__("seqlora")
            self.hooks: LoRAHooks | None = None

        def _clear(self):
            if self.hooks is not None:
                self.hooks.remove()
                self.hooks = None

        def activate(self, p, params_list):
            self._clear()
            if not params_list:
                return
            sd_model = shared.sd_model
            layers = compvis_layers(sd_model.model.diffusion_model, sd_model.cond_stage_model.wrapped.transformer)
            composed, tokens = {}, {}
            for bank_file, concept, strength in parse_params(params_list):
                bank = load_bank(os.path.join(bank_dir(), bank_file))
                for name, (a, b) in bank.composed_factors([concept], {concept: strength}).items():
                    if name in composed:
                        a0, b0 = composed[name]
                        a, b = torch.cat([a0, a], 1), torch.cat([b0, b], 1)
                    composed[name] = (a, b)
                c = bank.get(concept)
                tokens[c.token] = c.embedding
            self.hooks = LoRAHooks({n: layers[n] for n in composed if n in layers})
            self.hooks.set_composed(composed)
            db = sd_hijack.model_hijack.embedding_db
            for token, vec in tokens.items():
                emb = Embedding(vec.to(shared.device), token)
                emb.vectors, emb.shape = vec.shape[0], vec.shape[-1]
                db.register_embedding(emb, sd_model)
            p.extra_generation_params["SeqLoRA"] = ", ".join(f"{b}:{c}:{s:g}" for b, c, s in parse_params(params_list))

        def deactivate(self, p):
            self._clear()

    return ExtraNetworkSeqLoRA()
