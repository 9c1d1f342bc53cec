"""Text-to-image sampling with any subset of a bank composed (standalone diffusers path),
optionally with regional prompts and sketch / keypose control."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from ..bank.format import Bank
from .control import Control, unet_control_kwargs
from ..hosts.diffusers_host import DiffusersHost
from ..method.lora import LoRAHooks
from .regions import Region, RegionalState, region_masks, regional_unet


@torch.no_grad()
def generate(host: DiffusersHost, bank: Bank, prompt: str, ids: list[str] | None = None,
             strengths: dict[str, float] | None = None, negative: str = "", steps: int = 25,
             guidance: float = 7.5, resolution: int = 512, seed: int = 0,
             regions: Sequence[Region] = (), controls: Sequence[Control] = ()):
    """A PIL image; DDIM with classifier-free guidance, the chosen concepts summed into the model.

    ``regions``: each region's features come from its own prompt inside its box/mask (one UNet
    pass per step whatever the number of regions). ``controls``: T2I-Adapters / ControlNets
    conditioning the whole image.
    """
    from diffusers import DDIMScheduler
    from PIL import Image

    scheduler = DDIMScheduler.from_config(host.scheduler_config)
    scheduler.set_timesteps(steps)
    layers = host.linear_layers()
    latent_hw = (resolution // 8, resolution // 8)
    with contextlib.ExitStack() as stack:
        hooks = stack.enter_context(LoRAHooks({n: layers[n] for n in bank.layer_shapes() if n in layers}))
        hooks.set_composed(bank.composed_factors(ids, strengths))
        embeddings = bank.embeddings(ids)
        cond = host.encode_text([negative, prompt], embeddings)
        if regions:
            state = RegionalState(masks=region_masks(regions, resolution, resolution),
                                  contexts=host.encode_text([r.prompt for r in regions], embeddings),
                                  rows=torch.tensor([False, True]), latent_hw=latent_hw)
            stack.enter_context(regional_unet(host.unet, state))
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn((1, 4, *latent_hw), generator=gen).to(host.device)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([latents] * 2), t).to(host.dtype)
            tt = t.expand(2).to(host.device)
            extra = unet_control_kwargs(list(controls), inp, tt, cond.to(host.dtype))
            eps_uncond, eps_text = host.predict_noise(inp, tt, cond, **extra).float().chunk(2)
            eps = eps_uncond + guidance * (eps_text - eps_uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        image = host.decode_latents(latents.to(host.dtype)).float()
    arr = ((image[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))
