"""Regional composition inside A1111's txt2img: boxes, confined residuals and automatic regions.

The tab's Compose page previews through A1111's own txt2img (``a1111.preview``); with regions it
hands a :class:`RegionalRequest` to the ``<seqlora:…>`` extra network on the processing object
(``p.seqlora_regional``), and the extra network composes with :class:`RegionalComposition`
instead of the plain one. The maths is the core's, unchanged — ``sampling.regions`` (the blend
of each region's cross-attention), ``sampling.confined`` (each context with only the concepts it
names) and ``sampling.auto_regions`` (regions from the concept tokens' attention) — so a
region means in A1111 what it means on the command line. What is A1111's here:

* **The attention.** Every attn2 ``CrossAttention`` of A1111's ldm UNet gets an *instance*
  ``forward`` (removed after the job) that calls the class's forward — the cross-attention
  optimisation the user selected (xformers, SDP, sub-quadratic, …) — once for the global
  context and once per region, and blends the outputs. The class's forward includes ``to_out``,
  which is affine, so blending after it equals blending before it.
* **Which rows are conditional.** A1111's CFG denoiser batches the conditional rows first and the
  unconditional ones last, or runs them in separate calls (its ``batch_cond_uncond`` setting
  off, which saves memory), or drops the unconditional ones at some steps (NGMS). A row is read as
  unconditional when its context *is* the negative prompt's, which the ``cfg_denoiser`` callback
  hands over at every step; only when the prompt and the negative prompt encode alike does the
  batch layout decide.
* **Confinement.** The global prompt and the negative one are encoded by A1111 itself
  (``setup_conds``, after the extra network activates) while the text-encoder hooks hold the
  global prompt's concepts; each region's prompt, and the negative prompt for its unconditional
  rows, is encoded with ``sd_model.get_learned_conditioning`` under that region's set. Spatial
  layers (the ``full`` targets) carry ``sampling.confined.SpatialConfinement``.
* **Automatic regions.** During the first quarter of the model evaluations the attn2 forward also
  adds the conditional rows' attention to each concept token (its positions from A1111's own
  tokenisation: where its embedding is placed in the first 75-token chunk) to that concept's
  map; at the quarter the core makes the regions, and the rest of the steps are regional,
  confined — one sampling run, as on the command line. When the maps cannot be told apart the
  job is interrupted and the core's sentence is the answer.
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from seqlora_core.bank.format import Bank
from seqlora_core.errors import InputError
from seqlora_core.method.lora import LoRAHooks
from seqlora_core.sampling.auto_regions import (AUTO_SHARE, add_attention_maps, concepts_to_find, found_regions,
                                                require_positions)
from seqlora_core.sampling.confined import GLOBAL, SpatialConfinement, check_mode, context_concepts, split_layers
from seqlora_core.sampling.regions import Region, RegionalState, region_masks, regional_cross_attention

CHUNK = 77  # tokens of one A1111 prompt chunk (BOS, 75 tokens, EOS)


@dataclass
class RegionalRequest:
    """What the Compose page asks for (``seqlora_ui.tab.regional_options``), at ``pixel_hw``."""
    regions: list[Region]
    residuals: str
    auto_regions: bool
    pixel_hw: tuple[int, int]


@dataclass
class StepInfo:
    """What the ``cfg_denoiser`` callback tells about the model evaluation about to run."""
    call: int  # model evaluations of this sampling run before this one (CFGDenoiser.step)
    total: int  # sampling steps of the run
    latent_hw: tuple[int, int]
    rows: int  # rows of the batched evaluation (conditional, then unconditional)
    uncond: Tensor  # (n_uncond, T, d): the negative prompt's conditioning
    ambiguous: bool  # the prompt's conditioning equals the negative one's: rows by layout


def conditional_rows(context: Tensor, info: StepInfo) -> Tensor:
    """(b,) bool: which rows of an attn2 call are conditional (see the module docstring)."""
    b = context.shape[0]
    if info.ambiguous:
        if b == info.rows:  # one batched evaluation: A1111 puts the unconditional rows last
            return torch.arange(b) < b - info.uncond.shape[0]
        return torch.ones(b, dtype=torch.bool)
    t = min(context.shape[1], info.uncond.shape[1])  # A1111 may pad either to the other's length
    negative = info.uncond[:, :t].to(context.device, context.dtype)
    return torch.tensor([not any(torch.equal(context[i, :t], n) for n in negative) for i in range(b)])


def token_positions(fixes: Sequence, tokens: dict[str, str]) -> dict[str, list[int]]:
    """Concept id → the positions of its vectors in a prompt's first 77-token window, from the
    first chunk's ``fixes`` (A1111's ``PromptChunkFix(offset, embedding)``: the embedding's
    vectors start after the BOS token at ``offset``). ``tokens``: concept id → its token."""
    out: dict[str, list[int]] = {}
    for ident, token in tokens.items():
        where = [fix.offset + 1 + k for fix in fixes if fix.embedding.name == token
                 for k in range(int(fix.embedding.vectors)) if fix.offset + 1 + k < CHUNK - 1]
        if where:
            out[ident] = where
    return out


@dataclass
class RegionalAttention:
    """The attn2 forwards' shared state for one job: the regions once known, the maps while
    finding them, the step the sampler is at. ``encode(key, texts)`` encodes prompts with the
    concept set ``key`` (a region's index); ``define(key, ids)`` defines that set."""
    request: RegionalRequest
    confine: Callable[[object], contextlib.AbstractContextManager] | None
    encode: Callable[[object, list[str]], Tensor]
    define: Callable[[object, list[str]], None]
    sets_for: Callable[[list[Region]], dict]  # regions → set key (GLOBAL or index) → concept ids
    prompt: str
    negative: str
    state: RegionalState | None = None
    step: StepInfo | None = None
    # automatic regions: concept → token positions, and their maps while recording
    positions: dict[str, list[int]] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    maps: dict[str, Tensor] | None = None
    found: list[Region] = field(default_factory=list)
    refused: str | None = None
    spatial: SpatialConfinement | None = None
    _rows: tuple | None = None  # (the context of the UNet call under way, its conditional rows)
    _patched: dict = field(default_factory=dict)  # attn2 module → the instance forward it had, or None

    # the sampler's side ------------------------------------------------------------------------
    def on_step(self, info: StepInfo) -> None:
        """Called before every model evaluation; makes the automatic regions at the quarter."""
        self.step, self._rows = info, None
        if self.state is not None:
            self.state.latent_hw = info.latent_hw
        if self.maps is not None and self.maps_done(info):
            self.regions_from_maps()

    def maps_done(self, info: StepInfo) -> bool:
        return info.call >= max(1, round(info.total * AUTO_SHARE)) and any(float(m.max()) > 0 for m in self.maps.values())

    def regions_from_maps(self) -> None:
        maps, self.maps = self.maps, None
        try:  # inside A1111's callback, which would swallow an exception: a refusal is kept instead
            self.found = found_regions(maps, self.prompt, self.names, self.request.regions, self.request.pixel_hw)
            self.begin_regions(list(self.request.regions) + self.found)
        except InputError as exc:
            self.refused = str(exc)

    def begin_regions(self, regions: list[Region]) -> None:
        """From now on the attn2 forwards are regional over ``regions`` (confined: each region's
        prompt and negative prompt encoded with its own set, which ``define`` makes). No region:
        the forwards stay the global prompt's."""
        if not regions:
            return
        confined = self.confine is not None
        sets = self.sets_for(regions)
        contexts, negatives = [], []
        for r, region in enumerate(regions):
            if confined:
                self.define(r, sets[r])
            context = self.encode(r, [region.prompt])
            if context.shape[1] != CHUNK:
                raise InputError(f"Region '{region.prompt[:40]}' is longer than 75 tokens; shorten it.")
            contexts.append(context)
            if confined:  # the same text for every region: the same length, however long
                negatives.append(self.encode(r, [self.negative]))
        h, w = self.request.pixel_hw
        self.state = RegionalState(masks=region_masks(regions, h, w), contexts=torch.cat(contexts).float(),
                                   latent_hw=self.step.latent_hw if self.step else (h // 8, w // 8),
                                   confine=self.confine,
                                   uncond_contexts=torch.cat(negatives).float() if confined else None)
        if self.spatial is not None:
            self.spatial.state, self.spatial.sets = self.state, sets

    # the UNet's side ---------------------------------------------------------------------------
    def patch(self, unet) -> None:
        """An instance forward on every attn2 CrossAttention of the ldm UNet (see the docstring);
        one another extension left there is wrapped, not skipped, and put back by ``unpatch``."""
        for path, module in unet.named_modules():
            if path.endswith(".attn2") and hasattr(module, "to_k"):
                self._patched[module] = vars(module).get("forward")
                module.forward = types.MethodType(self._forward, module)

    def unpatch(self) -> None:
        for module, previous in self._patched.items():
            if previous is None:
                vars(module).pop("forward", None)
            else:
                module.forward = previous
        self._patched = {}

    def _forward(self, module, x: Tensor, context: Tensor | None = None, mask=None, **kwargs) -> Tensor:
        previous = self._patched.get(module)

        def attend(hidden: Tensor, ctx: Tensor) -> Tensor:  # the selected optimisation's forward, to_out included
            if previous is not None:
                return previous(hidden, context=ctx, mask=mask, **kwargs)
            return type(module).forward(module, hidden, context=ctx, mask=mask, **kwargs)

        if context is None or mask is not None or self.step is None:
            return attend(x, context)
        if self._rows is None or self._rows[0] is not context:  # one UNet call: one context for every attn2
            self._rows = (context, conditional_rows(context, self.step))
        rows = self._rows[1]
        if self.maps is not None:
            self._record(module, x, context, rows)
        if self.state is None:
            with (self.confine or _nothing)(GLOBAL):
                return attend(x, context)
        self.state.rows = rows
        return regional_cross_attention(lambda: x, attend, x.shape[1], context, self.state)

    def _record(self, module, x: Tensor, context: Tensor, rows: Tensor) -> None:
        with torch.no_grad():
            q, k = module.to_q(x), module.to_k(context)
            heads = module.heads
            d = q.shape[-1] // heads
            qh = q.reshape(q.shape[0], -1, heads, d).transpose(1, 2)  # (b, heads, n, d)
            kh = k.reshape(k.shape[0], -1, heads, d).transpose(1, 2)  # (b, heads, T, d)
            add_attention_maps(self.maps, qh, kh, rows, self.positions, self.step.latent_hw)


def _nothing(key):
    return contextlib.nullcontext()


class RegionalComposition:
    """The residuals of one bank's concepts on A1111's model for a regional preview, and the
    regional attn2 forwards; ``remove`` undoes both. The concepts' tokens are registered by the
    plain composition that holds this one (``a1111.network.Composition``)."""

    def __init__(self, sd_model, request: RegionalRequest, on_refusal: Callable[[str], None]):
        self.sd_model, self.request, self.on_refusal = sd_model, request, on_refusal
        self.hooks: LoRAHooks | None = None
        self.attention: RegionalAttention | None = None

    def apply(self, picks: list, layers: dict, prompt: str, negative: str) -> None:
        banks = {pick.bank_path for pick in picks}
        if len(banks) != 1:
            raise InputError("A regional preview composes the concepts of one bank.")
        bank: Bank = picks[0].bank
        ids = [pick.concept for pick in picks]
        strengths = {pick.concept: pick.strength for pick in picks}
        request = self.request
        check_mode(request.residuals)
        confined = request.residuals == "confined" or request.auto_regions
        adapted = {n: layers[n] for n in bank.layer_shapes() if n in layers}
        text_layers, spatial_layers = split_layers(adapted) if confined else (adapted, {})
        self.hooks = LoRAHooks(text_layers)
        sets = context_concepts(bank, prompt, request.regions, ids)  # the drawn regions' (automatic ones come later)
        if confined:
            global_ids = sets[GLOBAL]
            self.hooks.set_composed(bank.composed_factors(global_ids, strengths) if global_ids else {})
        else:
            self.hooks.set_composed(bank.composed_factors(ids, strengths))
        hooks = self.hooks

        def define(key, set_ids):
            hooks.define_set(key, bank.composed_factors(set_ids, strengths) if set_ids else {})

        def encode(key, texts):
            from modules import devices

            with (hooks.use(key) if confined else contextlib.nullcontext()), devices.autocast(), torch.no_grad():
                return self.sd_model.get_learned_conditioning(texts)

        self.attention = attention = RegionalAttention(
            request, confine=(lambda key: hooks.use(None if key == GLOBAL else key)) if confined else None,
            encode=encode, define=define, sets_for=lambda regions: context_concepts(bank, prompt, regions, ids),
            prompt=prompt, negative=negative)
        if spatial_layers:  # every concept a region may name has its factors there from the start
            attention.spatial = SpatialConfinement(spatial_layers, bank, sets, strengths, _no_regions(request))
        if request.auto_regions:
            wanted = concepts_to_find(bank, prompt, ids, request.regions)
            chunks, _ = self.sd_model.cond_stage_model.tokenize_line(prompt)
            tokens = {i: bank.get(i).token for i in wanted}
            attention.positions = require_positions(token_positions(chunks[0].fixes, tokens))
            attention.names = {i: tokens[i] for i in attention.positions}
            h, w = request.pixel_hw
            attention.maps = {i: torch.zeros(h // 8, w // 8) for i in attention.positions}
        else:
            attention.begin_regions(list(request.regions))
        attention.patch(self.sd_model.model.diffusion_model)
        ACTIVE.append(self)

    def on_step(self, params) -> None:
        """Before each model evaluation (A1111's ``cfg_denoiser`` callback)."""
        attention = self.attention
        if attention is None or attention.refused:
            return
        attention.on_step(step_info(params))
        if attention.refused:
            self.on_refusal(attention.refused)

    def remove(self) -> None:
        if self in ACTIVE:
            ACTIVE.remove(self)
        if self.attention is not None:
            self.attention.unpatch()
            if self.attention.spatial is not None:
                self.attention.spatial.remove()
            self.attention = None
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None


def _no_regions(request: RegionalRequest) -> RegionalState:
    """A state with no region yet (automatic regions before the quarter): every spatial residual
    of the global prompt's concepts acts everywhere."""
    h, w = request.pixel_hw
    return RegionalState(masks=torch.zeros(0, h, w), contexts=torch.zeros(0, CHUNK, 1), latent_hw=(h // 8, w // 8),
                         uncond_contexts=torch.zeros(0, CHUNK, 1))


def step_info(params) -> StepInfo:
    """A1111's ``CFGDenoiserParams`` as :class:`StepInfo`."""
    cond, uncond = params.text_cond, params.text_uncond
    t = min(cond.shape[1], uncond.shape[1])
    ambiguous = cond.shape[0] == uncond.shape[0] and torch.equal(cond[:, :t], uncond[:, :t])
    call = int(getattr(params.denoiser, "step", params.sampling_step) or 0)
    return StepInfo(call=call, total=int(params.total_sampling_steps), latent_hw=tuple(params.x.shape[-2:]),
                    rows=int(params.x.shape[0]), uncond=uncond, ambiguous=ambiguous)


ACTIVE: list[RegionalComposition] = []  # the regional composition of the job running now, if any


def on_cfg_denoiser(params) -> None:
    """A1111's ``cfg_denoiser`` callback (registered by ``scripts/seqlora_tab.py``): the step about
    to run, for the regional composition of the running job. A1111 runs one job at a time."""
    for composition in list(ACTIVE):
        composition.on_step(params)
