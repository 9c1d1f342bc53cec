"""LoRA residuals computed where the input is, not where the layer's weight is.

Under ComfyUI ``--lowvram`` / partial loads and A1111 ``--medvram`` / ``--lowvram`` a layer's
weight stays on the CPU and is cast to the input's device inside its forward. No second real
device exists here, so the ``meta`` device stands in for the GPU. torch lets ``meta`` and CPU
tensors mix in a matmul, where CUDA and CPU ones raise; the ``strict_devices`` fixture restores
that rule for the residual's product, so a test fails here exactly where a GPU run would.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seqlora_core.method import lora
from seqlora_core.method.lora import LoRAHooks, compose_factors


@pytest.fixture
def strict_devices(monkeypatch):
    """lora_delta raising on factors that are not on the input's device, as CUDA's matmul does."""
    real = lora.lora_delta

    def strict(x, a, b):
        if not (a.device == b.device == x.device):
            raise RuntimeError(f"Expected all tensors to be on the same device, got {x.device}, {a.device}, {b.device}")
        return real(x, a, b)
    monkeypatch.setattr(lora, "lora_delta", strict)


class WeightOnCpuLinear(nn.Linear):
    """A linear layer as the low-VRAM modes run it: weight on the CPU, cast to the input's device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.device), self.bias.to(x.device))


def composed_pair(n: int = 5, m: int = 6, r: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return compose_factors([(1.0, torch.randn(n, r, generator=g), torch.randn(m, r, generator=g))])


def test_composed_factors_follow_the_input_device_and_are_copied_once(strict_devices):
    layer = WeightOnCpuLinear(6, 5)
    with LoRAHooks({"l": layer}) as hooks:
        hooks.set_composed({"l": composed_pair()})
        out = layer(torch.zeros(3, 6, device="meta"))  # failed before: factors on weight.device (CPU)
        assert out.device.type == "meta" and out.shape == (3, 5)
        first = hooks._composed_on[(None, "l", torch.device("meta"))]
        layer(torch.zeros(2, 6, device="meta"))
        assert hooks._composed_on[(None, "l", torch.device("meta"))][0] is first[0]  # reused, not copied again
        assert hooks.composed["l"][0].device.type == "cpu"  # the given factors are left where they were


def test_trainable_factors_on_another_device_are_moved_differentiably(strict_devices):
    layer = WeightOnCpuLinear(6, 5)
    a, b = (t.requires_grad_() for t in composed_pair())
    with LoRAHooks({"l": layer}) as hooks:
        hooks.bind({"l": a}, {"l": b})
        out = layer(torch.zeros(3, 6, device="meta"))
        assert out.device.type == "meta" and out.requires_grad


def test_same_device_results_are_unchanged():
    """On one device the residual is exactly W x + A Bᵀ x, as before."""
    layer = nn.Linear(6, 5)
    a, b = composed_pair()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    with LoRAHooks({"l": layer}) as hooks:
        hooks.set_composed({"l": (a, b)})
        got = layer(x)
    assert torch.allclose(got, F.linear(x, layer.weight, layer.bias) + x @ b @ a.T, atol=1e-6)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # removed: the model is as it was


@pytest.mark.parametrize("table", ["composed", "trainable"])
def test_set_composed_and_bind_keep_only_the_hooked_layers(table):
    layer = nn.Linear(6, 5)
    with LoRAHooks({"l": layer}) as hooks:
        pair = composed_pair()
        if table == "composed":
            hooks.set_composed({"l": pair, "elsewhere": pair})
            assert set(hooks.composed) == {"l"}
        else:
            hooks.bind({"l": pair[0]}, {"l": pair[1]})
            assert set(hooks.trainable) == {"l"}
