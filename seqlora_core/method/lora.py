"""LoRA residuals on frozen nn.Linear layers, added by forward hooks.

The frozen weights are never copied or modified: each hooked layer's output gets
``(x @ B) @ Aᵀ`` added, where (A, B) are either

* the *trainable* factors of the concept being learned (bound before every forward pass, so
  autograd sees whatever tensors the optimiser passes in, including non-leaf ones from a
  differentiable inner step), and/or
* the *composed* factors of frozen concepts, concatenated once into a single rank-Σr pair per
  layer (composition is a plain sum: Σ s_i A_i B_iᵀ = [s_1A_1 …] [B_1 …]ᵀ).

``remove()`` restores the model exactly.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..linalg.factors import Factors, compose_factors  # noqa: F401 (imported from here too)


def lora_delta(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """(x @ B) @ Aᵀ for x: (..., m) → (..., n), computed in fp32 and returned in x's dtype.

    The input is cast up, as peft does: in fp16 / bf16 the rank-r product of fp32 factors would
    otherwise lose the factors' precision (bf16 keeps 8 bits), and the gradients to A and B
    (fp32 leaves) are formed from fp32 products. The residual is added back in the model's dtype.
    """
    wide = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for a fp64 model (exactness tests)
    return ((x.to(wide) @ b.to(wide)) @ a.to(wide).T).to(x.dtype)


class LoRAHooks:
    """Forward hooks adding trainable and composed LoRA residuals to named linear layers."""

    def __init__(self, layers: Mapping[str, nn.Linear]):
        self.layers = dict(layers)
        self.trainable: dict[str, Factors] = {}
        self.composed: dict[str, Factors] = {}
        self._handles = [module.register_forward_hook(self._make_hook(name))
                         for name, module in self.layers.items()]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            x = inputs[0]
            for table in (self.composed, self.trainable):
                pair = table.get(name)
                if pair is not None:
                    output = output + lora_delta(x, *pair)
            return output
        return hook

    def bind(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
        """Use these factors as the trainable concept's residual from now on."""
        self.trainable = {name: (a[name], b[name]) for name in a}

    def set_composed(self, per_layer: Mapping[str, Factors]) -> None:
        """Frozen concepts' residuals, already stacked per layer (see :func:`compose_factors`)."""
        device_of = {name: module.weight.device for name, module in self.layers.items()}
        self.composed = {name: (a.to(device_of[name]), b.to(device_of[name]))
                         for name, (a, b) in per_layer.items() if name in self.layers}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.trainable = {}
        self.composed = {}

    def __enter__(self) -> "LoRAHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
