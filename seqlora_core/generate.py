"""Text-to-image sampling with any subset of a bank composed (standalone diffusers path)."""
from __future__ import annotations

import numpy as np
import torch

from .bank import Bank
from .diffusers_host import DiffusersHost
from .lora import LoRAHooks


@torch.no_grad()
def generate(host: DiffusersHost, bank: Bank, prompt: str, ids: list[str] | None = None,
             strengths: dict[str, float] | None = None, negative: str = "", steps: int = 25,
             guidance: float = 7.5, resolution: int = 512, seed: int = 0):
    """A PIL image; DDIM with classifier-free guidance, the chosen concepts summed into the model."""
    from diffusers import DDIMScheduler
    from PIL import Image

    scheduler = DDIMScheduler.from_config(host.scheduler_config)
    scheduler.set_timesteps(steps)
    layers = host.linear_layers()
    with LoRAHooks({n: layers[n] for n in bank.layer_shapes() if n in layers}) as hooks:
        hooks.set_composed(bank.composed_factors(ids, strengths))
        embeddings = bank.embeddings(ids)
        cond = host.encode_text([negative, prompt], embeddings)
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn((1, 4, resolution // 8, resolution // 8), generator=gen).to(host.device)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            eps_uncond, eps_text = host.predict_noise(inp, t.expand(2).to(host.device), cond).float().chunk(2)
            eps = eps_uncond + guidance * (eps_text - eps_uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        image = host.decode_latents(latents.to(host.dtype)).float()
    arr = ((image[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))
