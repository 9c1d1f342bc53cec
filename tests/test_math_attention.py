"""The twice-differentiated pass's attention kernel is scoped to the calling thread (issue 19
item 6c). torch's ``sdpa_kernel`` flips process-wide flags (torch 2.13,
torch/nn/attention/__init__.py: ``_sdpa_kernel`` calls ``torch._C._set_sdp_use_flash`` …), so a
generation in another thread — ComfyUI and A1111 run them in worker threads — would have lost its
fused kernels while a training pass ran."""
import threading

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from seqlora_core.hosts.protocol import math_attention


def _qkv(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, 8, 4, generator=gen, requires_grad=True) for _ in range(3)]


def _grad_of_grad(q, k, v, **kwargs):
    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    return torch.autograd.grad(g.sum(), k)[0]


def _double_backward_works(q, k, v) -> bool:
    try:
        _grad_of_grad(q, k, v)
        return True
    except RuntimeError:  # the fused CPU kernel: "derivative ... not implemented"
        return False


def test_math_attention_is_torch_math_kernel_with_double_backward():
    q, k, v = _qkv()
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 0] = True
    for kwargs in ({}, {"attn_mask": mask, "scale": 0.3}, {"attn_mask": mask.float() - 1, "is_causal": False}):
        with math_attention():
            ours = _grad_of_grad(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs)
        with sdpa_kernel([SDPBackend.MATH]):
            torchs = _grad_of_grad(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs)
        for a, b in zip(ours, torchs):
            assert torch.allclose(a, b, atol=1e-6)


def test_another_thread_keeps_its_kernels_while_a_pass_runs():
    inside, seen, errors = threading.Event(), threading.Event(), []
    outside = _double_backward_works(*_qkv())
    observed = {}

    def generation():
        inside.wait()
        try:
            observed["flags"] = (torch.backends.cuda.flash_sdp_enabled(),
                                 torch.backends.cuda.mem_efficient_sdp_enabled())
            observed["double_backward"] = _double_backward_works(*_qkv(2))  # routed as outside
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        seen.set()

    worker = threading.Thread(target=generation)
    worker.start()
    with math_attention():
        inside.set()
        assert seen.wait(60)
        assert _double_backward_works(*_qkv(3))  # this thread's pass is on the math kernel
    worker.join()
    assert not errors
    assert observed["flags"] == (True, True)
    assert observed["double_backward"] == outside
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


def test_math_attention_follows_autocast_like_torch_sdpa():
    """Inside autocast (A1111's half-precision passes) SDPA's inputs are cast by autocast; the
    aten math op is not on autocast's list, so the mode casts as autocast would."""
    q, k, v = (t.detach() for t in _qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with math_attention():
            ours = F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel([SDPBackend.MATH]):
            torchs = F.scaled_dot_product_attention(q, k, v)
    assert ours.dtype == torchs.dtype == torch.bfloat16
    assert torch.allclose(ours.float(), torchs.float(), atol=1e-2)
