"""The host protocol on diffusers / transformers modules (standalone path, tests, benchmarks)."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .base_models import Components, load_components
from .protocol import math_attention
from .token_injection import TokenInjector


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``, checked before the model
    loads: torch's own errors for a bad or absent device come deep inside loading."""
    from ..errors import InputError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"Device must be auto, cpu, cuda or cuda:N, not '{name}'.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device '{name}' asked for, but this torch sees no CUDA GPU; use --device cpu or auto.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"Device '{name}' asked for, but there are only {torch.cuda.device_count()} CUDA GPU(s).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"Device '{name}' asked for, but MPS is not available here; use --device cpu or auto.")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The model's dtype: ``auto`` (or None) is fp16 on CUDA, as every host runs SD-1.5 there,
    and fp32 on the CPU, where half-precision kernels are slow. The method's own tensors stay
    fp32 whatever this is (``method/precision.py``)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        from ..errors import InputError
        raise InputError(f"dtype must be auto, {', '.join(DTYPES)}; got '{name}'.")
    return DTYPES[name]


def canonical_text_name(name: str) -> str:
    """transformers ≥ 5 dropped CLIPTextModel's ``text_model.`` level; the bank keeps it."""
    return name if name.startswith("text_model.") else "text_model." + name


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


class DiffusersHost:
    """SD-1.5 as diffusers' UNet2DConditionModel + AutoencoderKL + transformers' CLIPTextModel."""

    def __init__(self, parts: Components, device: torch.device, dtype: torch.dtype = torch.float32):
        self.parts = parts
        self.device, self.dtype = device, dtype
        self.unet, self.vae, self.text_encoder = (
            _place(m, device, dtype) for m in (parts.unet, parts.vae, parts.text_encoder))
        self.tokenizer = parts.tokenizer
        self.scheduler_config = parts.scheduler_config
        self.tokens = TokenInjector(self.tokenizer, self.text_encoder.get_input_embeddings())

    @classmethod
    def load(cls, base: str, device: str = "auto", dtype: torch.dtype | str | None = None) -> "DiffusersHost":
        dev = resolve_device(device)
        return cls(load_components(base), dev, resolve_dtype(dtype, dev))

    # -- protocol ----------------------------------------------------------------------------
    def architecture(self) -> str:
        return self.parts.architecture

    def linear_layers(self) -> dict[str, nn.Linear]:
        out = {}
        for prefix, model in (("unet", self.unet), ("text_encoder", self.text_encoder)):
            for name, module in model.named_modules():
                if isinstance(module, nn.Linear):
                    out[f"{prefix}.{canonical_text_name(name) if prefix == 'text_encoder' else name}"] = module
        return out

    def init_embedding(self, word: str) -> Tensor:
        return self.tokens.init_embedding(word, self.text_encoder.get_input_embeddings().weight)

    def encode_text(self, prompts: list[str], embeddings: dict[str, Tensor]) -> Tensor:
        return self.tokens.encode(self.text_encoder, prompts, embeddings, self.device)

    def encode_images(self, pixels: Tensor) -> Tensor:
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
            return dist.mean * self.vae.config.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        with torch.no_grad():
            return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    def alphas_cumprod(self) -> Tensor:
        from diffusers import DDPMScheduler
        return DDPMScheduler.from_config(self.scheduler_config).alphas_cumprod.float()

    def predict_noise(self, noisy: Tensor, timesteps: Tensor, cond: Tensor, **unet_kwargs) -> Tensor:
        """``unet_kwargs``: control residuals (see ``control.unet_control_kwargs``)."""
        return self.unet(noisy.to(self.dtype), timesteps, encoder_hidden_states=cond.to(self.dtype),
                         **unet_kwargs).sample

    def differentiable_attention(self) -> contextlib.AbstractContextManager:
        return math_attention()

    def checkpoint_blocks(self) -> list[nn.Module]:
        from ..method.checkpointing import checkpoint_blocks
        return checkpoint_blocks(self.unet)
