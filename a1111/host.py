"""The core's host protocol on A1111's loaded SD-1.5 (``shared.sd_model``, an ldm LatentDiffusion).

UNet: ``sd_model.model.diffusion_model`` in the CompVis layout; text encoder: the transformers
CLIPTextModel at ``sd_model.cond_stage_model.wrapped.transformer``. Names map onto the bank's
canonical names with ``seqlora_core.hosts.naming`` — the same mapping ComfyUI's modules use.

A host is cheap to build and holds the model it was built on: build one per training run or
preview from the *current* ``shared.sd_model`` (a checkpoint switch replaces it), never cache it.
The model is A1111's live one, so everything done to it for training is undone afterwards
(``training()``), and the text encoder only carries SeqLoRA's hooks while SeqLoRA encodes.

The passes run the way A1111's own sampling runs the model, so that every set-up A1111 generates
with also trains: inside A1111's autocast (half precision, its default), on A1111's device through
the modules its ``--medvram`` hooks watch, and — for the one pass differentiated twice — on A1111's
SDP attention whatever cross-attention optimisation is selected (``--xformers``).
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn

from seqlora_core.errors import InputError
from seqlora_core.hosts.protocol import frozen_parameters, math_attention
from seqlora_core.hosts.naming import compvis_layers
from seqlora_core.hosts.token_injection import TokenInjector

from .builtin_lora import base_weight_view, lora_extension_unloaded


class A1111Host:
    def __init__(self, sd_model):
        if getattr(sd_model, "is_sdxl", False) or not hasattr(sd_model.cond_stage_model, "wrapped"):
            raise InputError("SeqLoRA needs an SD-1.5 checkpoint loaded in A1111.")
        self.sd_model = sd_model
        self.unet = sd_model.model.diffusion_model
        wrapped = sd_model.cond_stage_model.wrapped
        self.text_encoder = wrapped.transformer
        # A1111's device, not the UNet's first weight's: under --medvram / --lowvram the weights wait
        # on the CPU between uses and A1111's hooks bring them to this device when called
        self.device, self.dtype = a1111_device(), next(self.unet.parameters()).dtype
        # our own tokenizer copy: A1111's prompt parsing keeps its tokenizer untouched
        self.tokens = TokenInjector(copy.deepcopy(wrapped.tokenizer), self.text_encoder.get_input_embeddings())
        self._layers = compvis_layers(self.unet, self.text_encoder)

    def architecture(self) -> str:
        return "sd15"

    def linear_layers(self) -> dict[str, nn.Linear]:
        return self._layers

    def _table(self) -> Tensor:
        embed = self.text_encoder.get_input_embeddings()
        return getattr(embed, "wrapped", embed).weight

    def init_embedding(self, word: str) -> Tensor:
        return self.tokens.init_embedding(word, self._table())

    def encode_text(self, prompts: list[str], embeddings: dict[str, Tensor]) -> Tensor:
        """Inside A1111's autocast, as A1111 computes its conditioning (``get_conds_with_caching``)."""
        with a1111_autocast():
            return self.tokens.encode(self.text_encoder, prompts, embeddings, self.device)

    def base_layers(self) -> dict[str, object]:
        """The layers' base weights (without LoRAs A1111's Lora extension merged in): fingerprint these."""
        return base_weight_view(self._layers)

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Scaled latents of the posterior *mean*, like the diffusers and ComfyUI hosts (A1111's own
        ``get_first_stage_encoding`` draws a sample from the unseeded global RNG), computed in the
        VAE's dtype, which may differ from the UNet's (``--no-half-vae``, A1111's NaN fallback)."""
        vae = self.sd_model.first_stage_model
        vae_dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            posterior = vae.encode(pixels.to(self.device, vae_dtype))
            latent = posterior.mode() if hasattr(posterior, "mode") else posterior
            return (self.sd_model.scale_factor * latent).float()

    def alphas_cumprod(self) -> Tensor:
        return self.sd_model.alphas_cumprod.detach().float().cpu()

    def predict_noise(self, noisy: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        """The UNet called as A1111's samplers call it: ``sd_model.apply_model`` (A1111's patch of it
        casts the inputs to the UNet's dtype; ldm's calls ``sd_model.model``, the module whose
        forward pre-hook brings the UNet to the GPU under --medvram), inside A1111's autocast (in
        half precision ldm's GroupNorm32 meets an fp32 input with fp16 weights, which only
        autocast's fp32 group_norm accepts)."""
        with a1111_autocast():
            return self.sd_model.apply_model(noisy.to(self.device, self.dtype), timesteps.to(self.device),
                                             cond.to(self.device, self.dtype))

    def frozen_weights(self) -> contextlib.AbstractContextManager:
        """Entered by the trainer: no weight gradients (and no saved inputs for them) in A1111's
        UNet and text encoder while a concept trains; their flags are restored after."""
        return frozen_parameters(self.unet, self.text_encoder)

    @contextlib.contextmanager
    def training(self):
        """Entered by the tab around a training run on A1111's live model: every weight of it frozen
        (VAE included; flags restored after), LoRAs the Lora extension merged taken out (merged
        again on its next generation), gradients on in this worker thread.

        Refused under --lowvram, as A1111 refuses its own training there: its hooks move UNet blocks
        on and off the GPU within a pass, which memory=checkpoint's recomputations cannot follow."""
        from modules import shared

        if getattr(shared.cmd_opts, "lowvram", False):
            raise InputError("SeqLoRA cannot train under A1111's --lowvram (A1111's own training refuses it "
                             "too); restart A1111 with --medvram instead.")
        with frozen_parameters(self.sd_model), lora_extension_unloaded(self._layers), torch.enable_grad():
            yield

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The UNet blocks memory=checkpoint recomputes (ldm's BasicTransformerBlock, ResBlock)."""
        from seqlora_core.method.checkpointing import checkpoint_blocks
        return checkpoint_blocks(self.unet)

    @contextlib.contextmanager
    def differentiable_attention(self):
        """A1111's SDP cross-attention (torch SDPA, on its math kernel) for the pass differentiated
        twice, whatever optimisation A1111 applied: xformers has no double backward, and sdp-no-mem
        re-enables the flash kernel inside its forward. The other passes keep the user's choice.

        Inside A1111's autocast as well: memory=checkpoint's recomputations re-enter this context
        (on autograd's thread, where the pass's autocast is not active) and must compute in the
        dtypes the pass computed in."""
        with a1111_autocast(), sdp_cross_attention():
            yield


def a1111_device() -> torch.device:
    """The device A1111 generates on (``modules.devices.device``)."""
    from modules import devices

    return devices.device


def a1111_autocast() -> contextlib.AbstractContextManager:
    """A1111's autocast (``modules.devices.autocast()``: ``torch.autocast("cuda")`` in half precision,
    a no-op with --no-half), the context its sampling runs the model in (processing.py
    ``process_images_inner``; sd_hijack_unet.py ``apply_model``)."""
    from modules import devices

    return devices.autocast()


@contextlib.contextmanager
def sdp_cross_attention():
    """ldm's CrossAttention on A1111's SDP forward (what its "sdp" optimisation assigns,
    sd_hijack_optimizations.SdOptimizationSdp.apply) under torch's math kernel; the optimisation
    selected before is put back after. The swap is seen by A1111 as a whole, which is safe: a
    training holds A1111's queue lock, so no generation runs meanwhile."""
    import ldm.modules.attention as attention
    from modules import sd_hijack_optimizations

    selected = attention.CrossAttention.forward
    attention.CrossAttention.forward = sd_hijack_optimizations.scaled_dot_product_attention_forward
    try:
        with math_attention():
            yield
    finally:
        attention.CrossAttention.forward = selected
