"""memory=checkpoint and memory=slice: the twice-differentiated pass checkpointed or with sliced
attention gives the plain pass's gradients.

The double backward of the cross-Hessian product runs after the inner steps and the pass at A⁺
have re-bound the LoRA factors, and a non-reentrant checkpoint recomputes its blocks once per
backward call, so that product recomputes every block *after* the re-binding. These tests count
those recomputations (so the equality below is not reached by skipping them), compare the
hypergradient, the projected B step and the A step with the un-checkpointed ones on ``tiny``
(fp32 and bf16), and show the two ways a naive checkpoint fails: recomputing with the factors
bound at the time of the product (silently different gradients) and recomputing outside the
pass's context (torch's CheckpointError). Sliced attention (queries in chunks) is checked the
same way, alone and inside the checkpointed blocks.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointError

import seqlora_core.method.trainer as trainer
from seqlora_core.hosts.diffusers_host import DiffusersHost
from seqlora_core.hosts.protocol import math_attention
from seqlora_core.method.attention_slicing import SlicedAttention
from seqlora_core.method.bilevel import BilevelConfig, BilevelSolver
from seqlora_core.method.checkpointing import BlockCheckpointing, checkpoint_blocks
from seqlora_core.method.lora import LoRAHooks
from seqlora_core.method.precision import LossScale
from seqlora_core.method.targets import select_layers
from seqlora_core.method.trainer import denoising_loss, train_concept, twice_differentiable

from conftest import quick_settings


def rel(x, y) -> float:
    num = sum(float((xi.detach().double() - yi.detach().double()).norm() ** 2) for xi, yi in zip(x, y)) ** 0.5
    den = sum(float(yi.detach().double().norm() ** 2) for yi in y) ** 0.5
    assert den > 0
    return num / den


def tiny_problem(dtype: torch.dtype):
    host = DiffusersHost.load("tiny", "cpu", dtype)
    layers = select_layers(host.linear_layers(), "default")
    names = list(layers)
    g = torch.Generator().manual_seed(0)
    wide = torch.float64 if dtype == torch.float64 else torch.float32  # the factors: fp32, or fp64 for a fp64 model
    a0 = [torch.randn(layers[n].out_features, 4, generator=g, dtype=wide) * 0.05 for n in names]
    b0 = [torch.linalg.qr(torch.randn(layers[n].in_features, 4, generator=g, dtype=wide))[0] for n in names]
    latents, noise = (torch.randn(1, 4, 8, 8, generator=g, dtype=wide) for _ in range(2))
    return dtype, host, layers, names, a0, b0, latents, noise


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def tiny(request):
    return tiny_problem(request.param)


def run(tiny, checkpoint: str | None, hypergradient="paper", low_memory=False, optimizer="sgd", slice_queries=0):
    """The hypergradient, then one full seqlora iteration, from the same start.
    ``checkpoint``: None, "captured" (ours), "unbound" (recompute with whatever is bound at the
    time), "no-context" (recompute outside the math-attention / fp32-norm context)."""
    dtype, host, layers, names, a0, b0, latents, noise = tiny
    counts = {"forward": 0}
    probe = layers[next(n for n in names if n.startswith("unet."))]
    counter = probe.register_forward_hook(lambda *_: counts.__setitem__("forward", counts["forward"] + 1))
    cfg = BilevelConfig(method="seqlora", inner_steps=2, lr_a=1e-2, lr_b=1e-2, lr_embedding=1e-2,
                        optimizer=optimizer, hypergradient=hypergradient, low_memory=low_memory)
    with contextlib.ExitStack() as stack:
        stack.callback(counter.remove)
        hooks = stack.enter_context(LoRAHooks(layers))
        ckpt = None
        if checkpoint is not None:
            recompute_ctx = (contextlib.nullcontext if checkpoint == "no-context"
                             else twice_differentiable(host, None, slice_queries))
            ckpt = stack.enter_context(BlockCheckpointing(checkpoint_blocks(host.unet), recompute_ctx,
                                                          None if checkpoint == "unbound" else hooks))

        def loss_fn(a, b, embedding):
            hooks.bind(dict(zip(names, a)), dict(zip(names, b)))
            return denoising_loss(host, latents + noise, noise, torch.tensor([400]), ["a photo of <x>"],
                                  {"<x>": embedding[0]})

        solver = BilevelSolver(a0, b0, [host.init_embedding("cat").to(a0[0].dtype)], lambda v: list(v), cfg,
                               twice_differentiable(host, ckpt, slice_queries), LossScale(dtype))
        grad_f, a_plus, _ = solver.hypergradient(loss_fn)
        forwards = counts["forward"]
        solver.iterate(loss_fn)
    assert solver.skipped_steps == 0
    return {"hypergradient": grad_f, "A⁺": a_plus,
            "B step": [b - b_0 for b, b_0 in zip(solver.b, b0)],
            "A step": [a - a_0 for a, a_0 in zip(solver.a, a0)]}, forwards


@pytest.mark.parametrize("hypergradient,low_memory", [("paper", False), ("paper", True), ("unrolled", False)],
                         ids=["paper", "low", "unrolled"])
def test_checkpointed_pass_gives_the_same_gradients_and_steps(tiny, hypergradient, low_memory):
    dtype = tiny[0]
    reference, plain_forwards = run(tiny, None, hypergradient, low_memory)
    checked, forwards = run(tiny, "captured", hypergradient, low_memory)
    # recomputed once in the first backward and once more in the double backward, per kept pass
    kept = 2 if hypergradient == "unrolled" else 1
    assert forwards == plain_forwards + 2 * kept
    tol = 1e-6 if dtype == torch.float32 else 1e-5
    for key, ref in reference.items():
        assert all(torch.isfinite(t).all() for t in checked[key]), key
        assert rel(checked[key], ref) < tol, (key, rel(checked[key], ref))


# reached (relative error against the unsliced pass): fp64 0 (slices change no sum of a fp64 BLAS
# here); fp32 ≈ 2e-3 on the hypergradient — the backward sums the gradients to keys and values
# over the slices in another order (≈ 3e-5 on ∇_A and H_BA[v]), and the hypergradient
# ∇_B L(A⁺) − H_BA[α∇_A L(A⁺)] is a difference of nearby terms on this random model
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-2)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("checkpoint", [None, "captured"], ids=["sliced", "sliced+checkpointed"])
def test_sliced_attention_gives_the_same_gradients_and_steps(dtype, tol, checkpoint, monkeypatch):
    problem = tiny_problem(dtype)
    calls = {"sliced": 0}

    class Counting(SlicedAttention):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention and args[0].shape[-2] > self.chunk:
                calls["sliced"] += 1
            return super().__torch_function__(func, types, args, kwargs)

    reference, _ = run(problem, None)
    monkeypatch.setattr(trainer, "SlicedAttention", Counting)
    sliced, _ = run(problem, checkpoint, slice_queries=16)
    assert calls["sliced"] > 0  # the 64-token layers of tiny at 64 px ran in slices of 16 queries
    for key, ref in reference.items():
        print(dtype, key, rel(sliced[key], ref))
        assert rel(sliced[key], ref) < tol, (key, rel(sliced[key], ref))


def test_sliced_sdpa_equals_sdpa_to_the_second_derivative():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (50, 30))
    v = torch.randn(2, 3, 30, 8, generator=g, dtype=torch.float64)
    mask = torch.randn(50, 30, generator=g, dtype=torch.float64)

    def derivatives(context):
        with math_attention(), context:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            (gq,) = torch.autograd.grad((out ** 3).sum(), q, create_graph=True)
        (gk,) = torch.autograd.grad((gq ** 2).sum(), k)
        return out, gq, gk

    for plain, sliced in zip(derivatives(contextlib.nullcontext()), derivatives(SlicedAttention(7))):
        assert torch.allclose(plain, sliced, rtol=1e-12, atol=1e-12)


def test_recomputing_with_the_factors_bound_later_would_be_wrong(tiny):
    """The re-binding between the pass and the product is real: a checkpoint that does not
    capture the factors gives a different hypergradient (so the test above can fail)."""
    if tiny[0] != torch.float32:
        pytest.skip("one dtype shows it")
    reference, _ = run(tiny, None)
    unbound, _ = run(tiny, "unbound")
    assert rel(unbound["A⁺"], reference["A⁺"]) < 1e-6  # the first backward recomputes before any re-binding
    assert rel(unbound["hypergradient"], reference["hypergradient"]) > 1e-3


def test_recomputing_outside_the_pass_context_is_what_torch_rejects(tiny):
    """diffusers' own gradient checkpointing failed this way: the double backward recomputes
    with the default attention kernel, which saves other tensors than the math kernel."""
    if tiny[0] != torch.float32:
        pytest.skip("one dtype shows it")
    with pytest.raises(CheckpointError):
        run(tiny, "no-context")


def test_training_with_memory_checkpoint_gives_the_same_concept(host, pixels, monkeypatch):
    """Through the trainer (the hooks handed to the checkpointing, the blocks restored after).
    low+checkpoint is compared with low: low's first inner step comes from a plain pass (fused
    attention), not from the kept one (math kernel), so it differs from default in rounding."""
    px = next(iter(pixels.values()))
    monkeypatch.setattr(SlicedAttention, "default_chunk", 16)  # tiny's largest layers have 64 tokens
    concepts = {}
    for memory in ("default", "checkpoint", "low", "low+checkpoint", "checkpoint+slice"):
        settings = quick_settings("seqlora", steps=2, bilevel_iters=1, optimizer="sgd", memory=memory, stats_q=0)
        concepts[memory] = train_concept(host, None, px, "<ck>", "dog", settings).concept
    # checkpointing alone is exact here; slicing sums in another order (fp32: see the sliced test)
    for memory, plain, tol in (("checkpoint", "default", 1e-6), ("low+checkpoint", "low", 1e-6),
                               ("checkpoint+slice", "default", 1e-3)):
        c, ref = concepts[memory], concepts[plain]
        assert c.settings["memory"] == memory
        assert rel(list(c.A.values()), list(ref.A.values())) < tol
        e0 = host.init_embedding("dog")
        assert rel([c.embedding - e0], [ref.embedding - e0]) < 10 * tol
        assert max(float((c.B[n] - ref.B[n]).abs().max()) for n in ref.B) < tol / 10  # B moves by ~1e-3
    # the blocks are restored after training
    assert all("forward" not in block.__dict__ for block in checkpoint_blocks(host.unet))
