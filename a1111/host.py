"""The core's host protocol on A1111's loaded SD-1.5 (``shared.sd_model``, an ldm LatentDiffusion).

UNet: ``sd_model.model.diffusion_model`` in the CompVis layout; text encoder: the transformers
CLIPTextModel at ``sd_model.cond_stage_model.wrapped.transformer``. Names map onto the bank's
canonical names with ``seqlora_core.hosts.naming`` — the same mapping ComfyUI's modules use.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn

from seqlora_core.hosts.protocol import frozen_parameters, math_attention
from seqlora_core.hosts.naming import compvis_layers
from seqlora_core.hosts.token_injection import TokenInjector


class A1111Host:
    def __init__(self, sd_model):
        if getattr(sd_model, "is_sdxl", False) or not hasattr(sd_model.cond_stage_model, "wrapped"):
            from seqlora_core.errors import InputError
            raise InputError("SeqLoRA needs an SD-1.5 checkpoint loaded in A1111.")
        self.sd_model = sd_model
        self.unet = sd_model.model.diffusion_model
        wrapped = sd_model.cond_stage_model.wrapped
        self.text_encoder = wrapped.transformer
        param = next(self.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
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
        return self.tokens.encode(self.text_encoder, prompts, embeddings, self.device)

    def encode_images(self, pixels: Tensor) -> Tensor:
        # the VAE's own dtype: it may be fp32 beside a fp16 UNet (--no-half-vae or A1111's fallback)
        vae_dtype = next(self.sd_model.first_stage_model.parameters()).dtype
        with torch.no_grad():
            x = pixels.to(self.device, vae_dtype)
            return self.sd_model.get_first_stage_encoding(self.sd_model.encode_first_stage(x)).float()

    def alphas_cumprod(self) -> Tensor:
        return self.sd_model.alphas_cumprod.detach().float().cpu()

    def predict_noise(self, noisy: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        return self.unet(noisy.to(self.device, self.dtype), timesteps.to(self.device),
                         context=cond.to(self.device, self.dtype))

    def frozen_weights(self) -> contextlib.AbstractContextManager:
        """Entered by the trainer: no weight gradients (and no saved inputs for them) in A1111's
        UNet and text encoder while a concept trains; their flags are restored after."""
        return frozen_parameters(self.unet, self.text_encoder)

    def differentiable_attention(self) -> contextlib.AbstractContextManager:
        # A1111's SDP optimisation calls torch SDPA, which the math kernel makes twice
        # differentiable; xformers has no double backward (use --opt-sdp-attention to train)
        return math_attention()
