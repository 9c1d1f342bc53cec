"""Text-to-image sampling with any subset of a bank composed (standalone diffusers path),
optionally with regional prompts (drawn or found from attention), confined residuals and
sketch / keypose control."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..bank.format import Bank
from .control import Control, unet_control_kwargs
from ..hosts.diffusers_host import DiffusersHost
from ..method.lora import LoRAHooks
from .auto_regions import AUTO_SHARE, AttentionMapRecorder, concepts_to_find, found_regions, require_positions, \
    token_positions
from .confined import DEFAULT_RESIDUALS, GLOBAL, SpatialConfinement, check_mode, context_concepts, define_context_sets, \
    split_layers
from .regions import Region, RegionalState, region_masks, regional_unet


@torch.no_grad()
def generate(host: DiffusersHost, bank: Bank, prompt: str, ids: list[str] | None = None,
             strengths: dict[str, float] | None = None, negative: str = "", steps: int = 25,
             guidance: float = 7.5, resolution: int = 512, seed: int = 0,
             regions: Sequence[Region] = (), controls: Sequence[Control] = (), residuals: str = DEFAULT_RESIDUALS,
             auto_regions: bool = False):
    """A PIL image; DDIM with classifier-free guidance, the chosen concepts summed into the model.

    ``regions``: each region's features come from its own prompt inside its box/mask (one UNet
    pass per step whatever the number of regions). ``controls``: T2I-Adapters / ControlNets
    conditioning the whole image. ``residuals``: ``global`` (every chosen concept acts on every
    prompt) or ``confined`` (each prompt — the global one, each region's — with only the concepts
    it names: ``sampling.confined``). ``auto_regions``: the concepts the prompt names find their
    regions from their tokens' cross-attention during the first quarter of the steps
    (``sampling.auto_regions``); the rest is sampled with those regions, confined. Drawn
    ``regions`` win where given.
    """
    from diffusers import DDIMScheduler
    from PIL import Image

    check_mode(residuals)
    scheduler = DDIMScheduler.from_config(host.scheduler_config)
    scheduler.set_timesteps(steps)
    latent_hw = (resolution // 8, resolution // 8)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, *latent_hw), generator=gen).to(host.device) * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    regions = list(regions)
    if auto_regions:
        early = max(1, round(steps * AUTO_SHARE))
        latents, found = _find_regions(host, bank, prompt, ids, strengths, negative, guidance, controls, scheduler,
                                       latents, timesteps[:early], resolution, regions)
        regions, residuals, timesteps = regions + found, "confined", timesteps[early:]
    with contextlib.ExitStack() as stack:
        cond = _compose(stack, host, bank, prompt, ids, strengths, negative, regions, residuals, resolution)
        latents = _denoise(host, scheduler, latents, timesteps, cond, guidance, controls)
        image = host.decode_latents(latents.to(host.dtype)).float()
    arr = ((image[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def _compose(stack: contextlib.ExitStack, host: DiffusersHost, bank: Bank, prompt: str, ids, strengths, negative: str,
             regions: Sequence[Region], residuals: str, resolution: int) -> Tensor:
    """Enter (on ``stack``) the concepts' hooks and the regional attention; return the (2, 77, d)
    conditioning [negative, prompt]."""
    layers = host.linear_layers()
    adapted = {n: layers[n] for n in bank.layer_shapes() if n in layers}
    confined = residuals == "confined" and bool(regions)
    embeddings = bank.embeddings(ids)
    if not confined:
        hooks = stack.enter_context(LoRAHooks(adapted))
        hooks.set_composed(bank.composed_factors(ids, strengths))
        cond = host.encode_text([negative, prompt], embeddings)
        contexts = host.encode_text([r.prompt for r in regions], embeddings) if regions else None
    else:
        text_layers, spatial_layers = split_layers(adapted)
        hooks = stack.enter_context(LoRAHooks(text_layers))
        sets = context_concepts(bank, prompt, regions, ids)
        define_context_sets(hooks, bank, sets, strengths)
        with hooks.use(GLOBAL):
            cond = host.encode_text([negative, prompt], embeddings)
        parts, negatives = [], []
        for r, region in enumerate(regions):
            with hooks.use(r):
                negative_r, context_r = host.encode_text([negative, region.prompt], embeddings).chunk(2)
            parts.append(context_r)
            negatives.append(negative_r)
        contexts = torch.cat(parts)
    if regions:
        state = RegionalState(masks=region_masks(regions, resolution, resolution), contexts=contexts,
                              rows=torch.tensor([False, True]), latent_hw=(resolution // 8, resolution // 8),
                              confine=hooks.use if confined else None,
                              uncond_contexts=torch.cat(negatives) if confined else None)
        stack.enter_context(regional_unet(host.unet, state))
        if confined and spatial_layers:
            spatial = SpatialConfinement(spatial_layers, bank, sets, strengths or {}, state)
            stack.callback(spatial.remove)
    return cond


def _denoise(host: DiffusersHost, scheduler, latents: Tensor, timesteps, cond: Tensor, guidance: float,
             controls: Sequence[Control]) -> Tensor:
    """DDIM steps over ``timesteps`` with classifier-free guidance; the latents after them."""
    for t in timesteps:
        inp = scheduler.scale_model_input(torch.cat([latents] * 2), t).to(host.dtype)
        tt = t.expand(2).to(host.device)
        extra = unet_control_kwargs(list(controls), inp, tt, cond.to(host.dtype))
        eps_uncond, eps_text = host.predict_noise(inp, tt, cond, **extra).float().chunk(2)
        eps = eps_uncond + guidance * (eps_text - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def _find_regions(host: DiffusersHost, bank: Bank, prompt: str, ids, strengths, negative: str, guidance: float,
                  controls, scheduler, latents: Tensor, timesteps, resolution: int,
                  drawn: Sequence[Region]) -> tuple[Tensor, list[Region]]:
    """The first steps with every named concept composed, recording where each concept's token
    attends; returns the latents after them and one region per concept no drawn region names
    (the whole prompt, that concept only; drawn regions cut out of it)."""
    wanted = concepts_to_find(bank, prompt, ids, drawn)
    embeddings = bank.embeddings(ids)
    latent_hw = (resolution // 8, resolution // 8)
    positions = require_positions(token_positions(host, prompt, {i: bank.get(i).token for i in wanted}, embeddings))
    recorder = AttentionMapRecorder(positions, latent_hw, torch.tensor([False, True]))
    with contextlib.ExitStack() as stack:
        cond = _compose(stack, host, bank, prompt, ids, strengths, negative, (), "global", resolution)
        saved = dict(host.unet.attn_processors)
        host.unet.set_attn_processor({k: (recorder if ".attn2." in k else p) for k, p in saved.items()})
        stack.callback(host.unet.set_attn_processor, saved)
        latents = _denoise(host, scheduler, latents, timesteps, cond, guidance, controls)
    names = {i: bank.get(i).token for i in recorder.maps}
    return latents, found_regions(recorder.maps, prompt, names, drawn, (resolution, resolution))
