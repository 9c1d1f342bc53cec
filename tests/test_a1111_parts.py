"""The parts of the A1111 extension that need no A1111: tag parsing, the base check, the Lora
extension interplay, the host's VAE encoding and training context (fakes stand in for A1111's
objects; the real thing is tests/integration/a1111)."""
from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from a1111.builtin_lora import base_weight_view, lora_extension_unloaded
from a1111.host import A1111Host
from a1111.network import parse_params, picks_from_prompt, refusal
from seqlora_core.errors import SeqLoRAError


def _params(*items):
    positional = [i for i in items if "=" not in i]
    named = dict(i.split("=", 1) for i in items if "=" in i)
    return SimpleNamespace(items=list(items), positional=positional, named=named)


def test_tags_parse_and_bad_ones_say_why():
    assert parse_params([_params("mine", "chelsea"), _params("mine.safetensors", "coffee", "0.5")]) == \
        [("mine.safetensors", "chelsea", 1.0), ("mine.safetensors", "coffee", 0.5)]
    for bad in (_params("mine"), _params("mine", "chelsea", "loud")):
        with pytest.raises(SeqLoRAError) as info:
            parse_params([bad])
        assert "\n" not in str(info.value) and str(info.value).endswith(".")


def test_prompt_picks_load_banks_once_and_name_missing_ones(stream_bank, tmp_path):
    stream_bank.save(tmp_path / "mine.safetensors")
    ids = [c.id for c in stream_bank.concepts[:2]]
    picks = picks_from_prompt([_params("mine", ids[0]), _params("mine", ids[1], "0.7")], str(tmp_path))
    assert [(p.label, p.concept, p.strength) for p in picks] == [("mine", ids[0], 1.0), ("mine", ids[1], 0.7)]
    assert picks[0].bank is picks[1].bank
    with pytest.raises(SeqLoRAError, match="no bank other.safetensors"):
        picks_from_prompt([_params("other", ids[0])], str(tmp_path))
    with pytest.raises(SeqLoRAError, match="no concept 'ghost'"):
        picks_from_prompt([_params("mine", "ghost")], str(tmp_path))


def test_banks_for_another_base_are_refused_with_one_line(stream_bank, host):
    layers = {n: None for n in stream_bank.layer_shapes()}
    sd15 = type(stream_bank)({**stream_bank.base, "architecture": "sd15"}, stream_bank.eps, stream_bank.concepts)
    assert refusal(sd15, "mine", stream_bank.base["fingerprint"], layers) is None
    other = refusal(sd15, "mine", "0123456789abcdef", layers)
    assert other.startswith("SeqLoRA: mine not applied: it was made for another base model") and "\n" not in other
    assert "not SD-1.5" in refusal(stream_bank, "mine", stream_bank.base["fingerprint"], layers)  # the tiny test base
    assert "has no layer" in refusal(sd15, "mine", stream_bank.base["fingerprint"], {})


def _lora_extension(monkeypatch, loaded):
    """A stand-in for A1111's Lora extension module ``networks`` (merges in place, keeps a backup)."""
    module = types.ModuleType("networks")
    module.loaded_networks = list(loaded)
    module.calls = []

    def network_apply_weights(layer):
        module.calls.append((layer, tuple(module.loaded_networks)))
        if not module.loaded_networks and getattr(layer, "network_current_names", ()):
            with torch.no_grad():
                layer.weight.copy_(layer.network_weights_backup)
            layer.network_current_names = ()

    module.network_apply_weights = network_apply_weights
    monkeypatch.setitem(sys.modules, "networks", module)
    return module


def _merged_layer():
    layer = nn.Linear(3, 2)
    layer.network_weights_backup = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)  # a LoRA merged in place
    layer.network_current_names = (("some-lora", 1.0, 1.0, None),)
    return layer


def test_fingerprints_read_the_base_weight_under_a_merged_lora():
    layer, plain = _merged_layer(), nn.Linear(3, 2)
    view = base_weight_view({"merged": layer, "plain": plain})
    assert torch.equal(view["merged"].weight, layer.network_weights_backup)
    assert view["plain"] is plain


def test_training_runs_without_the_lora_extensions_networks(monkeypatch):
    networks = _lora_extension(monkeypatch, ["some-lora"])
    layer = _merged_layer()
    with lora_extension_unloaded({"x": layer}):
        assert networks.loaded_networks == []
        assert torch.equal(layer.weight, layer.network_weights_backup)  # base weights while training
    assert networks.loaded_networks == ["some-lora"]  # merged again by the extension on its next use


class _Posterior:
    def __init__(self, mean):
        self.mean = mean

    def mode(self):
        return self.mean

    def sample(self):
        raise AssertionError("the training latents must be the posterior mean, not a sample")


class _VAE(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=dtype))
        self.seen = None

    def encode(self, x):
        self.seen = x.dtype
        return _Posterior(x[:, :1] * self.scale)


def _fake_host(vae, extra=()):
    host = A1111Host.__new__(A1111Host)
    sd_model = nn.Module()
    sd_model.first_stage_model = vae
    for i, module in enumerate(extra):
        sd_model.add_module(f"m{i}", module)
    sd_model.scale_factor = 0.18215
    host.sd_model, host.device, host.dtype, host._layers = sd_model, torch.device("cpu"), torch.float16, {}
    return host


def test_images_are_encoded_to_the_mean_in_the_vaes_dtype():
    vae = _VAE(torch.float64)  # e.g. --no-half-vae under an fp16 UNet
    host = _fake_host(vae)
    pixels = torch.rand(2, 3, 8, 8)
    latents = host.encode_images(pixels)
    assert vae.seen == torch.float64 and latents.dtype == torch.float32
    assert torch.allclose(latents, 0.18215 * pixels[:, :1])


def test_training_freezes_the_live_model_and_puts_it_back(monkeypatch):
    shared = types.ModuleType("modules.shared")
    shared.cmd_opts = SimpleNamespace(lowvram=False)  # training() refuses --lowvram (test_a1111_gpu_modes)
    monkeypatch.setitem(sys.modules, "modules", types.ModuleType("modules"))
    monkeypatch.setattr(sys.modules["modules"], "shared", shared, raising=False)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    trainable, frozen = nn.Linear(2, 2), nn.Linear(2, 2).requires_grad_(False)
    host = _fake_host(_VAE(torch.float32), [trainable, frozen])
    before = [p.requires_grad for p in host.sd_model.parameters()]
    with torch.no_grad(), host.training():
        assert not any(p.requires_grad for p in host.sd_model.parameters())
        assert torch.is_grad_enabled()
    assert [p.requires_grad for p in host.sd_model.parameters()] == before
