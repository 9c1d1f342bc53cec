"""A sample image of a freshly trained concept, drawn with ComfyUI's own sampler.

So the artist sees what the concept does right where it was trained, without wiring a KSampler.
Uses ``comfy.sample.sample`` (the function behind KSampler) on the composed MODEL and CLIP.
"""
from __future__ import annotations

import torch


def sample_preview(model, clip, vae, prompt: str, size: int, steps: int, seed: int,
                   cfg: float = 7.0, sampler: str = "euler", scheduler: str = "normal") -> torch.Tensor:
    """IMAGE (1, size, size, 3) in [0, 1] of ``prompt`` on the given (composed) model."""
    import comfy.sample

    def conditioning(text: str):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    latent = torch.zeros(1, 4, size // 8, size // 8)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, conditioning(prompt),
                                  conditioning(""), latent, seed=seed, disable_pbar=True)
    images = vae.decode(samples)
    return images.reshape(-1, *images.shape[-3:])[:1].clamp(0, 1).float().cpu()
