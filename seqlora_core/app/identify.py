"""Was a concept learned, does it survive later ones, does it bleed: measured on generated pictures.

A generated "a photo of <token>" is *identified* as the concept whose training photos are
nearest by colour histogram (a joint 4×4×4 RGB histogram, L1 distance, nearest over each
concept's views). On the toy base, which has never seen a photo, a picture near a concept's
own photo and not near the others' is what learning the concept means there; chance is one
over the number of concepts. Regional composition is identified the same way on each region's
crop. Bleed is how much loading concepts changes what the base draws for its own captions:
the caption-following share, the pixels and the noise prediction (``toy/measure.py`` reads
the pictures).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..bank.format import Bank
from ..hosts.protocol import Host
from ..settings import DEFAULT_RESIDUALS

BINS = 4
SAMPLE_STEPS = 20


def colour_histogram(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → (BINS³,) normalised joint RGB histogram."""
    q = (image.astype(np.int64) * BINS) // 256
    cells = (q[..., 0] * BINS + q[..., 1]) * BINS + q[..., 2]
    hist = np.bincount(cells.reshape(-1), minlength=BINS ** 3).astype(np.float64)
    return hist / hist.sum()


def to_uint8(pixels: Tensor) -> np.ndarray:
    """(N, 3, R, R) in [-1, 1] → (N, R, R, 3) uint8."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def references(pixels: Mapping[str, Tensor]) -> dict[str, list[np.ndarray]]:
    """Each concept's training views as histograms: token → [hist per image]."""
    return {token: [colour_histogram(a) for a in to_uint8(px)] for token, px in pixels.items()}


def identify(image: np.ndarray, refs: Mapping[str, list[np.ndarray]]) -> str:
    """The token whose nearest view is nearest to ``image``'s histogram."""
    hist = colour_histogram(image)
    return min(refs, key=lambda t: min(np.abs(hist - r).sum() for r in refs[t]))


def sample_picture(host, bank: Bank, prompt: str, ids, seed: int, regions=(), resolution: int = 64,
                   residuals: str = DEFAULT_RESIDUALS) -> np.ndarray:
    from ..sampling.generate import generate

    return np.asarray(generate(host, bank, prompt, ids, steps=SAMPLE_STEPS, resolution=resolution, seed=seed,
                               regions=regions, residuals=residuals))


def identification(host: Host, bank: Bank, tokens: Sequence[str], refs: Mapping[str, list[np.ndarray]],
                   ids: list[str] | None = None, seeds: Sequence[int] = (0, 1), resolution: int = 64) -> dict:
    """Per token, the share of "a photo of <token>" pictures (one per seed, ``ids`` composed,
    None = all) identified as that token among ``refs``; ``accuracy`` = their mean."""
    per = {}
    for token in tokens:
        hits = [identify(sample_picture(host, bank, f"a photo of {token}", ids, s, resolution=resolution), refs) == token
                for s in seeds]
        per[token] = sum(hits) / len(hits)
    return {"per_token": per, "accuracy": float(np.mean(list(per.values()))) if per else 0.0}


def regional_identification(host: Host, bank: Bank, pairs: Sequence[tuple[str, str]],
                            refs: Mapping[str, list[np.ndarray]], seeds: Sequence[int] = (0,),
                            resolution: int = 64, residuals: str = DEFAULT_RESIDUALS,
                            global_prompt: str | None = None) -> dict:
    """Two concepts side by side, each in its own half (regional prompts, all concepts loaded).
    A region *holds its own* when its crop is identified as its concept among all ``refs``;
    the other is *absent* from it when the crop is not identified as the other concept.
    ``both``: the share of pictures in which both regions hold their own."""
    from ..sampling.regions import Region

    half = resolution // 2
    own = absent = both = n = 0
    for left, right in pairs:
        regions = (Region(f"a photo of {left}", (0, 0, half, resolution)),
                   Region(f"a photo of {right}", (half, 0, resolution, resolution)))
        for s in seeds:
            whole = global_prompt if global_prompt is not None else f"a photo of {left} and {right}"
            image = sample_picture(host, bank, whole, None, s, regions, resolution, residuals)
            got = (identify(image[:, :half], refs), identify(image[:, half:], refs))
            own += (got[0] == left) + (got[1] == right)
            absent += (got[0] != right) + (got[1] != left)
            both += got == (left, right)
            n += 1
    return {"own_region": own / (2 * n), "other_absent": absent / (2 * n), "both": both / n, "pictures": n}


def denoising_identification(host: Host, bank: Bank, pixels: Mapping[str, Tensor]) -> dict:
    """The model as a classifier of the concepts' own photos (a diffusion classifier): concept
    i's photos are *identified* when concept i (alone, with its prompt "a photo of <t_i>") gives
    them a lower ε-loss (fixed noise and timesteps) than any other concept alone with its own
    prompt. No sampling, so it reads what each concept learned where a small base cannot draw a
    photo. ``matrix[i][j]``: the loss of i's photos under concept j."""
    from .evaluate import prompt_predictions

    concepts = [c for c in bank.concepts if c.token in pixels]
    embeddings = {c.token: c.embedding for c in concepts}
    matrix = []
    for c in concepts:
        row = []
        for other in concepts:
            pred, noise = prompt_predictions(host, bank, f"a photo of {other.token}", pixels[c.token], [other.id],
                                             embeddings)
            row.append(float(((pred - noise) ** 2).mean()))
        matrix.append(row)
    hits = [min(range(len(row)), key=row.__getitem__) == i for i, row in enumerate(matrix)]
    return {"tokens": [c.token for c in concepts], "matrix": matrix, "identified": hits,
            "accuracy": sum(hits) / max(1, len(hits))}


def base_loss(host: Host, token_prompt: str, pixels: Tensor) -> float:
    """The base's ε-loss on a concept's images for a prompt (no concept, no new token): what the
    concept's own loss is compared with."""
    from ..method.trainer import new_bank
    from .evaluate import prompt_predictions

    pred, noise = prompt_predictions(host, new_bank(host), token_prompt, pixels, [], {})
    return float(((pred - noise) ** 2).mean())


def bleed(host: Host, bank: Bank, specs, seeds: Sequence[int] = (0,), resolution: int = 64,
          base_pictures: dict | None = None) -> dict:
    """How much every concept loaded changes the base's own captions (world ``specs``):
    ``captions_followed`` with all loaded against ``captions_followed_base``, the mean absolute
    pixel change (0-255) of the same-seed pictures, and the RMS change of the noise prediction
    on world pictures (ε has RMS 1). ``base_pictures``: (caption, seed) → picture cache."""
    from ..method.trainer import new_bank
    from ..toy import world
    from .evaluate import prompt_predictions

    empty = new_bank(host)
    base_pictures = {} if base_pictures is None else base_pictures
    followed = followed_base = 0
    pixel_change, eps_change = [], []
    rng = np.random.default_rng(5)
    for spec in specs:
        pictures = torch.from_numpy(world.batch([spec], resolution, rng))
        loaded = prompt_predictions(host, bank, spec.caption, pictures, None, {})[0]
        plain = prompt_predictions(host, empty, spec.caption, pictures, [], {})[0]
        eps_change.append(float((loaded - plain).pow(2).mean().sqrt()))
        for s in seeds:
            key = (spec.caption, s)
            if key not in base_pictures:
                base_pictures[key] = sample_picture(host, empty, spec.caption, [], s, resolution=resolution)
            before, after = base_pictures[key], sample_picture(host, bank, spec.caption, None, s, resolution=resolution)
            pixel_change.append(float(np.abs(after.astype(np.float32) - before).mean()))
            followed += spec.same_colours(world.read(after))
            followed_base += spec.same_colours(world.read(before))
    n = len(specs) * len(seeds)
    return {"captions_followed": followed / n, "captions_followed_base": followed_base / n,
            "pixel_change": float(np.mean(pixel_change)), "eps_change": float(np.mean(eps_change)), "n": n}

