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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


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
    # Optional: ``batches_images = True`` when ``encode_images`` takes any number of images and
    # sizes its own batches (ComfyUI): the trainer then encodes a dataset in one call.


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


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype torch.autocast computes in on ``device_type`` now; None when autocast is off
    there or the device type has no autocast (meta). One answer for the LoRA product (which turns
    autocast off around itself) and for the math attention (which casts as autocast would)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (TypeError, AttributeError):  # torch < 2.4 (A1111 ships 2.1): one flag for CUDA, one for the CPU
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None
    except RuntimeError:  # a device type autocast does not know (meta)
        return None


class MathAttention(TorchFunctionMode):
    """torch's scaled_dot_product_attention on its composite (math) kernel, in this thread only.

    ``torch.nn.attention.sdpa_kernel`` would do it by flipping torch's process-wide backend flags
    (``torch._C._set_sdp_use_flash`` …; torch 2.13, torch/nn/attention/__init__.py): a generation
    running beside a training in another thread (ComfyUI and A1111 run them in worker threads)
    would lose its fused kernels for as long as the pass runs, and two threads entering and leaving
    it in turn could leave the flags off for good. A torch-function mode lives on the calling
    thread's mode stack, so only the calls made inside this context by this thread — our own
    pass — are routed to ``aten::_scaled_dot_product_attention_math``, the op the dispatcher
    itself runs for SDPBackend.MATH (a boolean mask first turned into an additive one, as the
    dispatcher's ``convert_boolean_attn_mask`` does). Checkpointed blocks re-enter the pass's
    context when they recompute, so recomputations in autograd's threads are covered too.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _SDPA:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, args), **kwargs)
        query, key, value = bound["query"], bound["key"], bound["value"]
        mask = bound.get("attn_mask")
        dtype = autocast_dtype(query.device.type)
        if dtype is not None:  # autocast casts SDPA's floating inputs; the math op is not on its list
            query, key, value = (t.to(dtype) if t.is_floating_point() else t for t in (query, key, value))
            mask = mask.to(dtype) if mask is not None and mask.is_floating_point() else mask
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros_like(mask, dtype=query.dtype).masked_fill(mask.logical_not(), float("-inf"))
        return torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, mask, bound.get("dropout_p", 0.0), bound.get("is_causal", False),
            scale=bound.get("scale"), **({"enable_gqa": True} if bound.get("enable_gqa") else {}))[0]


def math_attention() -> contextlib.AbstractContextManager:
    """torch's scaled_dot_product_attention restricted to its composite (math) kernel, for the
    calling thread only (:class:`MathAttention`).

    The fused flash / memory-efficient kernels have no double backward; the math kernel is
    built from differentiable ops, so a graph recorded inside this context can be
    differentiated twice. Only the one pass that needs it pays for it.
    """
    return MathAttention()
