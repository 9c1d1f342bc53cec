"""Forecast before training: one pass over the new images, no training step.

Why: an artist adding a concept to a bank wants to know beforehand how much it can disturb the
concepts already there. The new basis will lie in each layer's free space (``Bank.projector``),
so the most it can read of an earlier concept's inputs is fixed before training
(``interference.forecast_exposure``); one forward pass of the new images and prompts through the
model with the bank applied gives the new concept's own input statistics, from which the
expected exposure and the share of its energy that is still free follow.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..bank.fingerprint import base_fingerprint
from ..bank.format import Bank
from ..settings import CONSTRAINED_METHODS
from ..hosts.protocol import Host
from .activation_stats import ActivationStats, Eigenpairs
from .interference import ExposureForecast, concept_moments, forecast_exposure
from .lora import LoRAHooks
from .targets import select_layers
from .trainer import PROMPT_TEMPLATES, TrainSettings, encode_dataset, noisy_batch

FORECAST_TIMESTEPS = (200, 500, 800)


@torch.no_grad()
def new_concept_moments(host: Host, bank: Bank, pixels: Tensor, token: str, init_word: str, targets: str,
                        q: int = 8, chunk: int = 4) -> Eigenpairs:
    """Top-q eigenpairs of the target layers' inputs for the new images (and mirror images) at
    FORECAST_TIMESTEPS, prompts "a photo of <token>" with the token at its initial embedding and
    every bank concept applied: the inputs the new concept will start training on."""
    layers = host.linear_layers()
    chosen = select_layers(layers, targets)
    latents = encode_dataset(host, pixels)
    alphas = host.alphas_cumprod()
    gen = torch.Generator().manual_seed(0)
    embeddings = {token: host.init_embedding(init_word or "object").to(host.device)}
    hooked = {n: layers[n] for n in bank.layer_shapes() if n in layers}
    with LoRAHooks(hooked) as hooks, ActivationStats(chosen) as stats:
        if bank.concepts:
            hooks.set_composed(bank.composed_factors())
        for t_value in FORECAST_TIMESTEPS:
            for start in range(0, len(latents), chunk):
                idx = torch.arange(start, min(start + chunk, len(latents)))
                t = torch.full((len(idx),), t_value)
                noise = torch.randn((len(idx), *latents.shape[1:]), generator=gen).to(host.device)
                noisy = noisy_batch(latents, alphas, idx.to(host.device), noise, t.to(host.device))
                cond = host.encode_text([PROMPT_TEMPLATES[0].format(token)] * len(idx), embeddings)
                host.predict_noise(noisy, t.to(host.device), cond)
    return stats.top_eigenpairs(q)


def forecast_training(host: Host, bank: Bank, pixels: Tensor, token: str, init_word: str,
                      settings: TrainSettings) -> ExposureForecast:
    """How much of each earlier concept's activation energy (in its stored principal directions)
    a concept trained with ``settings`` can disturb; see ``interference.forecast_exposure``.
    Refuses, as training would, a bank for another base and a token the bank already has."""
    bank.check_base(host.architecture(), base_fingerprint(host.linear_layers()))
    bank.check_new_token(token)
    layers = select_layers(host.linear_layers(), settings.targets)
    constrained = settings.method in CONSTRAINED_METHODS
    projectors = {n: bank.projector(n, m.in_features) if constrained else None for n, m in layers.items()}
    token = token if token.startswith("<") else f"<{token}>"
    new = new_concept_moments(host, bank, pixels, token, init_word, settings.targets, q=max(settings.stats_q, 8))
    return forecast_exposure([c.id for c in bank.concepts], [concept_moments(c) for c in bank.concepts],
                             projectors, new, settings.rank)
