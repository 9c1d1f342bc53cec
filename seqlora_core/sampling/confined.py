"""Region-confined residuals: in a regional composition each context sees only its own concepts.

Plain regional composition (``sampling.regions``) isolates the region *prompts*, but every loaded
concept's residual still acts on every prompt: region i's context is encoded by a text encoder
carrying all concepts, and its keys and values are projected with W + Σ_j A_j B_jᵀ over all of
them. Orthogonal bases do not make the other concepts' terms zero (a prompt's features have
components along every basis). Confinement removes them:

* **contexts** — the global prompt (and the negative one) and each region's prompt are encoded
  with only the concepts that context *names* (its tokens; a region may list its concepts
  instead), and each context's keys and values are projected with only those. The global prompt
  names none in the usual case ("a cat and a mug on a table"), so outside the regions the picture
  is the base's own: a concept appears only where a region asks for it. The unconditional rows
  of classifier-free guidance are regional too: the negative prompt is encoded once per region
  with that region's concepts, so that inside a region both rows see the model the region asks
  for (base + its concepts), as a concept alone would be sampled. With the ``default`` / ``unet-cross`` targets every
  adapted layer reads the text (``hosts.naming.TEXT_INPUT_LAYERS``), so this is all there is, and
  it is exact: changing a concept's factors leaves every context that does not name it, and every
  region that does not, bit for bit unchanged.
* **spatial layers** (the ``full`` targets' self-attention and query / output projections): each
  concept's residual output is multiplied, position by position, by the weight of the contexts
  that name it at that layer's resolution (the regions' masks; the global weight 1 − Σ w_r for
  the global prompt's concepts), on both rows of guidance.

Cost: one text-encoder pass per region (its own concept set) instead of one batched pass, and
per spatial layer one rank-r product per concept instead of one stacked product
(``bench/regional_cost.py``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..bank.format import Bank
from ..hosts.naming import TEXT_INPUT_LAYERS
from ..method.lora import LoRAHooks, factors_on, lora_delta
from .regions import Region, RegionalState

from ..settings import DEFAULT_RESIDUALS, RESIDUAL_MODES  # noqa: F401 (here for the sampling code)

GLOBAL = "global"  # the set key of the global prompt's context


def check_mode(mode: str) -> str:
    from ..errors import InputError

    if mode not in RESIDUAL_MODES:
        raise InputError(f"Residuals must be {' or '.join(RESIDUAL_MODES)}, not {mode!r}.")
    return mode


def named_concepts(bank: Bank, text: str, ids: Sequence[str] | None) -> list[str]:
    """The chosen concepts (``ids``; None: all) whose token ``text`` contains (CLIP lower-cases)."""
    low = text.lower()
    return [c.id for c in bank.select(list(ids) if ids else None) if c.token.lower() in low]


def context_concepts(bank: Bank, prompt: str, regions: Sequence[Region], ids: Sequence[str] | None) -> dict:
    """Set key → concept ids: ``GLOBAL`` for the global prompt, 0…R−1 for the regions (a region's
    own ``concepts`` list when it has one, else the concepts its prompt names)."""
    out = {GLOBAL: named_concepts(bank, prompt, ids)}
    for r, region in enumerate(regions):
        given = getattr(region, "concepts", None)
        out[r] = [bank.get(i).id for i in given] if given is not None else named_concepts(bank, region.prompt, ids)
    return out


def split_layers(layers: Mapping[str, nn.Linear]) -> tuple[dict[str, nn.Linear], dict[str, nn.Linear]]:
    """(layers that read the text, spatial layers)."""
    text = {n: m for n, m in layers.items() if TEXT_INPUT_LAYERS.search(n)}
    return text, {n: m for n, m in layers.items() if n not in text}


class SpatialConfinement:
    """Forward hooks on spatial layers: concept j's residual weighted per position by the weight
    of the contexts that name it (see the module docstring)."""

    def __init__(self, layers: Mapping[str, nn.Linear], bank: Bank, sets: dict, strengths: Mapping[str, float],
                 state: RegionalState):
        self.state = state
        self.sets = sets
        concepts = sorted({i for ids in sets.values() for i in ids})
        self.factors = {i: {n: (float(strengths.get(i, 1.0)) * bank.get(i).A[n], bank.get(i).B[n])
                            for n in layers if n in bank.get(i).A} for i in concepts}
        self._on: dict = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]

    def _pair(self, ident: str, name: str, device) -> tuple[Tensor, Tensor] | None:
        pair = self.factors[ident].get(name)
        return None if pair is None else factors_on(self._on, (ident, name), pair, device)

    def concept_weight(self, ident: str, tokens: int, batch: int, device, dtype) -> Tensor:
        """(b, N) weight of concept ``ident`` at a layer with ``tokens`` positions."""
        w = self.state.weights(tokens, device, dtype)  # (R, N)
        in_global = float(ident in self.sets[GLOBAL])
        regional = in_global * (1 - w.sum(0)) if w.shape[0] else torch.full((tokens,), in_global, device=device, dtype=dtype)
        for r in range(w.shape[0]):
            if ident in self.sets[r]:
                regional = regional + w[r]
        if self.state.uncond_contexts is not None:  # every row regional (see RegionalState)
            return regional[None].expand(batch, -1)
        rows = self.state.rows if self.state.rows is not None else torch.ones(batch, dtype=torch.bool)
        plain = torch.full_like(regional, in_global)
        return torch.where(rows.to(device)[:, None], regional[None], plain[None])

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            x = inputs[0]
            for ident in self.factors:
                pair = self._pair(ident, name, x.device)
                if pair is None:
                    continue
                if x.dim() == 3:
                    weight = self.concept_weight(ident, x.shape[1], x.shape[0], x.device, output.dtype)[..., None]
                elif ident in self.sets[GLOBAL]:  # not a (b, N, c) layer: the global prompt's concepts only
                    weight = 1.0
                else:
                    continue
                output = output + weight * lora_delta(x, *pair).to(output.dtype)
            return output
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def define_context_sets(hooks: LoRAHooks, bank: Bank, sets: dict, strengths: Mapping[str, float] | None) -> None:
    """One composed set on ``hooks`` per context (an empty set for a context naming no concept)."""
    for key, ids in sets.items():
        hooks.define_set(key, bank.composed_factors(ids, strengths) if ids else {})
