"""LoRA residuals on frozen nn.Linear layers, added by forward hooks.

The frozen weights are never copied or modified: each hooked layer's output gets
``(x @ B) @ Aᵀ`` added, where (A, B) are either

* the *trainable* factors of the concept being learned (bound before every forward pass, so
  autograd sees whatever tensors the optimiser passes in, including non-leaf ones from a
  differentiable inner step), and/or
* the *composed* factors of frozen concepts, concatenated once into a single rank-Σr pair per
  layer (composition is a plain sum: Σ s_i A_i B_iᵀ = [s_1A_1 …] [B_1 …]ᵀ).

``remove()`` restores the model exactly.

The factors follow the *input*, not the layer's weight: under ComfyUI ``--lowvram`` / partial
loads and A1111 ``--medvram`` / ``--lowvram`` a layer's weight stays on the CPU and is cast to
the input's device inside its forward, so ``module.weight.device`` says nothing about where the
residual is computed. Composed factors are copied once per input device and kept (a few MB of
rank-Σr factors); trainable ones are moved differentiably when, rarely, they are elsewhere.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..hosts.protocol import autocast_dtype
from ..linalg.factors import Factors, compose_factors  # noqa: F401 (imported from here too)


def factors_on(cache: dict, key: tuple, pair: Factors, device: torch.device) -> Factors:
    """``pair`` on ``device``: as it is when already there, else copied there once and kept in
    ``cache`` under ``key + (device,)`` (composed factors live on the CPU; the input that meets
    them may be anywhere, see the module docstring). Every holder of frozen factors uses it: the
    hooks here, ``sampling.confined``'s spatial hooks and ComfyUI's confined cross-attention."""
    if pair[0].device == device:
        return pair
    slot = key + (device,)
    if slot not in cache:
        cache[slot] = (pair[0].to(device), pair[1].to(device))
    return cache[slot]


def lora_delta(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """(x @ B) @ Aᵀ for x: (..., m) → (..., n), computed in fp32 and returned in x's dtype.

    The input is cast up, as peft does: in fp16 / bf16 the rank-r product of fp32 factors would
    otherwise lose the factors' precision (bf16 keeps 8 bits), and the gradients to A and B
    (fp32 leaves) are formed from fp32 products. The residual is added back in the model's dtype.
    The same inside ``torch.autocast`` (A1111 runs the model in it), which would otherwise compute
    these matmuls in fp16 / bf16.
    """
    wide = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for a fp64 model (exactness tests)
    with _autocast_off(x.device.type):
        return ((x.to(wide) @ b.to(wide)) @ a.to(wide).T).to(x.dtype)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device_type`` when it is on there; nothing otherwise (no context to
    enter on every hook call outside autocast, and none for devices torch cannot autocast)."""
    return torch.autocast(device_type, enabled=False) if autocast_dtype(device_type) else contextlib.nullcontext()


class LoRAHooks:
    """Forward hooks adding trainable and composed LoRA residuals to named linear layers."""

    def __init__(self, layers: Mapping[str, nn.Linear]):
        self.layers = dict(layers)
        self.trainable: dict[str, Factors] = {}
        self.composed: dict[str, Factors] = {}  # the active set, as given (usually on the CPU)
        # named sets of composed factors (regional composition: one per context), switched by
        # ``use``; copies per (set, layer, input device), so switching costs no copy
        self._sets: dict[object, dict[str, Factors]] = {}
        self._active: object = None
        self._composed_on: dict[tuple, Factors] = {}
        self._handles = [module.register_forward_hook(self._make_hook(name))
                         for name, module in self.layers.items()]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            x = inputs[0]
            composed = self._composed_for(name, x.device)
            if composed is not None:
                output = output + lora_delta(x, *composed).to(output.dtype)  # autocast: x may be wider
            trainable = self.trainable.get(name)
            if trainable is not None:
                a, b = (t if t.device == x.device else t.to(x.device) for t in trainable)
                output = output + lora_delta(x, a, b).to(output.dtype)
            return output
        return hook

    def bind(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
        """Use these factors as the trainable concept's residual from now on."""
        self.trainable = {name: (a[name], b[name]) for name in a}

    def set_composed(self, per_layer: Mapping[str, Factors]) -> None:
        """Frozen concepts' residuals, already stacked per layer (see :func:`compose_factors`);
        each is copied to an input's device the first time an input arrives there."""
        self._sets, self._composed_on = {}, {}
        self.define_set(None, per_layer)
        self._active = None
        self.composed = self._sets[None]

    def define_set(self, key: object, per_layer: Mapping[str, Factors]) -> None:
        """A named set of composed factors that :meth:`use` can switch to (an empty mapping: no
        residual at all while it is in use)."""
        self._sets[key] = {name: pair for name, pair in per_layer.items() if name in self.layers}
        self._composed_on = {k: v for k, v in self._composed_on.items() if k[0] != key}

    @contextlib.contextmanager
    def use(self, key: object):
        """Within the block the hooks add the set ``key``'s residuals (see :meth:`define_set`)."""
        before = self._active
        self._active, self.composed = key, self._sets[key]
        try:
            yield
        finally:
            self._active, self.composed = before, self._sets.get(before, {})

    def _composed_for(self, name: str, device: torch.device) -> Factors | None:
        """The layer's composed factors on ``device`` (copied there once, then reused)."""
        pair = self.composed.get(name)
        return None if pair is None else factors_on(self._composed_on, (self._active, name), pair, device)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.trainable = {}
        self.composed = {}
        self._sets, self._composed_on = {}, {}

    def __enter__(self) -> "LoRAHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
