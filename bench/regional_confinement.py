"""Two concepts in one picture, with and without region-confined residuals (issue 20).

Per seed two photo concepts are trained one after the other into one bank (SeqLoRA, the
``default`` targets, the toy-table settings), then drawn together by regional composition, once
with every concept acting on every prompt (``--residuals global``, the behaviour before) and once
confined (``--residuals confined``: each prompt with only the concepts it names). Measured:

* **own region / other absent** (``app.identify.regional_identification``): each half's crop
  identified by colour histogram among the four demo photos (chance 25 %), as the forgetting
  table does; the global prompt names no concept;
* **the base's region**: a third layout — concept | a caption of the toy world | concept, in
  thirds — against the same layout drawn by the base alone: the mean absolute pixel change
  (0–255) inside the middle third, and whether its colours still read as the caption says
  (``toy.world.read`` on the middle third, object and background colours);
* **seconds per picture** of both modes (20 DDIM steps, 64 px).

    python bench/regional_confinement.py --base toy --seeds 0,1,2 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from forgetting_report import replace_section  # noqa: E402
from seqlora_core.app.demo import STREAM, write_photos  # noqa: E402
from seqlora_core.app.identify import references, regional_identification  # noqa: E402
from seqlora_core.app.images import load_images  # noqa: E402
from seqlora_core.hosts.diffusers_host import DiffusersHost  # noqa: E402
from seqlora_core.method.trainer import TrainSettings, new_bank, train_concept  # noqa: E402
from seqlora_core.sampling.generate import generate  # noqa: E402
from seqlora_core.sampling.regions import Region  # noqa: E402

PAIRS = ((0, 1), (2, 3), (0, 2))  # indices into the demo's four photos
RES = 64
WHOLE = "two things side by side"
MODES = ("global", "confined")


def _settings(index: int, seed: int) -> TrainSettings:
    return TrainSettings(method="seqlora", steps=30, bilevel_iters=3, inner_steps=2, rank=4, resolution=RES,
                         lr_a=2e-3, lr_b=2e-3, lr_embedding=1e-2, targets="default", seed=seed * 1000 + index)


def _caption_regions(left: str, right: str, caption: str) -> list[Region]:
    third = RES / 3
    return [Region(f"a photo of {left}", box=(0, 0, third, RES)), Region(caption, box=(third, 0, 2 * third, RES)),
            Region(f"a photo of {right}", box=(2 * third, 0, RES, RES))]


def base_region(host, bank, left: str, right: str, specs, seeds, mode: str) -> dict:
    """Pixel change in the middle third against the base alone, and its colours' reading."""
    from seqlora_core.toy import world

    lo, hi = RES // 3, 2 * RES // 3
    change, followed = [], 0
    for spec in specs:
        regions = _caption_regions(left, right, spec.caption)
        for s in seeds:
            base = np.asarray(generate(host, new_bank(host), WHOLE, steps=20, resolution=RES, seed=s,
                                       regions=regions)).astype(np.float64)
            both = np.asarray(generate(host, bank, WHOLE, steps=20, resolution=RES, seed=s, regions=regions,
                                       residuals=mode)).astype(np.float64)
            change.append(float(np.abs(both[:, lo:hi] - base[:, lo:hi]).mean()))
            strip = both[:, lo:hi].astype(np.uint8)
            base_read = world.read(base[:, lo:hi].astype(np.uint8))
            got = world.read(strip)
            followed += (got.colour, got.background) == (base_read.colour, base_read.background)
    n = len(specs) * len(seeds)
    return {"pixel_change": statistics.fmean(change), "same_colours_as_base": followed / n, "pictures": n}


def leak(host, bank, left: str, right: str, pixels: dict, mode: str) -> dict:
    """How much of one concept's effect on the noise prediction reaches the other's region: with
    both boxes drawn, ε̂ with <right> at strength 1 minus ε̂ with it at 0, RMS inside the left half,
    over the RMS of the same difference inside the right half (its own region); and the same with
    the roles swapped. Noisy latents of both photos at the evaluation timesteps, fixed noise."""
    import contextlib

    from seqlora_core.app.evaluate import EVAL_TIMESTEPS
    from seqlora_core.method.trainer import encode_latents, noisy_batch
    from seqlora_core.sampling.generate import _compose

    regions = [Region(f"a photo of {left}", box=(0, 0, RES // 2, RES)), Region(f"a photo of {right}", box=(RES // 2, 0, RES, RES))]
    latents = encode_latents(host, torch.cat([pixels[left], pixels[right]]))
    gen = torch.Generator().manual_seed(7)
    t = torch.tensor(EVAL_TIMESTEPS)
    noisy = torch.cat([noisy_batch(latents, host.alphas_cumprod(), torch.full((len(t),), i), torch.randn(
        (len(t), *latents.shape[1:]), generator=gen), t) for i in range(len(latents))])
    steps = t.repeat(len(latents))
    half = latents.shape[-1] // 2

    def eps(strengths):
        with torch.no_grad(), contextlib.ExitStack() as stack:
            cond = _compose(stack, host, bank, WHOLE, None, strengths, "", regions, mode, RES)
            out = []
            for x, tt in zip(noisy, steps):
                both = host.predict_noise(torch.stack([x, x]), torch.stack([tt, tt]), cond)
                out.append(both[1])  # the conditional row
            return torch.stack(out)

    full = eps({})
    shares = []
    for mover, own, other in ((right, slice(half, None), slice(0, half)), (left, slice(0, half), slice(half, None))):
        diff = full - eps({mover.strip("<>"): 0.0})
        shares.append(float(diff[..., other].pow(2).mean().sqrt() / diff[..., own].pow(2).mean().sqrt().clamp_min(1e-12)))
    return {"leak": statistics.fmean(shares), "leaks": shares}


def run_seed(host, seed: int, folder: Path, specs, picture_seeds) -> dict:
    a, b = PAIRS[seed % len(PAIRS)]
    pair = (STREAM[a], STREAM[b])
    photos = write_photos(folder / "photos", STREAM)
    pixels = {t: load_images([photos[t]], RES) for t, _, _ in STREAM}
    refs = references(pixels)  # all four photos: chance is 25 %
    bank = new_bank(host)
    for k, (token, word, _) in enumerate(pair):
        bank = train_concept(host, bank, pixels[token], token, word, _settings(k, seed)).bank
    left, right = pair[0][0], pair[1][0]
    out = {"seed": seed, "tokens": [left, right]}
    for mode in MODES:
        start = time.perf_counter()
        ident = regional_identification(host, bank, [(left, right)], refs, picture_seeds, RES, mode, WHOLE)
        seconds = (time.perf_counter() - start) / max(1, ident["pictures"])
        out[mode] = {**ident, "seconds_per_picture": seconds, **leak(host, bank, left, right, pixels, mode),
                     "base_region": base_region(host, bank, left, right, specs, picture_seeds[:2], mode)}
    out["auto"] = automatic(host, bank, left, right, refs, picture_seeds)
    return out


def automatic(host, bank, left: str, right: str, refs, seeds) -> dict:
    """No boxes: "a photo of <left> and <right>" with automatic regions. The regions are wherever
    the attention put them, so a picture counts when its two halves are identified as the two
    concepts in either order; a refusal (maps not separable) counts as a miss."""
    from seqlora_core.app.identify import identify
    from seqlora_core.errors import SeqLoRAError

    both = refused = 0
    start = time.perf_counter()
    for s in seeds:
        try:
            image = np.asarray(generate(host, bank, f"a photo of {left} and {right}", steps=20, resolution=RES,
                                        seed=s, auto_regions=True))
        except SeqLoRAError:
            refused += 1
            continue
        got = {identify(image[:, :RES // 2], refs), identify(image[:, RES // 2:], refs)}
        both += got == {left, right}
    n = len(seeds)
    return {"both": both / n, "refused": refused / n, "pictures": n,
            "seconds_per_picture": (time.perf_counter() - start) / n}


def _mean_sd(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict]) -> dict:
    out = {}
    for mode in MODES:
        rows = {"leak": [r[mode]["leak"] for r in runs],
                "own_region": [r[mode]["own_region"] for r in runs],
                "other_absent": [r[mode]["other_absent"] for r in runs],
                "both": [r[mode]["both"] for r in runs],
                "base_pixel_change": [r[mode]["base_region"]["pixel_change"] for r in runs],
                "base_same_colours": [r[mode]["base_region"]["same_colours_as_base"] for r in runs],
                "seconds_per_picture": [r[mode]["seconds_per_picture"] for r in runs]}
        out[mode] = {k: _mean_sd(v) for k, v in rows.items()}
    out["auto"] = {k: _mean_sd([r["auto"][k] for r in runs]) for k in ("both", "refused", "seconds_per_picture")}
    return out


def table(summary: dict, runs: list[dict], argv: list[str]) -> str:
    def pct(mode, key):
        m, s = summary[mode][key]
        return f"{m:.0%} ± {s:.0%}"

    def num(mode, key, fmt=".2f"):
        m, s = summary[mode][key]
        return f"{m:{fmt}} ± {s:{fmt}}"

    pictures = runs[0]["global"]["pictures"]
    lines = [f"Two concepts trained into one bank (SeqLoRA, `default` targets, 30 minibatches × K=3, base `{runs[0].get('base', 'toy')}`), "
             f"drawn side by side by regional composition ({pictures} picture(s) per run, 20 DDIM steps, 64 px; "
             f"global prompt naming no concept); {len(runs)} runs (pair × training seed: "
             + ", ".join(f"{'+'.join(r['tokens'])} s{r['seed']}" for r in runs) + "), mean ± spread. Crops are "
             "identified by colour histogram among the four demo photos (chance 25 %). *The base's region*: the "
             "layout concept | toy caption | concept against the base alone drawing the same layout. Reproduce: `"
             + " ".join(["python bench/regional_confinement.py"] + argv) + "`.", "",
             "| residuals | leak: one concept's effect on ε̂ in the other's region, over its effect in its own | "
             "own region | other absent | both regions right | base's region: pixel change (0–255) "
             "| base's region: colours as the base drew them | s / picture |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        lines.append(f"| {mode} (boxes) | {num(mode, 'leak', '.3f')} | {pct(mode, 'own_region')} | {pct(mode, 'other_absent')} | {pct(mode, 'both')} | "
                     f"{num(mode, 'base_pixel_change')} | {pct(mode, 'base_same_colours')} | "
                     f"{num(mode, 'seconds_per_picture')} |")
    lines.append(f"| automatic regions (confined; refused {pct('auto', 'refused')}) | — | — | — | {pct('auto', 'both')} "
                 f"(the two halves, either order) | — | — | {num('auto', 'seconds_per_picture')} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="toy")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (each picks a photo pair)")
    p.add_argument("--pictures", type=int, default=4, help="sampling seeds per run")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--results-md", default=str(ROOT / "bench" / "RESULTS.md"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    shown = [a for i, a in enumerate(argv) if a not in ("--out", "--results-md")
             and (i == 0 or argv[i - 1] not in ("--out", "--results-md"))]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    host = DiffusersHost.load(args.base, "cpu", torch.float32)
    from seqlora_core.toy.world import held_out_specs

    specs = held_out_specs()[:3]
    start = time.time()
    runs = []
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            runs.append({**run_seed(host, seed, Path(tmp), specs, list(range(args.pictures))), "base": args.base})
        print(json.dumps(runs[-1]), flush=True)
    summary = summarise(runs)
    text = table(summary, runs, shown)
    print(text)
    out = Path(args.out) / f"regional_confinement-{args.base}-cpu.json"
    out.write_text(json.dumps({"base": args.base, "argv": shown, "runs": runs, "summary": summary,
                               "seconds": time.time() - start, "torch": torch.__version__}, indent=1))
    if args.results_md:
        replace_section(Path(args.results_md), "regional-confinement",
                        "## Regional composition: confined against global residuals\n\n" + text)
    return {"runs": runs, "summary": summary}


if __name__ == "__main__":
    main()
