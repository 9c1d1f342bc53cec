"""The paper's comparison, one command: forgetting, crosstalk and composition per method.

The same stream of photo concepts (scikit-image photos: same images, seeds and settings) is
trained with every method and target preset:

* ``seqlora``, ``alternating``, ``frozen-basis``: one after another, bases orthogonal;
* ``lora``: one after another, unconstrained (each sees the earlier ones applied);
* ``independent``: each concept trained alone on the base (unconstrained LoRA), then all summed —
  what users do today with separate LoRA files.

Per run: the loss matrix (every concept's denoising loss after each later concept, fixed noise
and timesteps), the forgetting matrix (that minus the loss right after its own training), mean
and worst forgetting after the whole stream, crosstalk (``evaluate.crosstalk``: a concept's effect
on a prompt without its token and on the other concepts' prompts, relative to its own effect),
the composition loss with all concepts applied, the mean of the bank's interference matrix
(``method.interference``, from the statistics stored with each concept), time per concept and peak memory (CPU: resident
memory above the loaded model, sampled; GPU: torch's peak allocation). Several ``--seeds`` give a
mean and spread. Writes ``bench/results/forgetting-<base>-<device>.json`` and ``.png`` and the
markdown table into ``bench/RESULTS.md`` (between its forgetting markers).

    python bench/forgetting.py                                 # tiny, 4 concepts, CPU
    python bench/forgetting.py --base v1-5-pruned-emaonly.safetensors --device cuda --concepts 8 --seeds 0,1,2
    python bench/forgetting.py --merge a.json b.json   # runs of other seeds, same settings: one table

Seeds only change the training (``TrainSettings.seed``); the base, images, evaluation noise and
timesteps are the same in every run, so one run per seed (on several machines, or between other jobs
on a shared one) merged with ``--merge`` gives the same table as one run with all the seeds.

On ``tiny`` and ``sd15-random`` the weights are random: the figures show the machinery (how much
each method lets concepts disturb one another), not image quality.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from _memory import PeakMemory  # noqa: E402
from forgetting_report import update_results_md, write_plot  # noqa: E402

from seqlora_core.app.demo import STREAM, write_photos  # noqa: E402
from seqlora_core.app.evaluate import concept_loss, crosstalk, residual_size  # noqa: E402
from seqlora_core.app.identify import (base_loss, bleed, identification, references,  # noqa: E402
                                       regional_identification)
from seqlora_core.app.images import load_images  # noqa: E402
from seqlora_core.errors import SeqLoRAError  # noqa: E402
from seqlora_core.hosts.diffusers_host import DiffusersHost  # noqa: E402
from seqlora_core.method.interference import bank_interference  # noqa: E402
from seqlora_core.method.trainer import TrainSettings, new_bank, train_concept  # noqa: E402

# the demo's four photos, then more that ship inside scikit-image (no download)
PHOTOS = STREAM + (("<galaxy>", "galaxy", "hubble_deep_field"), ("<tissue>", "tissue", "immunohistochemistry"),
                   ("<retina>", "eye", "retina"), ("<motorbike>", "motorcycle", "stereo_motorcycle"))
METHODS = ("seqlora", "alternating", "frozen-basis", "lora", "independent")
PRESETS = ("default", "unet-cross")
RANDOM_BASES = ("tiny", "sd15-random")
SMALL_BASES = ("tiny", "toy")  # 64 px, the small learning rates and minibatch counts
TOY_NOTE = ("The toy base has learned only its toy world (coloured shapes), pretrained here on the CPU: the "
            "figures show how each method learns and keeps photo concepts on a base that has learned, not "
            "SD-1.5's image quality.")
HONESTY = ("The base has random weights: these figures show the machinery (how much each method lets "
           "concepts disturb one another, measured with fixed noise), not image quality.")


def train_settings(args, method: str, preset: str, index: int, seed: int) -> TrainSettings:
    return TrainSettings(method="lora" if method == "independent" else method, steps=args.steps,
                         bilevel_iters=args.bilevel_iters, inner_steps=args.inner_steps, rank=args.rank,
                         resolution=args.resolution, lr_a=args.lr_a, lr_b=args.lr_b,
                         lr_embedding=args.lr_embedding, targets=preset, seed=seed * 1000 + index)


def run_stream(host, args, method: str, preset: str, seed: int, stream, pixels, world=None) -> dict:
    """Train the stream with one method and preset; measure after every concept and at the end.
    ``world`` (a base that has learned, ``toy``): also identification, bleed and regional
    composition on generated pictures (``seqlora_core.app.identify``)."""
    bank = new_bank(host)
    losses: list[list[float]] = []  # losses[k][i]: concept i after concept k (i <= k)
    seconds = []
    identified_own = []
    with PeakMemory(host.device) as memory:
        for k, (token, init_word, _) in enumerate(stream):
            settings = train_settings(args, method, preset, k, seed)
            # independent: alone on the base, then added to the sum; otherwise on top of the bank
            result = train_concept(host, new_bank(host) if method == "independent" else bank, pixels[token],
                                   token, init_word, settings)
            bank = bank.with_concept(result.concept)
            seconds.append(result.seconds)
            losses.append([concept_loss(host, bank, t, pixels[t]) for t, _, _ in stream[:k + 1]])
            if world is not None:  # with every concept so far loaded, as a user of the bank would
                identified_own.append(identification(host, bank, [token], world["refs"], None, IDENTIFY_SEEDS)["accuracy"])
            print(f"    {method:<12} {preset:<10} seed {seed} {token:<12} {result.seconds:6.1f} s  "
                  f"loss {losses[-1][-1]:.5f}" + (f"  identified {identified_own[-1]:.0%}" if world else ""), flush=True)
    n = len(stream)
    forgetting = [[losses[k][i] - losses[i][i] if k > i else None for k in range(n)] for i in range(n)]
    final = [forgetting[i][n - 1] for i in range(n - 1)]
    cross = crosstalk(host, bank, pixels)
    off_diagonal = [v for row in cross["matrix"] for v in row if v is not None]
    off_diagonal_abs = [v for row in cross["matrix_abs"] for v in row if v is not None]
    sizes = [residual_size(bank, c.id) for c in bank.concepts]
    inter = bank_interference(bank)  # from the statistics stored with each concept
    inter_values = [v for row in inter.matrix for v in row if v is not None]
    quality = world_quality(host, bank, stream, losses, identified_own, world) if world is not None else {}
    return {
        **quality,
        "method": method, "preset": preset, "seed": seed, "concepts": [t for t, _, _ in stream],
        "losses": losses, "forgetting": forgetting,
        "mean_forgetting": statistics.fmean(final) if final else 0.0,
        "worst_forgetting": max(final) if final else 0.0,
        "own_loss": statistics.fmean(losses[i][i] for i in range(n)),
        "composition_loss": statistics.fmean(losses[n - 1]),
        "crosstalk": cross,
        "crosstalk_other_prompts": statistics.fmean(off_diagonal) if off_diagonal else 0.0,
        "crosstalk_other_prompts_abs": statistics.fmean(off_diagonal_abs) if off_diagonal_abs else 0.0,
        "residual_sizes": sizes, "residual_norm": statistics.fmean(s["norm"] for s in sizes),
        "residual_max_entry": max(s["max_entry"] for s in sizes),
        "crosstalk_neutral_prompt": statistics.fmean(cross["neutral"]),
        "composition_drift": statistics.fmean(cross["composition"]),
        "interference": {"matrix": inter.matrix, "missing_stats": inter.missing_stats},
        "interference_mean": statistics.fmean(inter_values) if inter_values else None,
        "seconds_per_concept": statistics.fmean(seconds), "peak_memory_mb": memory.peak,
        "max_orthogonality_error": bank.max_orthogonality_error(constrained_only=False),
    }


IDENTIFY_SEEDS = (0, 1)


def world_quality(host, bank, stream, losses, identified_own: list[float], world: dict) -> dict:
    """On a base that has learned: each concept identified right after its training and after
    the whole stream, its own loss against the base's, bleed on the base's held-out captions and
    two concepts in two regions (pairs 1+2, 3+4, …)."""
    tokens = [t for t, _, _ in stream]
    after_all = identification(host, bank, tokens, world["refs"], None, IDENTIFY_SEEDS)["per_token"]
    identified_all = [after_all[t] for t in tokens]
    pairs = [(tokens[i], tokens[i + 1]) for i in range(0, len(tokens) - 1, 2)]
    # residuals="global": the table in RESULTS.md was measured so (before confined composition existed)
    regional = regional_identification(host, bank, pairs, world["refs"], (0,), residuals="global") if pairs else None
    spill = bleed(host, bank, world["captions"], (0,), base_pictures=world["base_pictures"])
    own = [losses[i][i] for i in range(len(tokens))]
    return {"identified_own": identified_own, "identified_all": identified_all,
            "identification_own": statistics.fmean(identified_own),
            "identification_all": statistics.fmean(identified_all),
            "identification_forgetting": statistics.fmean(a - b for a, b in zip(identified_own, identified_all)),
            "base_losses": [world["base_losses"][t] for t in tokens],
            "own_loss_over_base": statistics.fmean(o / world["base_losses"][t] for o, t in zip(own, tokens)),
            "bleed": spill, "bleed_captions_followed": spill["captions_followed"],
            "bleed_pixel_change": spill["pixel_change"], "bleed_eps_change": spill["eps_change"],
            "regional": regional, "regional_own": regional["own_region"] if regional else None,
            "regional_both": regional["both"] if regional else None}


SUMMARY_KEYS = ("identification_own", "identification_all", "identification_forgetting", "own_loss_over_base",
                "bleed_captions_followed", "bleed_pixel_change", "bleed_eps_change", "regional_own", "regional_both","mean_forgetting", "worst_forgetting", "own_loss", "composition_loss", "crosstalk_other_prompts",
                "crosstalk_other_prompts_abs", "residual_norm", "residual_max_entry",
                "crosstalk_neutral_prompt", "composition_drift", "interference_mean", "seconds_per_concept",
                "peak_memory_mb")


def summarise(runs: list[dict]) -> dict:
    """preset → method → metric → {mean, std, n} over seeds."""
    out: dict = {}
    for run in runs:
        cell = out.setdefault(run["preset"], {}).setdefault(run["method"], {})
        for key in SUMMARY_KEYS:
            if run.get(key) is not None:
                cell.setdefault(key, []).append(run[key])
    for methods in out.values():
        for cell in methods.values():
            for key, values in cell.items():
                cell[key] = {"mean": statistics.fmean(values),
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="toy", help="toy | tiny | sd15-random | PATH (diffusers folder or .safetensors)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--concepts", type=int, default=4, help=f"stream length (1-{len(PHOTOS)})")
    p.add_argument("--steps", type=int, default=None, help="minibatches per concept (default 30 on tiny, 200 otherwise)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; several give mean and spread")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--presets", default=",".join(PRESETS), help="target presets to compare")
    p.add_argument("--bilevel-iters", type=int, default=3)
    p.add_argument("--inner-steps", type=int, default=2)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--resolution", type=int, default=None, help="default 64 on tiny, 512 otherwise")
    p.add_argument("--lr-a", type=float, default=None, help="default 2e-3 on tiny, 1e-4 otherwise")
    p.add_argument("--lr-b", type=float, default=None, help="default 2e-3 on tiny, 1e-4 otherwise")
    p.add_argument("--lr-embedding", type=float, default=None, help="default 1e-2 on tiny, 5e-3 otherwise")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 avoids spinning threads on a shared machine)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON and PNG")
    p.add_argument("--results-md", default=str(ROOT / "bench" / "RESULTS.md"),
                   help="markdown file whose forgetting section is replaced ('' to skip)")
    p.add_argument("--section", default="forgetting",
                   help="which table of --results-md to replace (its <!-- SECTION:begin/end --> markers): "
                        "keep one per base, e.g. --section forgetting-sd15-random")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="instead of training: merge result files of other seeds (same settings) into one")
    args = p.parse_args(argv)
    if args.merge:
        return args
    tiny = args.base in SMALL_BASES
    args.steps = args.steps or (30 if tiny else 200)
    args.resolution = args.resolution or (64 if tiny else 512)
    args.lr_a = args.lr_a or (2e-3 if tiny else 1e-4)
    args.lr_b = args.lr_b or (2e-3 if tiny else 1e-4)
    args.lr_embedding = args.lr_embedding or (1e-2 if tiny else 5e-3)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.presets = [m.strip() for m in args.presets.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not 1 <= args.concepts <= len(PHOTOS):
        p.error(f"methods must be among {', '.join(METHODS)}; --concepts between 1 and {len(PHOTOS)}")
    return args


def merge_results(paths: list[str]) -> dict:
    """One result from runs of the same settings with different seeds (spread over all of them).

    A seed may also be split over several runs by preset or method (``--presets unet-cross`` in
    one process, ``--presets default`` in another: two cores, one seed); each (seed, preset,
    method) must then come from exactly one file."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]["settings"]
    split = ("seeds", "presets", "methods")
    seen: dict[tuple, str] = {}
    for path, part in zip(paths, parts):
        differ = [k for k in first if k not in split and part["settings"].get(k) != first[k]]
        if differ:
            raise SystemExit(f"{path}: settings differ from {paths[0]} in {', '.join(differ)}; only runs of the "
                             "same settings can be merged")
        cells = {(seed, preset, method) for seed in part["settings"]["seeds"]
                 for preset in part["settings"]["presets"] for method in part["settings"]["methods"]}
        for cell in sorted(cells):
            if cell in seen:
                raise SystemExit(f"seed {cell[0]} is in both {seen[cell]} and {path}"
                                 + ("" if len(cells) == 1 else f" (preset {cell[1]}, method {cell[2]})"))
            seen[cell] = path
    seeds, presets, methods = (sorted({cell[i] for cell in seen}) for i in range(3))
    missing = [cell for cell in itertools.product(seeds, presets, methods) if cell not in seen]
    if missing:
        raise SystemExit(f"seed {missing[0][0]} lacks preset {missing[0][1]}, method {missing[0][2]}: "
                         "every seed needs every preset and method")
    runs = [r for part in parts for r in part["runs"]]
    loads = [part["machine"]["load_average_at_end"] for part in parts]
    union = lambda key, order: [x for x in order if any(x in part["settings"][key] for part in parts)]  # noqa: E731
    return {**parts[0], "date": max(part["date"] for part in parts),
            "machine": {**parts[0]["machine"], "load_average_at_end": max(loads, key=lambda l: l[1])},
            "settings": {**first, "seeds": seeds, "presets": union("presets", PRESETS),
                         "methods": union("methods", METHODS)},
            "seconds_total": sum(part["seconds_total"] for part in parts), "summary": summarise(runs),
            "runs": runs, "failed": [f for part in parts for f in part["failed"]],
            "merged_from": [{"seeds": part["settings"]["seeds"], "presets": part["settings"]["presets"],
                             "date": part["date"], "load_average_at_end": part["machine"]["load_average_at_end"],
                             "seconds_total": part["seconds_total"]} for part in parts]}


def write_result(result: dict, args) -> None:
    """The JSON and PNG into ``--out`` and the table into ``--results-md``."""
    s = result["settings"]
    random_base = s["base"] in RANDOM_BASES
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"forgetting-{Path(s['base']).stem if not random_base else s['base']}-{result['machine']['device'].split(':')[0]}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    write_plot(result, out / f"{stem}.png")
    if args.results_md:
        update_results_md(result, Path(args.results_md), f"{stem}.json", args.section)
    print_summary(result["summary"])
    print(f"wrote {out / (stem + '.json')}, {out / (stem + '.png')}"
          + (f" and the table in {args.results_md}" if args.results_md else "") + f"; {result['seconds_total']:.0f} s")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        result = merge_results(args.merge)
        write_result(result, args)
        return result
    start = time.time()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    host = DiffusersHost.load(args.base, args.device, torch.float32)
    stream = PHOTOS[:args.concepts]
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_photos(Path(tmp), stream)
        pixels = {token: load_images([folders[token]], args.resolution) for token, _, _ in stream}
    random_base = args.base in RANDOM_BASES
    world = None
    if args.base == "toy":  # a base that has learned its world: quality on generated pictures too
        from seqlora_core.toy.world import held_out_specs
        world = {"refs": references(pixels), "captions": held_out_specs(), "base_pictures": {},
                 "base_losses": {t: base_loss(host, f"a photo of a {w}", pixels[t]) for t, w, _ in stream}}
    print(f"forgetting benchmark on {args.base} ({host.device}), {len(stream)} concepts, {args.steps} minibatches "
          f"x K={args.bilevel_iters}, methods {', '.join(args.methods)}, presets {', '.join(args.presets)}, "
          f"seeds {args.seeds}", flush=True)
    if random_base:
        print(f"note: {HONESTY}", flush=True)
    runs, failed = [], []
    for seed in args.seeds:
        for preset in args.presets:
            for method in args.methods:
                try:
                    runs.append(run_stream(host, args, method, preset, seed, stream, pixels, world))
                except SeqLoRAError as exc:  # e.g. divergence: recorded and left out of the summary
                    print(f"    {method:<12} {preset:<10} seed {seed} FAILED: {exc}", flush=True)
                    failed.append({"method": method, "preset": preset, "seed": seed, "error": str(exc)})
    summary = summarise(runs)
    cuda = host.device.type == "cuda"
    result = {
        "benchmark": "forgetting", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "device": str(host.device), "device_name": torch.cuda.get_device_name() if cuda else "cpu",
                    "torch": torch.__version__, "load_average_at_end": os.getloadavg()},
        "settings": {"base": args.base, "random_weights": random_base, "resolution": args.resolution,
                     "steps": args.steps, "bilevel_iters": args.bilevel_iters, "inner_steps": args.inner_steps,
                     "rank": args.rank, "lr_a": args.lr_a, "lr_b": args.lr_b, "lr_embedding": args.lr_embedding,
                     "seeds": args.seeds, "methods": args.methods, "presets": args.presets,
                     "concepts": [t for t, _, _ in stream], "dtype": "float32",
                     "identify_seeds": len(IDENTIFY_SEEDS) if world else 0,
                     "threads": torch.get_num_threads()},
        "note": HONESTY if random_base else TOY_NOTE if args.base == "toy" else "Real base weights.",
        "seconds_total": time.time() - start, "summary": summary, "runs": runs, "failed": failed,
    }
    write_result(result, args)
    return result


LOSS_COLUMNS = (("mean forg.", "mean_forgetting", "+11.5f"), ("worst", "worst_forgetting", "+9.5f"),
                ("compos. loss", "composition_loss", "12.5f"), ("xtalk other", "crosstalk_other_prompts", "11.3f"),
                ("xtalk plain", "crosstalk_neutral_prompt", "11.3f"), ("s/concept", "seconds_per_concept", "9.1f"),
                ("peak MiB", "peak_memory_mb", "9.0f"))
PICTURE_COLUMNS = (("ident. own", "identification_own", "10.1%"), ("after all", "identification_all", "9.1%"),
                   ("loss/base", "own_loss_over_base", "9.3f"), ("captions", "bleed_captions_followed", "8.1%"),
                   ("pixels", "bleed_pixel_change", "7.2f"), ("regions", "regional_own", "7.1%"))


def print_table(summary: dict, columns) -> None:
    """One line per preset and method: the mean over seeds of each (title, key, format) column."""
    width = lambda fmt: int("".join(ch for ch in fmt.split(".")[0] if ch.isdigit()))  # noqa: E731
    print(f"{'preset':<11} {'method':<12} " + " ".join(f"{title:>{width(fmt)}}" for title, _, fmt in columns))
    for preset, methods in summary.items():
        for method, m in methods.items():
            print(f"{preset:<11} {method:<12} " + " ".join(format(m[key]["mean"], fmt) for _, key, fmt in columns))


def print_summary(summary: dict) -> None:
    print_table(summary, LOSS_COLUMNS)
    if any("identification_own" in m for methods in summary.values() for m in methods.values()):
        print_table(summary, PICTURE_COLUMNS)


if __name__ == "__main__":
    main()
