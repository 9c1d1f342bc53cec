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
def prompt_predictions(host: Host, bank: Bank, prompt: str, pixels: Tensor, applied: list[str] | None,
                       embeddings: dict[str, Tensor], seed: int = 1234) -> tuple[Tensor, Tensor]:
    """(ε̂, ε), each (N·len(EVAL_TIMESTEPS), 4, h, w), for ``prompt`` on every image × EVAL_TIMESTEPS
    with the ``applied`` concepts (None = all, [] = none) composed and ``embeddings`` registered.

    Noise and timesteps depend only on ``seed`` and the images, so two calls differ only by the
    prompt and the concepts applied.
    """
    layers = host.linear_layers()
    latents = encode_latents(host, pixels)
    gen = torch.Generator().manual_seed(seed)
    alphas = host.alphas_cumprod()
    preds, noises = [], []
    with LoRAHooks({n: layers[n] for n in bank.layer_shapes() if n in layers}) as hooks:
        if applied is None or applied:
            hooks.set_composed(bank.composed_factors(applied))
        for i in range(len(latents)):
            t = torch.tensor(EVAL_TIMESTEPS)
            idx = torch.full((len(t),), i)
            noise = torch.randn((len(t), *latents.shape[1:]), generator=gen).to(host.device)
            noisy = noisy_batch(latents, alphas, idx.to(host.device), noise, t.to(host.device))
            cond = host.encode_text([prompt] * len(t), embeddings)
            preds.append(host.predict_noise(noisy, t.to(host.device), cond).float())
            noises.append(noise.float())
    return torch.cat(preds), torch.cat(noises)


def concept_predictions(host: Host, bank: Bank, token: str, pixels: Tensor, applied: list[str] | None = None,
                        seed: int = 1234) -> tuple[Tensor, Tensor]:
    """(ε̂, ε) for "a photo of <token>" on the concept's images with the ``applied`` concepts
    (default all) composed; the concept's own token embedding is always used."""
    if not any(c.token == token for c in bank.concepts):
        raise InputError(f"Token {token} is not in the bank.")
    embeddings = {c.token: c.embedding for c in bank.concepts if c.token == token}
    return prompt_predictions(host, bank, f"a photo of {token}", pixels, applied, embeddings, seed)


def concept_loss(host: Host, bank: Bank, token: str, pixels: Tensor, applied: list[str] | None = None,
                 seed: int = 1234) -> float:
    """Mean ε-loss of ``token``'s images with the ``applied`` concepts (default all) composed."""
    pred, noise = concept_predictions(host, bank, token, pixels, applied, seed)
    return float(((pred - noise) ** 2).mean())


def drift_figures(host: Host, bank: Bank, token: str, pixels: Tensor, own: list[str]) -> dict[str, float]:
    """How far the concepts outside ``own`` move ``token``'s noise prediction:

    ``absolute`` = RMS(ε̂(all) − ε̂(own)), per element of the prediction (ε has unit variance, so
    0.01 is 1 % of the noise's scale); ``own_effect`` = RMS(ε̂(own) − ε̂(none)); ``relative`` =
    their ratio ‖ε̂(all) − ε̂(own)‖ / ‖ε̂(own) − ε̂(none)‖ (0 = no bleeding). The ratio alone mostly
    compares effect sizes when every concept moves every prompt by a similar amount (random
    weights), so reports print the absolute figure beside it."""
    p_all, _ = concept_predictions(host, bank, token, pixels, None)
    p_own, _ = concept_predictions(host, bank, token, pixels, own)
    p_none, _ = concept_predictions(host, bank, token, pixels, [])
    absolute, effect = _rms(p_all, p_own), _rms(p_own, p_none)
    return {"absolute": absolute, "own_effect": effect, "relative": absolute / max(effect, 1e-12)}


def residual_size(bank: Bank, ident: str) -> dict[str, float]:
    """The size of one concept's residual ΔW = A·Bᵀ over its layers: ``norm`` = √Σ‖ΔW‖_F²,
    ``max_entry`` = the largest |entry| of any layer's ΔW (what a fp16 host must represent),
    ``max_a`` = the largest ‖A‖_F of a layer (after the freeze's orthonormalisation of B this
    is the residual's own scale)."""
    c = bank.get(ident)
    norm_sq, max_entry, max_a = 0.0, 0.0, 0.0
    for name, a in c.A.items():
        delta = a.double() @ c.B[name].double().T  # (n, m)
        norm_sq += float(delta.pow(2).sum())
        max_entry = max(max_entry, float(delta.abs().max()))
        max_a = max(max_a, float(a.double().norm()))
    return {"norm": norm_sq ** 0.5, "max_entry": max_entry, "max_a": max_a}


def _distance(p: Tensor, q: Tensor) -> float:
    return float((p - q).norm())


def _rms(p: Tensor, q: Tensor) -> float:
    return float((p - q).pow(2).mean().sqrt())


def crosstalk(host: Host, bank: Bank, pixels: dict[str, Tensor], seed: int = 1234) -> dict:
    """How much each concept moves predictions it should leave alone, relative to its own effect.

    For concept i (token t_i, images X_i, own effect e_i = ‖ε̂_{i}(t_i) − ε̂_∅(t_i)‖):
    ``matrix[i][j]`` = ‖ε̂_{j}(t_i) − ε̂_∅(t_i)‖ / e_i, concept j alone on i's prompt and images;
    ``neutral[i]`` = ‖ε̂_{i}(w_i) − ε̂_∅(w_i)‖ / e_i on the prompt "a photo of a <init word>",
    which lacks the token; ``composition[i]`` = ‖ε̂_all(t_i) − ε̂_{i}(t_i)‖ / e_i, all the others
    together. 0 everywhere = no bleeding. ``pixels`` maps every concept's token to its images.
    ``matrix_abs`` and ``composition_abs``: the same moves as RMS per element of the prediction
    (absolute; ε has RMS 1), beside the ratios, which on random weights mostly compare effect sizes.
    """
    concepts = bank.concepts
    n = len(concepts)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    neutral, composition, own_effect = [], [], []
    matrix_abs: list[list[float | None]] = [[None] * n for _ in range(n)]
    composition_abs = []
    for i, c in enumerate(concepts):
        px = pixels[c.token]
        emb = {c.token: c.embedding}
        prompt = f"a photo of {c.token}"
        none = prompt_predictions(host, bank, prompt, px, [], emb, seed)[0]
        own = prompt_predictions(host, bank, prompt, px, [c.id], emb, seed)[0]
        every = prompt_predictions(host, bank, prompt, px, None, emb, seed)[0]
        effect = max(_distance(own, none), 1e-12)
        own_effect.append(effect)
        composition.append(_distance(every, own) / effect)
        composition_abs.append(_rms(every, own))
        for j, other in enumerate(concepts):
            if j != i:
                moved = prompt_predictions(host, bank, prompt, px, [other.id], emb, seed)[0]
                matrix[i][j] = _distance(moved, none) / effect
                matrix_abs[i][j] = _rms(moved, none)
        plain = f"a photo of a {c.init_word or 'thing'}"
        plain_none = prompt_predictions(host, bank, plain, px, [], {}, seed)[0]
        plain_own = prompt_predictions(host, bank, plain, px, [c.id], {}, seed)[0]
        neutral.append(_distance(plain_own, plain_none) / effect)
    return {"concepts": [c.id for c in concepts], "matrix": matrix, "neutral": neutral,
            "composition": composition, "own_effect": own_effect, "matrix_abs": matrix_abs,
            "composition_abs": composition_abs}
