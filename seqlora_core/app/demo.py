"""`make demo`: a stream of concepts from real photos, trained one after another on `toy`.

Shows what SeqLoRA promises, measured rather than asserted: every concept's denoising loss right
after its own training and again after all later concepts (forgetting), the worst orthogonality
error between bases, the time per concept; the same stream with unconstrained LoRA beside it
for comparison. Writes the bank and an exported kohya LoRA under ``out``.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..bank.format import Bank
from ..hosts.diffusers_host import DiffusersHost
from .evaluate import concept_loss, drift_figures, residual_size
from ..bank.export import export_lora
from .images import load_images
from ..method.trainer import TrainSettings, new_bank, train_concept

# (token, init word, scikit-image photo) — photos that ship inside scikit-image, no download
STREAM = (("<chelsea>", "cat", "chelsea"), ("<coffee>", "cup", "coffee"),
          ("<astronaut>", "person", "astronaut"), ("<rocket>", "rocket", "rocket"))
RESOLUTION = 64


def write_photos(folder: Path, stream=STREAM) -> dict[str, Path]:
    """Three views (full frame, left and right crops) of each photo of ``stream``, as PNG files."""
    import skimage.data
    from PIL import Image

    dirs = {}
    for token, _, name in stream:
        d = folder / token.strip("<>")
        d.mkdir(parents=True, exist_ok=True)
        array = getattr(skimage.data, name)()
        array = array[0] if isinstance(array, tuple) else array  # stereo pairs: the left view
        img = Image.fromarray(array).convert("RGB")
        w, h = img.size
        side = int(min(w, h) * 0.8)
        views = [img, img.crop((0, 0, side, side)), img.crop((w - side, h - side, w, h))]
        for i, v in enumerate(views):
            v.save(d / f"{i}.png")
        dirs[token] = d
    return dirs


def demo_settings(method: str, steps: int, index: int, seed: int = 0) -> TrainSettings:
    """The demo's settings for the ``index``-th concept of a stream (``seed`` 0: the shipped demo)."""
    return TrainSettings(method=method, steps=steps, resolution=RESOLUTION, lr_a=3e-3, lr_b=3e-3,
                         lr_embedding=1e-2, seed=1000 * seed + index)


def run_stream(host: DiffusersHost, method: str, photos: dict, steps: int, log, seed: int = 0,
               stream=STREAM, identify_seeds: tuple[int, ...] = ()) -> tuple[Bank, list[dict]]:
    """Train ``stream`` one concept after another; per concept its loss right after its own
    training and after all later ones, its residual's size, and the later concepts' drift on
    its prompt (relative and absolute, ``evaluate.drift_figures``). With ``identify_seeds``,
    also the share of its generated pictures identified as its own photo (``identify``) right
    after its training and after all later ones, and the base's loss on its photos."""
    from .identify import base_loss, identification, references

    bank = new_bank(host)
    rows = []
    pixels = {token: load_images([photos[token]], RESOLUTION) for token, _, _ in stream}
    refs = references(pixels)
    for token, init_word, _ in stream:
        result = train_concept(host, bank, pixels[token], token, init_word, demo_settings(method, steps, len(rows), seed))
        bank = result.bank
        rows.append({"token": token, "seconds": result.seconds,
                     "after_own": concept_loss(host, bank, token, pixels[token]),
                     **{f"residual_{k}": v for k, v in residual_size(bank, result.concept.id).items()}})
        if identify_seeds:
            rows[-1]["base_loss"] = base_loss(host, f"a photo of a {init_word}", pixels[token])
            rows[-1]["identified_own"] = identification(host, bank, [token], refs, None, identify_seeds)["accuracy"]
        log(f"  {method:<8} {token:<12} trained in {result.seconds:5.1f} s, loss {rows[-1]['after_own']:.5f}"
            + (f" (base {rows[-1]['base_loss']:.5f}), identified {rows[-1]['identified_own']:.0%}" if identify_seeds else "")
            + f", |dW| {rows[-1]['residual_norm']:.3g} (largest entry {rows[-1]['residual_max_entry']:.3g})")
    for i, row in enumerate(rows):
        row["after_all"] = concept_loss(host, bank, row["token"], pixels[row["token"]])
        drift = drift_figures(host, bank, row["token"], pixels[row["token"]], [c.id for c in bank.concepts[:i + 1]])
        row["drift"], row["drift_abs"], row["own_effect"] = drift["relative"], drift["absolute"], drift["own_effect"]
        if identify_seeds:
            row["identified_all"] = identification(host, bank, [row["token"]], refs, None, identify_seeds)["accuracy"]
    return bank, rows


def _mean(rows: list[dict], key, earlier_only: bool = False) -> float:
    chosen = rows[:-1] if earlier_only and len(rows) > 1 else rows
    return sum(key(r) for r in chosen) / max(1, len(chosen))


def run_demo(out: Path, steps: int = 30, device: str = "cpu", base: str = "toy", log=print) -> dict:
    from ..toy import world
    from .demo_grid import write_grid
    from .identify import bleed, references, regional_identification

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    photos = write_photos(out / "images")
    host = DiffusersHost.load(base, device)
    learned = base == "toy"
    log(f"SeqLoRA demo on the {base} SD-1.5-architecture model ({device}), {len(STREAM)} concepts, "
        f"{steps} minibatches x K=3 bilevel iterations each")
    seeds = (0, 1) if learned else ()
    bank, rows = run_stream(host, "seqlora", photos, steps, log, identify_seeds=seeds)
    bank.save(out / "bank.safetensors")
    lora_path, _ = export_lora(bank, None, out / "seqlora_concepts_lora.safetensors")
    baseline_bank, baseline = run_stream(host, "lora", photos, steps, log, identify_seeds=seeds)
    baseline_bank.save(out / "baseline_lora_bank.safetensors")

    log("")
    log("forgetting = loss after all later concepts - loss right after own training (fixed noise/timesteps)")
    log("drift = how far later concepts move the concept's noise prediction, relative to its own effect;")
    log("  abs = the same move as an RMS per element of the prediction (the noise has RMS 1); |dW| = the")
    log("  concept's residual size sqrt(sum over layers of |A B^T|_F^2)")
    log(f"{'concept':<12} {'seqlora: own':>13} {'after all':>10} {'forgetting':>11} {'drift':>7} {'abs':>8} {'|dW|':>7}   "
        f"{'lora: own':>10} {'after all':>10} {'forgetting':>11} {'drift':>7} {'abs':>8} {'|dW|':>7}")
    for s, b in zip(rows, baseline):
        log(f"{s['token']:<12} {s['after_own']:13.5f} {s['after_all']:10.5f} {s['after_all'] - s['after_own']:+11.5f} "
            f"{s['drift']:7.3f} {s['drift_abs']:8.4f} {s['residual_norm']:7.3g}   {b['after_own']:10.5f} {b['after_all']:10.5f} "
            f"{b['after_all'] - b['after_own']:+11.5f} {b['drift']:7.3f} {b['drift_abs']:8.4f} {b['residual_norm']:7.3g}")
    forgetting = lambda r: abs(r["after_all"] - r["after_own"])  # noqa: E731
    log(f"mean |forgetting| over earlier concepts: seqlora {_mean(rows, forgetting, True):.6f}, "
        f"unconstrained lora {_mean(baseline, forgetting, True):.6f}")
    log(f"mean drift over earlier concepts: seqlora {_mean(rows, lambda r: r['drift'], True):.3f}, "
        f"unconstrained lora {_mean(baseline, lambda r: r['drift'], True):.3f}")
    log(f"mean absolute drift over earlier concepts: seqlora {_mean(rows, lambda r: r['drift_abs'], True):.4f}, "
        f"unconstrained lora {_mean(baseline, lambda r: r['drift_abs'], True):.4f}")
    worst = lambda rs: max(r["residual_max_entry"] for r in rs)  # noqa: E731
    log(f"largest |A B^T| entry of any concept: seqlora {worst(rows):.3g}, unconstrained lora {worst(baseline):.3g}")
    orth = bank.max_orthogonality_error()
    log(f"max orthogonality error between concept bases: seqlora {orth:.2e}, "
        f"unconstrained lora {baseline_bank.max_orthogonality_error(constrained_only=False):.2e}")
    log("seconds per concept (seqlora): " + ", ".join(f"{r['seconds']:.1f}" for r in rows))
    result = {"seqlora": rows, "lora": baseline, "orthogonality_error": orth}
    if learned:
        pixels = {token: load_images([photos[token]], RESOLUTION) for token, _, _ in STREAM}
        refs = references(pixels)
        pairs = [(STREAM[0][0], STREAM[1][0]), (STREAM[2][0], STREAM[3][0])]
        log("")
        log(f"on {base}, a base that has learned its toy world (headline rows of bench/forgetting.py):")
        log(f"{'':<44} {'seqlora':>9} {'lora':>9}")
        for label, key in (("concept loss right after its training", "after_own"), ("base's loss on the same photos", "base_loss"),
                           ("identified right after its training", "identified_own"),
                           ("identified after all later concepts", "identified_all")):
            fmt = "{:9.1%}" if key.startswith("identified") else "{:9.5f}"
            log(f"{label:<44} " + " ".join(fmt.format(_mean(r, lambda x: x[key])) for r in (rows, baseline)))
        for name, b in (("seqlora", bank), ("lora", baseline_bank)):
            result[f"{name}_bleed"] = bleed(host, b, world.held_out_specs(), (0,))
            result[f"{name}_regional"] = regional_identification(host, b, pairs, refs, (0, 1))
        log("{:<44} {:9.1%} {:9.1%}  (base alone {:.1%})".format(
            "base captions followed, all concepts loaded", result["seqlora_bleed"]["captions_followed"],
            result["lora_bleed"]["captions_followed"], result["seqlora_bleed"]["captions_followed_base"]))
        log("{:<44} {:9.2f} {:9.2f}".format("their pixels' change (0-255)", result["seqlora_bleed"]["pixel_change"],
                                            result["lora_bleed"]["pixel_change"]))
        log("{:<44} {:9.1%} {:9.1%}".format("two in two regions: each in its own", result["seqlora_regional"]["own_region"],
                                            result["lora_regional"]["own_region"]))
        grid = write_grid(host, bank, STREAM, out / "grid.png", pixels)
        log(f"wrote the picture grid {grid}")
    log(f"wrote {out / 'bank.safetensors'} and {lora_path}; total {time.time() - start:.0f} s")
    if not learned:
        log("note: `tiny` has random weights, so these figures show the machinery (exact orthogonality, "
            "measured forgetting), not image quality")
    return result
