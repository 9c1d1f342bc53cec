"""Per-concept denoising loss with fixed noise and timesteps: the forgetting measure.

The same images, noise and timesteps are used every time a concept is evaluated, so the loss of
concept i right after its training and after all later concepts differ only by what the later
concepts changed in the model.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .bank import Bank
from .errors import InputError
from .host import Host
from .lora import LoRAHooks
from .trainer import denoising_loss, noisy_batch

EVAL_TIMESTEPS = (100, 300, 500, 700, 900)


@torch.no_grad()
def concept_loss(host: Host, bank: Bank, token: str, pixels: Tensor, applied: list[str] | None = None,
                 seed: int = 1234) -> float:
    """Mean ε-loss of ``token``'s images with the ``applied`` concepts (default all) composed."""
    if not any(c.token == token for c in bank.concepts):
        raise InputError(f"Token {token} is not in the bank.")
    layers = host.linear_layers()
    latents = torch.cat([host.encode_images(pixels[i:i + 4]) for i in range(0, len(pixels), 4)]).float()
    gen = torch.Generator().manual_seed(seed)
    alphas = host.alphas_cumprod()
    total, count = 0.0, 0
    with LoRAHooks({n: layers[n] for n in bank.layer_shapes() if n in layers}) as hooks:
        hooks.set_composed(bank.composed_factors(applied))
        embeddings = {c.token: c.embedding for c in bank.concepts if c.token == token}
        for i in range(len(latents)):
            t = torch.tensor(EVAL_TIMESTEPS)
            idx = torch.full((len(t),), i)
            noise = torch.randn((len(t), *latents.shape[1:]), generator=gen).to(host.device)
            noisy = noisy_batch(latents, alphas, idx.to(host.device), noise, t.to(host.device))
            loss = denoising_loss(host, noisy, noise, t, [f"a photo of {token}"] * len(t), embeddings)
            total += float(loss) * len(t)
            count += len(t)
    return total / count
