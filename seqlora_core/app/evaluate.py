"""Per-concept denoising loss with fixed noise and timesteps: the forgetting measure.

The same images, noise and timesteps are used every time a concept is evaluated, so the loss of
concept i right after its training and after all later concepts differ only by what the later
concepts changed in the model.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..bank.format import Bank
from ..errors import InputError
from ..hosts.protocol import Host
from ..method.lora import LoRAHooks
from ..method.trainer import encode_latents, noisy_batch

EVAL_TIMESTEPS = (100, 300, 500, 700, 900)


@torch.no_grad()
def concept_predictions(host: Host, bank: Bank, token: str, pixels: Tensor, applied: list[str] | None = None,
                        seed: int = 1234) -> tuple[Tensor, Tensor]:
    """(ε̂, ε) for every image × EVAL_TIMESTEPS, with the ``applied`` concepts (default all) composed.

    Noise and timesteps depend only on ``seed`` and the images, so two calls differ only by the
    concepts applied. The concept's own token embedding is always used.
    """
    if not any(c.token == token for c in bank.concepts):
        raise InputError(f"Token {token} is not in the bank.")
    layers = host.linear_layers()
    latents = encode_latents(host, pixels)
    gen = torch.Generator().manual_seed(seed)
    alphas = host.alphas_cumprod()
    preds, noises = [], []
    embeddings = {c.token: c.embedding for c in bank.concepts if c.token == token}
    with LoRAHooks({n: layers[n] for n in bank.layer_shapes() if n in layers}) as hooks:
        if applied is None or applied:
            hooks.set_composed(bank.composed_factors(applied))
        for i in range(len(latents)):
            t = torch.tensor(EVAL_TIMESTEPS)
            idx = torch.full((len(t),), i)
            noise = torch.randn((len(t), *latents.shape[1:]), generator=gen).to(host.device)
            noisy = noisy_batch(latents, alphas, idx.to(host.device), noise, t.to(host.device))
            cond = host.encode_text([f"a photo of {token}"] * len(t), embeddings)
            preds.append(host.predict_noise(noisy, t.to(host.device), cond).float())
            noises.append(noise.float())
    return torch.cat(preds), torch.cat(noises)


def concept_loss(host: Host, bank: Bank, token: str, pixels: Tensor, applied: list[str] | None = None,
                 seed: int = 1234) -> float:
    """Mean ε-loss of ``token``'s images with the ``applied`` concepts (default all) composed."""
    pred, noise = concept_predictions(host, bank, token, pixels, applied, seed)
    return float(((pred - noise) ** 2).mean())


def output_drift(host: Host, bank: Bank, token: str, pixels: Tensor, own: list[str]) -> float:
    """How far the concepts outside ``own`` move ``token``'s noise prediction, relative to how far
    ``own`` moved it from the base: ‖ε̂(all) − ε̂(own)‖ / ‖ε̂(own) − ε̂(none)‖. 0 = no bleeding."""
    p_all, _ = concept_predictions(host, bank, token, pixels, None)
    p_own, _ = concept_predictions(host, bank, token, pixels, own)
    p_none, _ = concept_predictions(host, bank, token, pixels, [])
    return float((p_all - p_own).norm() / (p_own - p_none).norm().clamp_min(1e-12))
