"""A1111's regional composition (``a1111/regional.py``) on a stand-in for A1111's ldm model.

A real A1111 is too large for CI (its suite, ``tests/integration/a1111``, runs the tab's regional
previews inside one). Here the same code runs on a small model with the interfaces it touches:
ldm's ``CrossAttention`` (``forward(x, context=None, mask=None)``, ``heads``, ``to_q/k/v``,
``to_out``), ``sd_model.get_learned_conditioning`` over a text encoder the bank adapts, and the
``CFGDenoiserParams`` A1111 hands its ``cfg_denoiser`` callbacks. What is checked is what the
issue asks of every surface: with confined residuals, changing one concept's factors leaves every
other region's features bit for bit unchanged; the rows A1111 batches are told apart; the
forwards and hooks are gone after the job.
"""
from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from a1111.regional import (CHUNK, RegionalComposition, RegionalRequest, StepInfo, conditional_rows, on_cfg_denoiser,
                            token_positions)
from seqlora_core.bank.format import Bank, Concept
from seqlora_core.errors import InputError
from seqlora_core.sampling.regions import Region

DIM, CTX, SIDE = 8, 6, 4  # channels, context width, latent side (16 positions)
PIXELS = SIDE * 8
LEFT, RIGHT = (0, 0, PIXELS // 2, PIXELS), (PIXELS // 2, 0, PIXELS, PIXELS)
WORDS = ["", "a", "photo", "of", "<left>", "<right>", "two", "things", "on", "table", "ugly", "and"]


class CrossAttention(nn.Module):
    """ldm.modules.attention.CrossAttention's interface (A1111 swaps the class's forward)."""

    def __init__(self, dim: int, context_dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, h = x.shape[0], self.heads
        q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, h * q.shape[-1])
        return self.to_out(out)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1, self.attn2 = CrossAttention(DIM, DIM), CrossAttention(DIM, CTX)
        self.ff = nn.Linear(DIM, DIM)

    def forward(self, x, context):
        x = x + self.attn1(x)
        x = x + self.attn2(x, context=context)
        return x + self.ff(x)


class TextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(len(WORDS), CTX)
        self.fc1 = nn.Linear(CTX, CTX)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), CHUNK, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            words = [WORDS.index(w) for w in prompt.lower().split()]
            ids[i, 1:1 + len(words)] = torch.tensor(words, dtype=torch.long)
        e = self.embed(ids)
        return e + self.fc1(e)


LAYERS = {  # canonical names (what a bank holds) → the stand-in's modules
    "text_encoder.text_model.encoder.layers.0.mlp.fc1": ("text", "fc1"),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": ("unet", "blocks.0.attn2.to_k"),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": ("unet", "blocks.0.attn2.to_v"),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": ("unet", "blocks.0.attn1.to_q"),
}


class SdModel:
    """What a1111.regional touches of A1111's ``shared.sd_model``."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        torch.manual_seed(0)
        unet = nn.Module()
        unet.blocks = nn.ModuleList([Block(), Block()])
        self.model = SimpleNamespace(diffusion_model=unet.to(dtype))
        self.text = TextEncoder().to(dtype)
        self.cond_stage_model = None

    def get_learned_conditioning(self, texts):
        return self.text(texts)

    def layers(self) -> dict[str, nn.Linear]:
        roots = {"text": self.text, "unet": self.model.diffusion_model}
        return {name: roots[root].get_submodule(path) for name, (root, path) in LAYERS.items()}

    def unet(self, x, context):
        for block in self.model.diffusion_model.blocks:
            x = block(x, context)
        return x


def _concept(ident: str, seed: int, spatial: bool) -> Concept:
    gen = torch.Generator().manual_seed(seed)
    shapes = {n: m for n, m in SdModel().layers().items() if spatial or "attn1" not in n}
    a = {n: 0.5 * torch.randn(m.out_features, 2, generator=gen) for n, m in shapes.items()}
    b = {n: torch.linalg.qr(torch.randn(m.in_features, 2, generator=gen))[0] for n, m in shapes.items()}
    return Concept(ident, f"<{ident}>", "cat", 2, "seqlora", a, b, torch.randn(1, CTX, generator=gen))


def _bank(spatial: bool = False) -> Bank:
    bank = Bank({"architecture": "sd15", "fingerprint": "stand-in"})
    for ident, seed in (("left", 1), ("right", 2)):
        bank = bank.with_concept(_concept(ident, seed, spatial))
    return bank


def _right_changed(bank: Bank) -> Bank:
    right = bank.get("right")
    return replace(bank, concepts=[bank.get("left"), replace(right, A={n: 3 * a for n, a in right.A.items()}, hash="")])


@pytest.fixture(autouse=True)
def a1111_devices(monkeypatch):
    """``modules.devices.autocast``, which the regional encoder enters, as A1111 defines it on CPU."""
    modules = types.ModuleType("modules")
    modules.devices = types.SimpleNamespace(autocast=contextlib.nullcontext)
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.devices", modules.devices)


def _picks(bank: Bank):
    return [SimpleNamespace(bank=bank, bank_path="b.safetensors", concept=i, strength=1.0) for i in ("left", "right")]


def _sample(bank: Bank, residuals: str, regions=None, prompt: str = "two things on a table", negative: str = "ugly",
            dtype: torch.dtype = torch.float32):
    """The first block's attn2 output (2, 16, DIM) — conditional row, then unconditional — of one
    CFG evaluation, batched as A1111 batches it, with the composition applied as A1111's extra
    network applies it (the model in ``dtype``, as A1111 runs it in half precision); and whether
    everything was undone after."""
    model = SdModel(dtype)
    regions = regions if regions is not None else [Region("a photo of <left>", box=LEFT),
                                                   Region("a photo of <right>", box=RIGHT)]
    request = RegionalRequest(regions, residuals, False, (PIXELS, PIXELS))
    composition = RegionalComposition(model, request, on_refusal=lambda why: None)
    composition.apply(_picks(bank), model.layers(), prompt, negative)
    cond, uncond = model.get_learned_conditioning([prompt]), model.get_learned_conditioning([negative])
    x = torch.randn(1, SIDE * SIDE, DIM, generator=torch.Generator().manual_seed(5)).to(dtype)
    x_in = torch.cat([x, x])
    on_cfg_denoiser(SimpleNamespace(text_cond=cond, text_uncond=uncond, x=torch.zeros(2, 4, SIDE, SIDE),
                                    denoiser=SimpleNamespace(step=0), sampling_step=0, total_sampling_steps=4))
    seen = []
    attn2 = model.model.diffusion_model.blocks[0].attn2
    handle = attn2.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        model.unet(x_in, torch.cat([cond, uncond]))
    handle.remove()
    composition.remove()
    undone = ("forward" not in vars(attn2) and not any(m._forward_hooks for m in model.layers().values()))
    return seen[0], undone


LEFT_POSITIONS = (torch.arange(SIDE * SIDE) % SIDE) < SIDE // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("spatial", [False, True], ids=["default-targets", "spatial-layers-too"])
def test_confined_regions_leave_every_other_region_bit_for_bit_unchanged(spatial, dtype):
    bank = _bank(spatial)
    before, undone = _sample(bank, "confined", dtype=dtype)
    after, _ = _sample(_right_changed(bank), "confined", dtype=dtype)
    assert undone, "the attn2 forwards and every hook are removed with the composition"
    assert torch.equal(before[0][LEFT_POSITIONS], after[0][LEFT_POSITIONS])  # conditional row, left region
    assert torch.equal(before[1][LEFT_POSITIONS], after[1][LEFT_POSITIONS])  # unconditional row: regional too
    assert not torch.allclose(before[0][~LEFT_POSITIONS], after[0][~LEFT_POSITIONS])  # the right region follows
    g_before, _ = _sample(bank, "global", dtype=dtype)
    g_after, _ = _sample(_right_changed(bank), "global", dtype=dtype)
    assert not torch.allclose(g_before[0][LEFT_POSITIONS], g_after[0][LEFT_POSITIONS])  # global: it bleeds


def test_regions_change_only_the_conditional_rows_with_global_residuals():
    plain, _ = _sample(_bank(), "global", regions=[])
    regional, _ = _sample(_bank(), "global")
    assert torch.equal(plain[1], regional[1])  # the negative prompt's row is not regional
    assert not torch.allclose(plain[0], regional[0])


def test_a_region_longer_than_one_chunk_is_refused_in_one_sentence():
    model = SdModel()
    model.get_learned_conditioning = lambda texts: torch.zeros(len(texts), 2 * CHUNK, CTX)
    request = RegionalRequest([Region("a photo of <left>", box=LEFT)], "confined", False, (PIXELS, PIXELS))
    with pytest.raises(InputError, match="longer than 75 tokens"):
        RegionalComposition(model, request, lambda why: None).apply(_picks(_bank()), model.layers(), "a", "")


def _info(rows: int, uncond: torch.Tensor, ambiguous: bool = False) -> StepInfo:
    return StepInfo(call=0, total=4, latent_hw=(SIDE, SIDE), rows=rows, uncond=uncond, ambiguous=ambiguous)


def test_conditional_rows_are_read_from_the_context_as_a1111_batches_it():
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 77, 4, generator=gen), torch.randn(1, 77, 4, generator=gen)
    batched = torch.cat([cond, uncond])  # batch_cond_uncond: conditional rows first
    assert conditional_rows(batched, _info(3, uncond)).tolist() == [True, True, False]
    assert conditional_rows(uncond, _info(3, uncond)).tolist() == [False]  # an unconditional call of its own
    assert conditional_rows(cond[:1], _info(3, uncond)).tolist() == [True]
    padded = torch.cat([cond[:1, :77], torch.randn(1, 77, 4, generator=gen)], 1)  # a long prompt, 154 tokens
    assert conditional_rows(torch.cat([padded, torch.cat([uncond, uncond], 1)]), _info(2, uncond)).tolist() \
        == [True, False]
    assert conditional_rows(torch.cat([uncond, uncond]).half(), _info(2, uncond)).tolist() == [False, False]
    # prompt and negative prompt alike: the batch layout decides, and a call of its own is conditional
    assert conditional_rows(torch.cat([uncond, uncond]), _info(2, uncond, ambiguous=True)).tolist() == [True, False]
    assert conditional_rows(uncond, _info(2, uncond, ambiguous=True)).tolist() == [True]


def test_token_positions_follow_a1111s_chunk_fixes():
    def fix(offset, name, vectors):
        return SimpleNamespace(offset=offset, embedding=SimpleNamespace(name=name, vectors=vectors))

    fixes = [fix(3, "<left>", 1), fix(6, "<right>", 2), fix(74, "<left>", 2)]
    positions = token_positions(fixes, {"left": "<left>", "right": "<right>", "other": "<other>"})
    assert positions == {"left": [4, 75], "right": [7, 8]}  # 76 is the chunk's EOS


HALVES = {"left": torch.tensor([[1.0, 1.0, 0.0, 0.0]] * SIDE), "right": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * SIDE)}
ALIKE = {"left": torch.arange(16.0).reshape(SIDE, SIDE), "right": torch.arange(16.0).reshape(SIDE, SIDE)}


@pytest.mark.parametrize("maps", [HALVES, ALIKE], ids=["separable", "alike"])
def test_automatic_regions_are_made_at_the_quarter_or_refused_once(maps):
    """At the quarter of the evaluations (4 steps: after the first) the maps become one confined
    region per concept; maps that cannot be told apart reach ``on_refusal`` once (A1111's extra
    network then interrupts the job) and the forwards stay the global prompt's."""
    model = SdModel()
    refusals = []
    chunk = SimpleNamespace(fixes=[SimpleNamespace(offset=o, embedding=SimpleNamespace(name=n, vectors=1))
                                   for o, n in ((2, "<left>"), (4, "<right>"))])
    model.cond_stage_model = SimpleNamespace(tokenize_line=lambda prompt: ([chunk], 5))
    request = RegionalRequest([], "confined", True, (PIXELS, PIXELS))
    composition = RegionalComposition(model, request, refusals.append)
    composition.apply(_picks(_bank()), model.layers(), "of <left> and <right>", "")
    attention = composition.attention
    assert attention.positions == {"left": [3], "right": [5]}
    states = []
    for call in range(3):
        if attention.maps is not None:
            attention.maps = {k: m.clone() for k, m in maps.items()}  # as the attn2 forwards would record them
        on_cfg_denoiser(SimpleNamespace(text_cond=torch.ones(1, 77, CTX), text_uncond=torch.zeros(1, 77, CTX),
                                        x=torch.zeros(2, 4, SIDE, SIDE), denoiser=SimpleNamespace(step=call),
                                        sampling_step=call, total_sampling_steps=4))
        states.append(attention.state)
    composition.remove()
    if maps is ALIKE:
        assert len(refusals) == 1 and "covers the same place" in refusals[0], refusals
        assert states == [None, None, None]
    else:
        assert refusals == [] and states[0] is None and states[1] is not None
        assert [r.concepts for r in attention.found] == [["left"], ["right"]]
        assert torch.equal(attention.found[0].mask, HALVES["left"])


def test_automatic_regions_need_the_prompt_to_name_a_concept():
    model = SdModel()
    request = RegionalRequest([], "confined", True, (PIXELS, PIXELS))
    with pytest.raises(InputError, match="names concepts by their tokens"):
        RegionalComposition(model, request, lambda why: None).apply(_picks(_bank()), model.layers(), "a photo", "")


def test_an_attn2_forward_another_extension_left_is_wrapped_and_put_back():
    model = SdModel()
    attn2 = model.model.diffusion_model.blocks[0].attn2
    calls = []

    def theirs(x, context=None, mask=None):
        calls.append(x.shape[0])
        return CrossAttention.forward(attn2, x, context=context, mask=mask)

    attn2.forward = theirs
    request = RegionalRequest([Region("a photo of <left>", box=LEFT)], "confined", False, (PIXELS, PIXELS))
    composition = RegionalComposition(model, request, lambda why: None)
    composition.apply(_picks(_bank()), model.layers(), "two things", "ugly")
    cond, uncond = model.get_learned_conditioning(["two things"]), model.get_learned_conditioning(["ugly"])
    on_cfg_denoiser(SimpleNamespace(text_cond=cond, text_uncond=uncond, x=torch.zeros(2, 4, SIDE, SIDE),
                                    denoiser=SimpleNamespace(step=0), sampling_step=0, total_sampling_steps=4))
    with torch.no_grad():
        model.unet(torch.randn(2, SIDE * SIDE, DIM), torch.cat([cond, uncond]))
    composition.remove()
    assert calls == [2, 1, 1]  # the global context for both rows, then the region's for each row
    assert vars(attn2)["forward"] is theirs


def test_a_long_negative_prompt_is_kept_whole_for_the_regions_unconditional_rows():
    """A1111 users' negative prompts often run past 75 tokens: each region's unconditional rows
    attend to all of it (here two chunks), not to its first chunk."""
    model = SdModel()
    plain = model.get_learned_conditioning

    def encode(texts):
        out = plain(texts)
        return torch.cat([out, out + 1], 1) if texts == ["ugly"] else out  # "ugly" encodes to two chunks

    model.get_learned_conditioning = encode
    request = RegionalRequest([Region("a photo of <left>", box=LEFT)], "confined", False, (PIXELS, PIXELS))
    composition = RegionalComposition(model, request, lambda why: None)
    composition.apply(_picks(_bank()), model.layers(), "two things", "ugly")
    state = composition.attention.state
    composition.remove()
    assert state.contexts.shape[1] == CHUNK and state.uncond_contexts.shape[1] == 2 * CHUNK


def test_automatic_regions_of_a_prompt_past_one_chunk_are_refused_not_lost():
    """The found regions' prompt is the whole prompt; past 75 tokens it cannot be a region. Raised
    inside A1111's callback the sentence would be swallowed: it must reach ``on_refusal``."""
    model = SdModel()
    plain = model.get_learned_conditioning
    model.get_learned_conditioning = lambda texts: torch.cat([plain(texts)] * 2, 1)
    chunk = SimpleNamespace(fixes=[SimpleNamespace(offset=o, embedding=SimpleNamespace(name=n, vectors=1))
                                   for o, n in ((2, "<left>"), (4, "<right>"))])
    model.cond_stage_model = SimpleNamespace(tokenize_line=lambda prompt: ([chunk, chunk], 80))
    refusals = []
    composition = RegionalComposition(model, RegionalRequest([], "confined", True, (PIXELS, PIXELS)), refusals.append)
    composition.apply(_picks(_bank()), model.layers(), "of <left> and <right>", "")
    for call in range(2):
        if composition.attention.maps is not None:
            composition.attention.maps = {k: m.clone() for k, m in HALVES.items()}
        on_cfg_denoiser(SimpleNamespace(text_cond=torch.ones(1, 154, CTX), text_uncond=torch.zeros(1, 154, CTX),
                                        x=torch.zeros(2, 4, SIDE, SIDE), denoiser=SimpleNamespace(step=call),
                                        sampling_step=call, total_sampling_steps=4))
    composition.remove()
    assert len(refusals) == 1 and "longer than 75 tokens" in refusals[0], refusals
