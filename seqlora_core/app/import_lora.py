"""A LoRA file a user owns (kohya, diffusers, peft) brought into a bank as an orthogonal concept.

For every layer the bank adapts and the LoRA changes, ΔW = strength · up · down · alpha / r is
refitted as A Bᵀ with B orthonormal inside the free space of the bank's earlier concepts and of
the bank's rank (``linalg.lowrank_fit``: the maths and what "lost" means). The fit is weighted
by the concept's input statistics where they can be had:

* layers that read the text (``hosts.naming.TEXT_INPUT_LAYERS``: the text encoder's, the UNet's
  cross-attention keys and values): the trigger prompts' features, from the prompts alone;
* every other layer: only when images are given (``images``: denoising passes on them);
* else plain SVD (Σ = I), and the report says so per layer.

The statistics are gathered on the base alone (the LoRA was trained on it, not on the bank's
other concepts). The concept's token starts from the trigger words (the mean input embedding of
their pieces: a bank token is one vector), or comes from an embedding file, or — with images —
is learned by a short textual inversion with the imported residual applied.

Layers of the LoRA that the bank does not adapt are dropped and named; a LoRA for another
architecture, a full bank, a duplicate token and a file that is not a LoRA are refused in one
sentence, before anything is written. Only ``hosts.naming`` knows SD-1.5's layer names.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..bank.fingerprint import base_fingerprint
from ..bank.format import Bank, Concept, check_strength
from ..bank.lora_file import LayerUpdate, LoRAFile
from ..errors import CapacityError, InputError
from ..hosts.naming import TEXT_INPUT_LAYERS, lora_paths
from ..hosts.protocol import Host
from ..linalg.lowrank_fit import LayerFit, fit_layer
from ..method.activation_stats import DEFAULT_Q, ActivationStats
from ..method.lora import LoRAHooks
from ..method.residual_check import check_residual_range
from ..method.targets import select_layers
from ..method.trainer import PROMPT_TEMPLATES, denoising_loss, encode_dataset, noisy_batch
from ..settings import IMPORTED

TOKEN_STEPS = 100  # textual-inversion steps when images are given
TOKEN_LR = 5e-3
STATS_PASSES = 8  # denoising passes over the images for the statistics


@dataclass
class ImportResult:
    bank: Bank
    concept: Concept
    source: LoRAFile
    fits: dict[str, LayerFit]  # canonical layer → fit
    dropped: list[str] = field(default_factory=list)  # the LoRA's layers the bank does not adapt
    token_from: str = ""
    seconds: float = 0.0

    @property
    def energy(self) -> float:
        return sum(f.energy for f in self.fits.values())

    def lost_share(self, part: str = "all") -> float:
        return lost_share(self.fits, part)


def lost_share(fits: dict[str, LayerFit], part: str = "all") -> float:
    """Share of the LoRA's ΔW energy (summed over the imported layers) lost to the projection
    (``projection``), to the rank cut (``rank``) or to both (``all``)."""
    energy = sum(f.energy for f in fits.values())
    if energy <= 0:
        return 0.0
    pick = {"projection": lambda f: f.lost_projection, "rank": lambda f: f.lost_rank,
            "all": lambda f: f.lost_projection + f.lost_rank}[part]
    return sum(pick(f) for f in fits.values()) / energy


def _host_layer_for(lora: LoRAFile, host_layers: dict) -> tuple[dict[str, list[LayerUpdate]], list[str]]:
    """The LoRA's layers by canonical name, and the key stems that name no layer of this model."""
    lookup = {alias: name for name in host_layers for alias in lora_paths(name)}
    found: dict[str, list[LayerUpdate]] = {}
    foreign = []
    for update in lora.layers:
        name = lookup.get((update.side, update.path))
        if name is None:
            foreign.append(update.key)
        else:
            found.setdefault(name, []).append(update)
    return found, foreign


def _check_architecture(lora: LoRAFile, found: dict[str, list[LayerUpdate]], foreign: list[str],
                        host_layers: dict, architecture: str) -> None:
    sides = {u.side for u in lora.layers}
    if not found or sides & {"te1", "te2", "transformer"}:
        example = (foreign or [u.key for u in lora.layers])[0]
        raise InputError(f"{lora.name} is a LoRA for another architecture than this {architecture} base "
                         f"(its layers are named like {example}).")
    for name, updates in found.items():
        layer = host_layers[name]
        for u in updates:
            if u.up.shape[0] != layer.out_features or u.down.shape[1] != layer.in_features:
                raise InputError(f"{lora.name} is a LoRA for another architecture than this {architecture} base: "
                                 f"its layer {u.key} is {u.up.shape[0]}×{u.down.shape[1]}, the model's "
                                 f"{layer.out_features}×{layer.in_features}.")


def _stacked(updates: list[LayerUpdate], strength: float) -> tuple[Tensor, Tensor]:
    """One (up, down) pair for all of a layer's updates (a file may list a layer twice),
    scale and strength folded into up."""
    ups = [u.up * (u.scale * strength) for u in updates]
    return torch.cat(ups, 1), torch.cat([u.down for u in updates], 0)


def gather_statistics(host: Host, layers: dict, prompts: list[str], pixels: Tensor | None,
                      q: int = DEFAULT_Q, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Top-``q`` eigenpairs of each layer's input second moment on the base: with ``pixels``,
    over denoising passes on them; else for the text-reading layers only, from the prompts (one
    text encoding, and one UNet pass at the smallest latent for the cross-attention inputs)."""
    chosen = layers if pixels is not None else {n: m for n, m in layers.items() if TEXT_INPUT_LAYERS.search(n)}
    if not chosen:
        return {}
    stats = ActivationStats(chosen)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad(), stats:
        if pixels is None:
            cond = host.encode_text(prompts, {})
            latents = torch.randn((len(prompts), 4, 8, 8), generator=gen).to(host.device, getattr(host, "dtype", torch.float32))
            t = torch.full((len(prompts),), len(host.alphas_cumprod()) // 2, dtype=torch.long, device=host.device)
            host.predict_noise(latents, t, cond)
        else:
            latents = encode_dataset(host, pixels)
            alphas = host.alphas_cumprod()
            for i in range(STATS_PASSES):
                idx = torch.randint(len(latents), (1,), generator=gen)
                t = torch.randint(len(alphas), (1,), generator=gen).to(host.device)
                noise = torch.randn((1, *latents.shape[1:]), generator=gen).to(host.device)
                host.predict_noise(noisy_batch(latents, alphas, idx.to(host.device), noise, t),
                                   t, host.encode_text([prompts[i % len(prompts)]], {}))
    return stats.top_eigenpairs(q)


def learn_token(host: Host, pixels: Tensor, token: str, start: Tensor, factors: dict[str, tuple[Tensor, Tensor]],
                steps: int = TOKEN_STEPS, seed: int = 0,
                progress: Callable[[int, int, float], None] | None = None) -> Tensor:
    """Textual inversion of ``token``'s vector (1, d) on ``pixels`` with the imported residual
    (``factors``: layer → (A, B)) applied; the factors stay fixed."""
    gen = torch.Generator().manual_seed(seed)
    latents = encode_dataset(host, pixels)
    alphas = host.alphas_cumprod()
    vector = start.detach().clone().float().to(host.device).requires_grad_(True)
    opt = torch.optim.Adam([vector], lr=TOKEN_LR)
    layers = host.linear_layers()
    frozen = getattr(host, "frozen_weights", contextlib.nullcontext)
    with frozen(), LoRAHooks({n: layers[n] for n in factors}) as hooks:
        hooks.bind({n: a.to(host.device) for n, (a, _) in factors.items()},
                   {n: b.to(host.device) for n, (_, b) in factors.items()})
        for step in range(steps):
            idx = torch.randint(len(latents), (1,), generator=gen)
            t = torch.randint(len(alphas), (1,), generator=gen).to(host.device)
            noise = torch.randn((1, *latents.shape[1:]), generator=gen).to(host.device)
            prompt = PROMPT_TEMPLATES[int(torch.randint(len(PROMPT_TEMPLATES), (1,), generator=gen))].format(token)
            loss = denoising_loss(host, noisy_batch(latents, alphas, idx.to(host.device), noise, t), noise, t,
                                  [prompt], {token: vector})
            opt.zero_grad()
            loss.backward()
            opt.step()
            if progress is not None:
                progress(step + 1, steps, float(loss))
    return vector.detach().float().cpu()


def import_lora(host: Host, bank: Bank, lora: LoRAFile, token: str, trigger: str | None = None,
                strength: float = 1.0, rank: int | None = None, targets: str | None = None,
                pixels: Tensor | None = None, embedding: Tensor | None = None, weighting: str = "auto",
                author: str | None = None, seed: int = 0, allow_other_base: bool = False,
                progress: Callable[[int, int, float], None] | None = None) -> ImportResult:
    """``bank`` with ``lora`` appended as concept ``token`` (a new Bank; ``bank`` is unchanged).

    ``rank``: the concept's rank (default the bank's); ``targets``: the layers a new bank adapts
    (a preset or patterns; default: the bank's layers, or ``default`` for an empty bank);
    ``weighting``: ``auto`` (input statistics where they can be had) or ``plain`` (SVD)."""
    start_time = time.time()
    check_strength(strength, "The import's strength")
    if weighting not in ("auto", "plain"):
        raise InputError(f"Weighting must be auto or plain, not {weighting!r}.")
    bank.check_base(host.architecture(), base_fingerprint(host.linear_layers()), allow_other_base)
    ident = bank.check_new_token(token)
    token = f"<{ident}>"
    rank = int(rank or bank.rank)
    if rank < 1:
        raise InputError("The rank must be at least 1.")
    host_layers = host.linear_layers()
    found, foreign = _host_layer_for(lora, host_layers)
    _check_architecture(lora, found, foreign, host_layers, host.architecture())
    if targets:
        adapted = list(select_layers(host_layers, targets))
    elif bank.concepts:
        adapted = list(bank.layer_shapes())
    else:
        adapted = list(select_layers(host_layers, "default"))
    names = [n for n in adapted if n in found]
    dropped = sorted([n for n in found if n not in names]) + sorted(foreign)
    if not names:
        raise InputError(f"None of {lora.name}'s {len(lora.layers)} layers is one the bank adapts "
                         f"(it changes e.g. {next(iter(found))}); pass targets that include its layers.")
    bank.check_room(rank)
    projectors = {n: bank.projector(n, host_layers[n].in_features) for n in names}
    full = [n for n in names if projectors[n].free_width < rank]
    if full:
        raise CapacityError(f"The bank is full on {len(full)} of the LoRA's layers (e.g. {full[0]}: "
                            f"{projectors[full[0]].free_width} free input dimensions, rank {rank} needs more).")

    words = trigger or lora.suggested_trigger()
    prompts = [t.format(words or ident) for t in PROMPT_TEMPLATES]
    stats = {} if weighting == "plain" else gather_statistics(host, {n: host_layers[n] for n in names}, prompts, pixels)
    gen = torch.Generator().manual_seed(seed)
    fits = {}
    for n in names:
        up, down = _stacked(found[n], strength)
        fits[n] = fit_layer(up, down, 1.0, projectors[n], rank, stats.get(n), gen)
    a = {n: f.a for n, f in fits.items()}
    b = {n: f.b for n, f in fits.items()}
    kept_stats = stats if stats and all(n in stats for n in names) else None
    check_residual_range(ident, a, b, kept_stats, getattr(host, "dtype", torch.float32))

    if embedding is not None:
        vector, token_from = embedding.detach().float().reshape(-1, embedding.shape[-1])[:1].cpu(), "the embedding file"
    else:
        vector = host.init_embedding(words or ident).float().cpu()
        token_from = (f"the trigger words '{words}'" + ("" if trigger else " (the file's most frequent caption tag)")
                      if words else f"the word '{ident}' (no trigger given; write the LoRA's trigger words in prompts)")
        if pixels is not None:
            vector = learn_token(host, pixels, token, vector, {n: (a[n], b[n]) for n in names}, seed=seed,
                                 progress=progress)
            token_from = f"{TOKEN_STEPS} textual-inversion steps on {len(pixels)} image(s), from {token_from}"
    settings = {"source": lora.name, "source_sha256": lora.sha256, "layout": lora.layout, "strength": strength,
                "trigger": words or "", "weighting": weighting, "images": 0 if pixels is None else len(pixels),
                "rank": rank, "lost": round(lost_share(fits), 6)}
    concept = Concept(id=ident, token=token, init_word=words or "", rank=rank, method=IMPORTED, A=a, B=b,
                      embedding=vector, settings=settings, stats=kept_stats, author=author,
                      lease=bank.confined_to)
    new_bank = bank.with_concept(concept, author, note=f"imported from {lora.name}", source=lora.name,
                                 source_sha256=lora.sha256)
    return ImportResult(new_bank, concept, lora, fits, dropped, token_from, time.time() - start_time)


def report_lines(result: ImportResult, per_layer: bool = True) -> list[str]:
    """The import's cost in words, for the CLI, the node and the tab alike."""
    c = result.concept
    lines = [f"imported {result.source.name} ({result.source.layout}, sha256 {result.source.sha256[:12]}) as "
             f"{c.token}, rank {c.rank}, {len(result.fits)} layer(s), in {result.seconds:.1f} s; token from "
             f"{result.token_from}",
             f"lost of the LoRA's ΔW energy: {result.lost_share('all'):.2%} in all "
             f"({result.lost_share('projection'):.2%} to the earlier concepts' directions, "
             f"{result.lost_share('rank'):.2%} to the rank cut)"]
    weighted = sum(f.weighted for f in result.fits.values())
    lines.append(f"weighted by input statistics on {weighted} of {len(result.fits)} layer(s)"
                 + ("" if weighted == len(result.fits) else "; the rest by plain SVD (give images to weight them)"))
    if per_layer:
        for name, f in result.fits.items():
            lines.append(f"  {name}: lost {f.lost:.2%} (projection {f.lost_projection / f.energy if f.energy else 0:.2%}, "
                         f"rank {f.lost_rank / f.energy if f.energy else 0:.2%}){'' if f.weighted else ', plain'}")
    if result.dropped:
        shown = ", ".join(result.dropped[:8]) + (f" and {len(result.dropped) - 8} more" if len(result.dropped) > 8 else "")
        lines.append(f"dropped {len(result.dropped)} layer(s) of the LoRA that the bank does not adapt: {shown}")
    if result.source.unread:
        lines.append(f"not read ({len(result.source.unread)} layer(s) in formats other than plain LoRA, "
                     f"e.g. {result.source.unread[0]})")
    return lines
