"""``<seqlora:BANK:CONCEPT[:strength]>`` in A1111 prompts, through its extra-networks mechanism.

A1111 calls ``activate`` before every batch (with an empty list when the prompt names no SeqLoRA
concept) and ``deactivate`` once after the job. ``activate`` replaces whatever was composed before
with exactly the concepts named: forward hooks on the loaded model's layers (weights are never
modified) and each concept's token registered in A1111's embedding database so ``<chelsea>`` in
the prompt uses it. ``deactivate`` takes both away again — the token must not outlive the prompt
that asked for it (a plain ``<chelsea>`` later would silently use it, and A1111's Textual
Inversion page lists every registered embedding).

A bank is only applied to the base it was trained on: a bank whose fingerprint differs from the
loaded checkpoint's, or whose layers the model lacks, is refused with one line under the image
(A1111's "comments") and the same sentence as the ``SeqLoRA refused`` infotext entry (the API
returns no comments); the image is made without it.
A1111 swallows exceptions raised here (it prints them to the console and goes on), so every
problem is reported that way instead of raised.

Banks named in prompts live in ``models/seqlora``; a name that leaves it is refused. The tab's previews pass their bank object
directly (``p.seqlora_picks``), so they run through exactly this code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from seqlora_core.bank.fingerprint import base_fingerprint, same_base
from seqlora_core.bank.format import Bank, check_strength, load_bank
from seqlora_core.bank.names import bank_file_in
from seqlora_core.errors import InputError, SeqLoRAError
from seqlora_core.hosts.naming import compvis_layers
from seqlora_core.method.lora import LoRAHooks

from .builtin_lora import base_weight_view


def bank_dir() -> str:
    from modules import paths

    folder = os.path.join(paths.models_path, "seqlora")
    os.makedirs(folder, exist_ok=True)
    return folder


@dataclass(frozen=True)
class Pick:
    """One concept to compose: from ``bank`` (shown as ``label``), at ``strength``."""
    label: str
    bank: Bank
    bank_path: str
    concept: str
    strength: float


def parse_params(params_list) -> list[tuple[str, str, float]]:
    """[(bank file, concept id, strength)] from A1111's ExtraNetworkParams."""
    out = []
    for params in params_list:
        items = list(params.positional)
        if len(items) < 2:
            raise InputError("Write <seqlora:BANK:CONCEPT> or <seqlora:BANK:CONCEPT:strength>.")
        bank, concept = items[0], items[1]
        try:
            strength = float(params.named.get("s", items[2] if len(items) > 2 else 1.0))
        except ValueError:
            raise InputError(f"<seqlora:{':'.join(params.items)}>: the strength must be a number.") from None
        check_strength(strength, f"<seqlora:{':'.join(params.items)}>: the strength")
        out.append((bank if bank.endswith(".safetensors") else bank + ".safetensors", concept, strength))
    return out


def tag_bank_path(folder: str, bank_file: str) -> str:
    """The file a tag's BANK names inside ``folder`` (models/seqlora). A prompt is text from anyone
    (a shared image's infotext, an API call), so the name must stay in the folder: ``../x``,
    absolute, drive and UNC paths are refused in one sentence (``seqlora_core.bank.names``, the rule
    ComfyUI's bank names follow)."""
    return str(bank_file_in(folder, bank_file))


def picks_from_prompt(params_list, folder: str) -> list[Pick]:
    """The concepts a prompt's tags name, each bank loaded from ``folder``."""
    picks, banks = [], {}
    for bank_file, concept, strength in parse_params(params_list):
        path = tag_bank_path(folder, bank_file)
        if path not in banks:
            if not os.path.exists(path):
                raise InputError(f"There is no bank {bank_file} in {folder}.")
            banks[path] = load_bank(path)
        bank = banks[path]
        bank.get(concept)  # one clear sentence when the bank has no such concept
        picks.append(Pick(bank_file[:-len(".safetensors")], bank, path, concept, strength))
    return picks


def refusal(bank: Bank, label: str, fingerprint: str, layers) -> str | None:
    """Why ``bank`` cannot apply to the loaded model, or None when it can."""
    arch, made_for = bank.base.get("architecture"), bank.base.get("fingerprint")
    if arch != "sd15":
        return f"SeqLoRA: {label} not applied: it was made for a {arch} base, not SD-1.5."
    if not same_base(bank.base, fingerprint):
        return (f"SeqLoRA: {label} not applied: it was made for another base model (fingerprint {made_for}, "
                f"loaded checkpoint {fingerprint}).")
    missing = [n for n in bank.layer_shapes() if n not in layers]
    if missing:
        return f"SeqLoRA: {label} not applied: the loaded model has no layer {missing[0]} ({len(missing)} missing)."
    return None


class Composition:
    """Concepts applied to A1111's model: LoRA hooks plus registered tokens; ``remove`` undoes both."""

    def __init__(self, sd_model, embedding_db):
        self.sd_model = sd_model
        self.db = embedding_db
        self.hooks: LoRAHooks | None = None
        self.regional = None  # a1111.regional.RegionalComposition, for the tab's regional previews
        self.replaced: dict[str, object] = {}  # token → the database's entry before us (or None)

    def apply(self, picks: list[Pick], layers) -> None:
        """Every pick's residual on every prompt, and its token."""
        self.register_tokens(picks)
        composed = {}
        for pick in picks:
            for name, (a, b) in pick.bank.composed_factors([pick.concept], {pick.concept: pick.strength}).items():
                if name in composed:
                    a0, b0 = composed[name]
                    a, b = torch.cat([a0, a], 1), torch.cat([b0, b], 1)
                composed[name] = (a, b)
        self.hooks = LoRAHooks({n: layers[n] for n in composed})
        self.hooks.set_composed(composed)

    def apply_regional(self, picks: list[Pick], layers, request, prompt: str, negative: str, on_refusal) -> None:
        """The picks composed regionally (``a1111.regional``: the tab's regions, confined residuals,
        automatic regions) for ``prompt`` and ``negative``, and their tokens."""
        from .regional import RegionalComposition

        self.register_tokens(picks)
        self.regional = RegionalComposition(self.sd_model, request, on_refusal)
        self.regional.apply(picks, layers, prompt, negative)

    def register_tokens(self, picks: list[Pick]) -> None:
        """Each pick's token in A1111's embedding database, so that the prompt's ``<chelsea>`` uses it."""
        from modules import shared
        from modules.textual_inversion.textual_inversion import Embedding

        tokens = {}
        for pick in picks:
            concept = pick.bank.get(pick.concept)
            tokens[concept.token] = (concept.embedding, pick.bank_path)
        for token, (vec, path) in tokens.items():
            emb = Embedding(vec.to(shared.device, torch.float32), token)
            emb.vectors, emb.shape = vec.shape[0], vec.shape[-1]
            emb.filename = path  # A1111's Textual Inversion page needs a file name for every entry
            self.replaced.setdefault(token, self.db.word_embeddings.get(token))
            self.db.register_embedding(emb, self.sd_model)

    def remove(self) -> None:
        if self.regional is not None:
            self.regional.remove()
            self.regional = None
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
        for token, previous in self.replaced.items():
            if previous is not None:
                self.db.register_embedding(previous, self.sd_model)
            else:
                self.db.register_embedding_by_name(None, self.sd_model, token)
        self.replaced = {}


def refuse_regions(p, why: str) -> None:
    """Automatic regions refused mid-sampling: the job stops, and the sentence is its answer."""
    from modules import shared

    p.extra_generation_params["SeqLoRA refused"] = why
    p.comment(f"SeqLoRA: {why}")
    shared.state.interrupt()


def make_extra_network():
    from modules import extra_networks, sd_hijack, shared

    class ExtraNetworkSeqLoRA(extra_networks.ExtraNetwork):
        def __init__(self):
            super().__init__("seqlora")
            self.composition: Composition | None = None

        def _clear(self):
            if self.composition is not None:
                self.composition.remove()
                self.composition = None

        def activate(self, p, params_list):
            self._clear()
            picks, problems = [], []
            try:
                picks += picks_from_prompt(params_list, bank_dir()) if params_list else []
            except SeqLoRAError as exc:
                problems.append(f"SeqLoRA: {exc}")
            picks += getattr(p, "seqlora_picks", [])
            if picks:
                sd_model = shared.sd_model
                layers = compvis_layers(sd_model.model.diffusion_model, sd_model.cond_stage_model.wrapped.transformer)
                fingerprint = base_fingerprint(base_weight_view(layers))
                refused = {}
                for pick in picks:
                    if pick.bank_path not in refused:
                        refused[pick.bank_path] = refusal(pick.bank, pick.label, fingerprint, layers)
                problems += [r for r in dict.fromkeys(refused.values()) if r]
                applied = [pick for pick in picks if not refused[pick.bank_path]]
                if applied:
                    self.composition = Composition(sd_model, sd_hijack.model_hijack.embedding_db)
                    request = getattr(p, "seqlora_regional", None)
                    try:
                        if request is None:
                            self.composition.apply(applied, layers)
                        else:
                            self.composition.apply_regional(applied, layers, request, p.prompts[0],
                                                            p.negative_prompts[0], lambda why: refuse_regions(p, why))
                    except SeqLoRAError as exc:
                        self._clear()
                        problems.append(f"SeqLoRA: {exc}")
                    else:
                        p.extra_generation_params["SeqLoRA"] = ", ".join(
                            f"{pk.label}:{pk.concept}:{pk.strength:g}" for pk in applied)
            if problems:  # the UI shows comments; API users and saved images only have the infotext
                p.extra_generation_params["SeqLoRA refused"] = " ".join(x.removeprefix("SeqLoRA: ") for x in problems)
            for problem in problems:
                print(problem)
                p.comment(problem)

        def deactivate(self, p):
            self._clear()

    return ExtraNetworkSeqLoRA()
