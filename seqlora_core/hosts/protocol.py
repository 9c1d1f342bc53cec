"""What training, evaluation and composition need from a host (diffusers, ComfyUI, A1111).

Everything host-specific sits behind this protocol; the algorithm in ``bilevel``/``trainer``
only sees named linear layers, a text encoder that accepts extra token embeddings, the VAE's
encoder, the noise schedule and the UNet call. Layer names are canonical: diffusers module paths
with a ``unet.`` or ``text_encoder.`` prefix, whatever the host's own naming.
"""
from __future__ import annotations

import contextlib
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Host(Protocol):
    device: torch.device
    dtype: torch.dtype  # compute dtype of the frozen model

    def architecture(self) -> str:
        """'sd15' for the real architecture, 'sd15-tiny' for the test model."""

    def linear_layers(self) -> dict[str, nn.Linear]:
        """Every adaptable linear layer, by canonical name."""

    def init_embedding(self, word: str) -> Tensor:
        """(k, d) float32 input embedding of ``word`` (mean over its BPE pieces, k = 1)."""

    def encode_text(self, prompts: list[str], embeddings: dict[str, Tensor]) -> Tensor:
        """(b, 77, d) conditioning; each key of ``embeddings`` (a token such as '<astro>')
        is replaced by its (k, d) vectors, keeping the autograd graph to them."""

    def encode_images(self, pixels: Tensor) -> Tensor:
        """(b, 3, H, W) in [-1, 1] → (b, 4, H/8, W/8) scaled latents."""

    def alphas_cumprod(self) -> Tensor:
        """(num_train_timesteps,) float32 ᾱ_t of the training schedule."""

    def predict_noise(self, noisy: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        """ε̂(x_t, t, c), same shape as ``noisy``."""

    def differentiable_attention(self) -> contextlib.AbstractContextManager:
        """Context in which attention runs on a kernel that supports double backward."""

    # Optional: ``checkpoint_blocks() -> list[nn.Module]``, the UNet's transformer and resnet blocks
    # (``method.checkpointing.checkpoint_blocks(unet)``), needed by memory=checkpoint.


@contextlib.contextmanager
def frozen_parameters(*modules: nn.Module):
    """Every parameter of ``modules`` with requires_grad off for the duration, restored after.

    A host whose model keeps ``requires_grad`` on its weights (A1111 loads ldm's LatentDiffusion
    as a trainable module) would make autograd save every Linear's and conv's input for a weight
    gradient nobody uses; training only needs gradients to the LoRA factors and the embedding.
    """
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def math_attention() -> contextlib.AbstractContextManager:
    """torch's scaled_dot_product_attention restricted to its composite (math) kernel.

    The fused flash / memory-efficient kernels have no double backward; the math kernel is
    built from differentiable ops, so a graph recorded inside this context can be
    differentiated twice. Only the one pass that needs it pays for it.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.2
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    return sdpa_kernel([SDPBackend.MATH])
