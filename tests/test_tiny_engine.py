"""The engine on the tiny SD-1.5-architecture model: orthogonality, composition, hooks."""

import pytest
import torch

from seqlora_core.method.bilevel import BilevelConfig, BilevelSolver, loss_and_gradients
from seqlora_core.method.lora import LoRAHooks
from seqlora_core.method.trainer import denoising_loss, train_concept

from conftest import quick_settings


def test_bases_stay_orthogonal_across_a_stream(stream_bank):
    assert [c.method for c in stream_bank.concepts] == ["seqlora", "alternating", "frozen-basis"]
    assert stream_bank.max_orthogonality_error() < 1e-6
    for c in stream_bank.concepts:
        for name, b in c.B.items():
            assert torch.isfinite(b).all() and b.norm() > 0.5  # a real basis, not collapsed
    rows = stream_bank.layer_table(4)
    assert all(r["used"] == 3 for r in rows)
    assert all(r["capacity"] == r["in_features"] // 4 for r in rows)


def test_training_learns_and_moves_both_factors(stream_bank):
    seq = stream_bank.concepts[0]
    assert any(a.abs().max() > 0 for a in seq.A.values())  # A started at 0
    frozen = stream_bank.concepts[2]
    assert frozen.final_loss is not None


def test_training_leaves_the_base_untouched(host, pixels):
    layers = host.linear_layers()
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    hooks_before = {n: len(m._forward_hooks) for n, m in layers.items()}
    token, px = next(iter(pixels.items()))
    train_concept(host, None, px, "<untouched>", "thing", quick_settings(steps=1, bilevel_iters=1))
    assert all(torch.equal(before[n], m.weight) for n, m in layers.items())
    assert {n: len(m._forward_hooks) for n, m in layers.items()} == hooks_before


def _noise_prediction(host, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    return host.predict_noise(x, torch.tensor([500]), cond)


def test_composition_equals_the_sum_of_residuals(host, stream_bank):
    """Hooks composing concepts {0, 1} give what weights W0 + Σ s_i A_i B_iᵀ give."""
    ids = [c.id for c in stream_bank.concepts[:2]]
    strengths = {ids[0]: 0.7, ids[1]: 1.3}
    emb = stream_bank.embeddings(ids)
    prompt = [f"a photo of {stream_bank.concepts[0].token} and {stream_bank.concepts[1].token}"]
    layers = host.linear_layers()
    with torch.no_grad():
        with LoRAHooks({n: layers[n] for n in stream_bank.layer_shapes()}) as hooks:
            hooks.set_composed(stream_bank.composed_factors(ids, strengths))
            hooked = _noise_prediction(host, host.encode_text(prompt, emb))
        base_pred = _noise_prediction(host, host.encode_text(prompt, emb))
        saved = {n: layers[n].weight.detach().clone() for n in stream_bank.layer_shapes()}
        try:
            for n in saved:
                delta = sum(strengths[c.id] * c.A[n] @ c.B[n].T for c in stream_bank.concepts[:2])
                layers[n].weight += delta
            merged = _noise_prediction(host, host.encode_text(prompt, emb))
        finally:
            for n, w in saved.items():
                layers[n].weight.copy_(w)
    assert torch.allclose(hooked, merged, atol=1e-5, rtol=1e-4)
    assert (hooked - base_pred).abs().max() > 1e-6  # the concepts do change the prediction


def test_cross_hessian_term_is_active_on_the_unet(host, pixels):
    """On the real architecture the bilevel hypergradient differs from the plain partial gradient."""
    layers = host.linear_layers()
    names = [n for n in layers if n.endswith("attn2.to_k")][:4]
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(layers[n].out_features, 2, generator=g) * 0.1 for n in names]
    b = [torch.linalg.qr(torch.randn(layers[n].in_features, 2, generator=g))[0] for n in names]
    latents = host.encode_images(next(iter(pixels.values()))[:1])
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([400])
    emb = host.init_embedding("cat")
    with LoRAHooks({n: layers[n] for n in names}) as hooks:
        def loss_fn(a_, b_, aux):
            hooks.bind(dict(zip(names, a_)), dict(zip(names, b_)))
            return denoising_loss(host, latents + noise, noise, t, ["a photo of <x>"], {"<x>": emb})
        cfg = BilevelConfig(method="seqlora", inner_steps=1, lr_a=50.0, lr_b=0.0, optimizer="sgd")
        solver = BilevelSolver(a, b, [], lambda v: list(v), cfg, host.differentiable_attention)
        grad_f, a_plus, _ = solver.hypergradient(loss_fn)
        partial = loss_and_gradients(loss_fn, a_plus, b, [], of=("b",))[1]["b"]
    diff = sum(float((x - y).norm()) for x, y in zip(grad_f, partial))
    scale = sum(float(y.norm()) for y in partial)
    assert diff > 1e-4 * scale


def test_flash_attention_has_no_double_backward_but_our_path_does(host):
    """Documents why the differentiable pass switches kernels (DESIGN §3, issue note)."""
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), q)
    with host.differentiable_attention():
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), q)
    assert torch.isfinite(h).all()


def test_stop_is_honoured_before_the_next_forward_pass(host, pixels):
    """The stop flag is read before every forward pass, so a stop lands inside the first
    minibatch (a minibatch is K bilevel iterations of several passes each), and nothing is returned."""
    from seqlora_core.method.trainer import Interrupted

    asked, steps = [], []

    def should_stop():
        asked.append(1)
        return len(asked) >= 3  # the third pass of the first bilevel iteration

    token, px = next(iter(pixels.items()))
    with pytest.raises(Interrupted):
        train_concept(host, None, px, "<stopped>", "thing", quick_settings(steps=3, bilevel_iters=2),
                      progress=lambda *a: steps.append(a), should_stop=should_stop)
    assert len(asked) == 3 and steps == []


def test_encoding_leaves_no_hooks_on_the_text_encoder(host, stream_bank):
    """Concept tokens are injected through hooks that exist only during one encode: a host's text
    encoder (A1111's is the one it generates with) carries none afterwards."""
    module = host.text_encoder.get_input_embeddings()
    before = (len(module._forward_pre_hooks), len(module._forward_hooks))
    with torch.no_grad():
        cond = host.encode_text([f"a photo of {stream_bank.concepts[0].token}"], stream_bank.embeddings())
    assert cond.shape[:2] == (1, 77)
    assert (len(module._forward_pre_hooks), len(module._forward_hooks)) == before == (0, 0)
