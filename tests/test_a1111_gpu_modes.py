"""The A1111 host under the set-ups A1111 users run on GPUs: half precision (its default), a
cross-attention optimisation without double backward (``--xformers``) and ``--medvram`` /
``--lowvram``. No A1111 and no GPU here: small fakes copy the few lines of A1111's and ldm's
behaviour that matter, each citing the upstream function it mirrors (A1111 v1.10.1,
AUTOMATIC1111/stable-diffusion-webui; ldm from Stability-AI/stablediffusion, which A1111 vendors
as repositories/stable-diffusion-stability-ai)."""
from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from a1111.host import A1111Host
from seqlora_core.errors import InputError
from seqlora_core.method.lora import LoRAHooks, lora_delta
from seqlora_core.method.trainer import differentiable_context, twice_differentiable


class GroupNorm32(nn.GroupNorm):
    """ldm/modules/diffusionmodules/util.py GroupNorm32, as is: the input goes up to fp32, the
    weight stays in the model's dtype."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class CrossAttention(nn.Module):
    """ldm/modules/attention.py CrossAttention's parameters; ``forward`` is whatever A1111's chosen
    optimisation assigned to the class (sd_hijack_optimizations.SdOptimization*.apply)."""

    def __init__(self, dim: int = 8, context_dim: int = 6, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x, context=None, mask=None, **kwargs):  # ldm's own: softmax(q kᵀ) v
        return _attention(self, x, context, lambda q, k, v: (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1) @ v)


def _attention(self, x, context, kernel):
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, h = x.shape[0], self.heads
    q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
    out = kernel(q, k, v).transpose(1, 2).reshape(b, -1, h * q.shape[-1])
    return self.to_out(out)


def scaled_dot_product_attention_forward(self, x, context=None, mask=None, **kwargs):
    """modules/sd_hijack_optimizations.py scaled_dot_product_attention_forward: torch SDPA."""
    return _attention(self, x, context, lambda q, k, v: F.scaled_dot_product_attention(q, k, v))


class _MemoryEfficientAttention(torch.autograd.Function):
    """Stands for xformers.ops.memory_efficient_attention: a fused kernel whose backward is not
    itself differentiable (xformers has no double backward)."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        with torch.enable_grad():
            return F.scaled_dot_product_attention(q, k, v).detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            return torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), grad)


def xformers_attention_forward(self, x, context=None, mask=None, **kwargs):
    """modules/sd_hijack_optimizations.py xformers_attention_forward (SdOptimizationXformers.apply)."""
    return _attention(self, x, context, _MemoryEfficientAttention.apply)


class ResBlock(nn.Module):
    """A block memory=checkpoint recomputes (named like ldm's openaimodel.ResBlock): a convolution
    and ldm's GroupNorm32. ``seen`` gets the fake autocast's depth at every call."""

    def __init__(self):
        super().__init__()
        self.norm = GroupNorm32(2, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.seen: list[int] = []

    def forward(self, x):
        devices = sys.modules.get("modules.devices")
        self.seen.append(devices.depth if devices is not None else -1)
        return x + self.conv(F.silu(self.norm(x)))


class FakeUNet(nn.Module):
    """The dtype path of ldm's UNetModel: convolutions, a GroupNorm32, cross-attention on the
    text conditioning."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.attn = CrossAttention()
        self.block = ResBlock()
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x, timesteps, context=None):
        h = self.conv_in(x)
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        h = h + self.attn(tokens, context=context).transpose(1, 2).reshape(b, c, hh, ww)
        return self.out(self.block(h))


class DiffusionWrapper(nn.Module):
    """ldm/models/diffusion/ddpm.py DiffusionWrapper.forward, conditioning_key 'crossattn'."""

    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, c_crossattn=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class LatentDiffusion(nn.Module):
    """ldm/models/diffusion/ddpm.py LatentDiffusion.apply_model with a tensor conditioning."""

    def __init__(self, unet, text_encoder=None):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        self.cond_stage_model = nn.Module()
        if text_encoder is not None:
            self.cond_stage_model.transformer = text_encoder

    def apply_model(self, x_noisy, t, cond):
        return self.model(x_noisy, t, c_crossattn=[cond])


class CudaAutocast(TorchFunctionMode):
    """What A1111's ``devices.autocast()`` returns on a CUDA GPU, ``torch.autocast("cuda")``, does
    to ldm's GroupNorm32: group_norm is on CUDA autocast's fp32 list, so the fp16 weight meets the
    fp32 input in fp32. CPU autocast cannot stand in: its policy leaves group_norm alone (torch
    2.13: the mixed-dtype error below persists under torch.autocast("cpu") in fp16 and in bf16), so
    this mode does exactly that one cast, and counts how deep it is entered."""

    def __init__(self, devices):
        super().__init__()
        self.devices = devices

    def __enter__(self):
        self.devices.entered += 1
        self.devices.depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self.devices.depth -= 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.group_norm, torch.group_norm):
            args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


@pytest.fixture
def a1111(monkeypatch):
    """Fake ``modules.devices`` / ``modules.shared`` / ``modules.sd_hijack_optimizations`` and
    ``ldm.modules.attention`` (CrossAttention with ldm's own forward), as sys.modules entries."""
    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    devices = module("modules.devices", device=torch.device("cpu"), entered=0, depth=0)
    devices.autocast = lambda disable=False: CudaAutocast(devices)
    shared = module("modules.shared", cmd_opts=SimpleNamespace(lowvram=False, medvram=False))
    optimizations = module("modules.sd_hijack_optimizations",
                           scaled_dot_product_attention_forward=scaled_dot_product_attention_forward,
                           xformers_attention_forward=xformers_attention_forward)
    module("modules", devices=devices, shared=shared, sd_hijack_optimizations=optimizations)
    attention = module("ldm.modules.attention", CrossAttention=CrossAttention)
    module("ldm.modules", attention=attention)
    module("ldm", modules=sys.modules["ldm.modules"])
    monkeypatch.setattr(CrossAttention, "forward", CrossAttention.forward)  # restored after each test
    return SimpleNamespace(devices=devices, shared=shared)


def _host(unet, dtype, device=torch.device("cpu"), text_encoder=None):
    host = A1111Host.__new__(A1111Host)
    host.sd_model = LatentDiffusion(unet, text_encoder)
    host.unet, host.text_encoder = unet, text_encoder
    host.device, host.dtype, host._layers = device, dtype, {}
    return host


def _inputs(generator_seed: int = 0):
    g = torch.Generator().manual_seed(generator_seed)
    noisy = torch.randn(2, 4, 4, 4, generator=g)
    cond = torch.randn(2, 3, 6, generator=g).requires_grad_()
    return noisy, torch.tensor([10, 500]), cond


# --- (1) half precision: A1111's autocast around the host's passes -----------------------------

def test_ldm_groupnorm32_in_fp16_raises_outside_autocast_on_the_cpu():
    """The failure the host has to avoid, reproduced here: an fp16 GroupNorm32 called as ldm
    calls it (fp32 input, fp16 weight) raises torch's mixed-dtype error, with or without CPU
    autocast. On CUDA, A1111 only ever runs it inside torch.autocast("cuda")."""
    norm, x = GroupNorm32(2, 8).half(), torch.randn(1, 8, 2, 2).half()
    with pytest.raises(RuntimeError, match="mixed dtype"):
        norm(x)
    with pytest.raises(RuntimeError, match="mixed dtype"), torch.autocast("cpu", dtype=torch.float16):
        norm(x)


def test_a_half_unet_pass_runs_inside_a1111s_autocast(a1111):
    unet = FakeUNet().half().requires_grad_(False)
    seen = []
    unet.register_forward_pre_hook(lambda *_: seen.append(a1111.devices.depth))
    host = _host(unet, torch.float16)
    noisy, t, cond = _inputs()
    pred = host.predict_noise(noisy, t, cond)
    loss = pred.float().pow(2).mean()
    grad, = torch.autograd.grad(loss, cond)
    assert seen == [1] and a1111.devices.depth == 0  # entered around the pass, left after it
    assert pred.shape == noisy.shape and torch.isfinite(grad).all()


def test_the_text_encoder_pass_runs_inside_a1111s_autocast(a1111):
    host = _host(FakeUNet(), torch.float16, text_encoder=nn.Linear(6, 6).half())
    calls = []

    def encode(text_encoder, prompts, embeddings, device):
        calls.append((a1111.devices.depth, device))
        return torch.zeros(len(prompts), 77, 6)

    host.tokens = SimpleNamespace(encode=encode)
    host.encode_text(["a photo of <x>"], {})
    assert calls == [(1, host.device)]


def test_the_twice_differentiated_pass_composes_with_a1111s_autocast(a1111):
    """The pass differentiated twice enters Fp32Normalisation (half model) and the host's
    attention context outside the host's own autocast: together they give finite second-order
    gradients through the fp16 GroupNorm32."""
    host = _host(FakeUNet().half().requires_grad_(False), torch.float16)
    noisy, t, cond = _inputs()
    with twice_differentiable(host)():
        loss = host.predict_noise(noisy, t, cond).float().pow(2).mean()
        grad, = torch.autograd.grad(loss, cond, create_graph=True)
        second, = torch.autograd.grad(grad.pow(2).sum(), cond)
    assert a1111.devices.depth == 0 and torch.isfinite(second).all() and second.abs().sum() > 0


def test_checkpoint_recomputations_run_inside_a1111s_autocast_too(a1111):
    """memory=checkpoint recomputes the UNet's blocks during the backward passes, outside
    ``predict_noise``: they re-enter the pass's context, which holds A1111's autocast too, so they
    compute in the dtypes the pass computed in."""
    unet = FakeUNet().half().requires_grad_(False)
    host = _host(unet, torch.float16)
    context, checkpointing = differentiable_context(host, "checkpoint")
    noisy, t, cond = _inputs()
    with LoRAHooks({}) as hooks, checkpointing:
        checkpointing.hooks = hooks
        with context():
            loss = host.predict_noise(noisy, t, cond).float().pow(2).mean()
            grad, = torch.autograd.grad(loss, cond, create_graph=True)
        second, = torch.autograd.grad(grad.pow(2).sum(), cond)  # recomputes the block twice more
    assert len(unet.block.seen) >= 3 and min(unet.block.seen) >= 1, unet.block.seen
    assert torch.isfinite(second).all()


def test_the_lora_branch_stays_fp32_inside_an_autocast():
    """A1111 runs the passes inside torch.autocast, which would compute the LoRA residual's
    matmuls in the low precision; the residual is computed in fp32 there too (lora.lora_delta)."""
    g = torch.Generator().manual_seed(0)
    x, b, a = torch.randn(4, 16, generator=g), torch.randn(16, 3, generator=g), torch.randn(8, 3, generator=g) * 1e-3
    plain = lora_delta(x, a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = lora_delta(x, a, b)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)


# --- (4) xformers: the twice-differentiated pass on A1111's SDP attention -----------------------

def _second_order(module, x, context):
    out = module(x, context=context)
    grad, = torch.autograd.grad(out.pow(2).sum(), context, create_graph=True)
    second, = torch.autograd.grad(grad.pow(2).sum(), context)
    return second


def test_xformers_attention_is_routed_through_a1111s_sdp_forward_for_the_double_backward(a1111):
    ldm_forward = CrossAttention.forward
    CrossAttention.forward = xformers_attention_forward  # as SdOptimizationXformers.apply does
    attn = CrossAttention().requires_grad_(False)
    x, context = torch.randn(1, 5, 8), torch.randn(1, 3, 6, requires_grad=True)
    with pytest.raises(RuntimeError):  # what --xformers gives a double backward (torch: "not ... used in the graph")
        _second_order(attn, x, context)
    host = _host(FakeUNet(), torch.float32)
    with host.differentiable_attention():
        routed = _second_order(attn, x, context)
    assert CrossAttention.forward is xformers_attention_forward  # the ordinary passes keep it
    CrossAttention.forward = ldm_forward
    assert torch.allclose(routed, _second_order(attn, x, context), atol=1e-6)  # the same attention


def test_the_selected_optimisation_is_back_after_the_pass_even_when_it_fails(a1111):
    CrossAttention.forward = xformers_attention_forward
    host = _host(FakeUNet(), torch.float32)
    with pytest.raises(ValueError), host.differentiable_attention():
        raise ValueError("a pass that fails")
    assert CrossAttention.forward is xformers_attention_forward


# --- (5) --medvram / --lowvram: A1111's device and its send_me_to_gpu hooks ---------------------

def _medvram(sd_model, devices):
    """modules/lowvram.py setup_for_low_vram(sd_model, use_medvram=True), the SD-1.5 parts: a
    forward pre-hook on the text encoder and on ``sd_model.model`` (the DiffusionWrapper) moves
    that module to ``devices.device`` and the one there before back to the CPU."""
    state = {"in_gpu": None, "sent": []}
    parents = {sd_model.cond_stage_model.transformer: sd_model.cond_stage_model}

    def send_me_to_gpu(module, _):
        module = parents.get(module, module)
        if state["in_gpu"] is module:
            return
        if state["in_gpu"] is not None:
            state["in_gpu"].to(torch.device("cpu"))
        module.to(devices.device)
        state["in_gpu"] = module
        state["sent"].append(module)

    sd_model.cond_stage_model.transformer.register_forward_pre_hook(send_me_to_gpu)
    sd_model.model.register_forward_pre_hook(send_me_to_gpu)
    return state


def test_the_host_works_on_a1111s_device_not_on_its_first_weights(a1111):
    """Under --medvram / --lowvram the UNet's weights wait on the CPU between uses; A1111's device
    (``devices.device``, the GPU; ``meta`` stands in for it here) is where the passes run."""
    a1111.devices.device = torch.device("meta")
    unet, text_encoder = FakeUNet(), nn.Linear(6, 6)
    wrapped = SimpleNamespace(tokenizer=object(), transformer=text_encoder)
    text_encoder.get_input_embeddings = lambda: nn.Embedding(10, 6)
    sd_model = LatentDiffusion(unet, text_encoder)
    sd_model.cond_stage_model.wrapped = wrapped
    host = A1111Host(sd_model)
    assert next(unet.parameters()).device.type == "cpu" and host.device == torch.device("meta")


def test_under_medvram_the_unet_pass_fires_a1111s_hook_and_runs_on_its_device(a1111):
    a1111.devices.device = torch.device("meta")
    unet = FakeUNet().requires_grad_(False)
    host = _host(unet, torch.float32, device=torch.device("meta"), text_encoder=nn.Linear(6, 6))
    state = _medvram(host.sd_model, a1111.devices)
    noisy, t, cond = _inputs()
    pred = host.predict_noise(noisy, t, cond)
    assert state["sent"] == [host.sd_model.model]  # the UNet went to the GPU the way sampling sends it
    assert pred.device.type == "meta" and next(unet.parameters()).device.type == "meta"


def test_training_is_refused_under_lowvram_as_a1111s_own_training_refuses_it(a1111):
    a1111.shared.cmd_opts.lowvram = True
    host = _host(FakeUNet(), torch.float16)
    with pytest.raises(InputError) as info, host.training():
        pass
    assert "--medvram" in str(info.value) and "\n" not in str(info.value)
