"""Sample images from the tab through A1111's own txt2img processing.

The concepts are handed to the ``<seqlora:…>`` extra network on the processing object
(``p.seqlora_picks``), so a preview composes exactly as a prompt tag would, with A1111's sampler,
seed handling, VAE and infotext; whatever that extra network refuses comes back as one sentence.
A preview never shares A1111's conditioning cache (see ``txt2img_preview``). With regions (boxes,
confined residuals, automatic regions) the extra network composes regionally
(``a1111.regional``, through ``p.seqlora_regional``).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from seqlora_core.bank.format import Bank
from seqlora_core.errors import InputError, SeqLoRAError
from seqlora_core.sampling.confined import DEFAULT_RESIDUALS, check_mode
from seqlora_core.sampling.regions import Region

from .job import a1111_job
from .network import Pick
from .regional import RegionalRequest

SAMPLER = "Euler"
STEPS = 20
CFG = 7.0
SEED = 1  # fixed, so that previews of different concepts or strengths compare


def txt2img_preview(bank: Bank, bank_path: Path, prompt: str, ids: list[str], strengths: dict[str, float],
                    size: int, steps: int = STEPS, seed: int = SEED, regions: Sequence[Region] = (),
                    residuals: str = DEFAULT_RESIDUALS, auto_regions: bool = False):
    """A PIL image of ``prompt`` with concepts ``ids`` of ``bank`` composed (size × size px);
    ``regions``, ``residuals`` and ``auto_regions`` as ``sampling.generate`` takes them."""
    from modules import extra_networks, processing, shared

    for ident in ids:
        bank.get(ident)  # one sentence for an unknown id
    label = Path(bank_path).stem
    with a1111_job("seqlora-preview"):
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=prompt, negative_prompt="", sampler_name=SAMPLER, steps=steps,
            cfg_scale=CFG, width=size, height=size, seed=seed, batch_size=1, n_iter=1,
            do_not_save_samples=True, do_not_save_grid=True)
        p.seqlora_picks = [Pick(label, bank, str(bank_path), ident, float(strengths.get(ident, 1.0)))
                           for ident in ids]
        if regions or auto_regions:
            p.seqlora_regional = RegionalRequest(list(regions), check_mode(residuals), bool(auto_regions), (size, size))
            # token merging (a setting) merges the positions the regions' masks are laid on
            p.override_settings["token_merging_ratio"] = 0.0
        # A1111 caches the last prompt's conditioning (class-wide) under a key that knows the prompt's
        # extra-network tags but not p.seqlora_picks: with the shared cache, a later plain
        # "a photo of <chelsea>" would reuse this preview's conditioning (concept applied to the text
        # encoder), and this preview could reuse a plain one. The preview keeps a cache of its own.
        p.cached_c, p.cached_uc = [None, None], [None, None]
        try:
            processed = processing.process_images(p)
        except Exception as exc:  # A1111's own failures (NaNs, out of memory) as one sentence in the tab
            raise SeqLoRAError(f"A1111's txt2img failed: {exc}") from exc
        finally:
            # A1111 deactivates extra networks only after a prompt with tags: undo the composition
            # (hooks, regional forwards, tokens) now, not at the next generation
            network = extra_networks.extra_network_registry.get("seqlora")
            if network is not None:
                network.deactivate(p)
            p.close()
    refused = [line for line in processed.comments.splitlines() if line.startswith("SeqLoRA")]
    if refused:
        raise InputError(refused[0])
    if not processed.images:
        raise InputError("A1111 returned no image (interrupted?).")
    return processed.images[0]
