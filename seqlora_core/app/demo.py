"""`make demo`: a stream of concepts from real photos, trained one after another on `tiny`.

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
               stream=STREAM) -> tuple[Bank, list[dict]]:
    """Train ``stream`` one concept after another; per concept its loss right after its own
    training and after all later ones, its residual's size, and the later concepts' drift on
    its prompt (relative and absolute, ``evaluate.drift_figures``)."""
    bank = new_bank(host)
    rows = []
    for token, init_word, _ in stream:
        pixels = load_images([photos[token]], RESOLUTION)
        result = train_concept(host, bank, pixels, token, init_word, demo_settings(method, steps, len(rows), seed))
        bank = result.bank
        rows.append({"token": token, "seconds": result.seconds,
                     "after_own": concept_loss(host, bank, token, pixels),
                     **{f"residual_{k}": v for k, v in residual_size(bank, result.concept.id).items()}})
        log(f"  {method:<8} {token:<12} trained in {result.seconds:5.1f} s, loss {rows[-1]['after_own']:.5f}, "
            f"|dW| {rows[-1]['residual_norm']:.3g} (largest entry {rows[-1]['residual_max_entry']:.3g})")
    for i, row in enumerate(rows):
        pixels = load_images([photos[row["token"]]], RESOLUTION)
        row["after_all"] = concept_loss(host, bank, row["token"], pixels)
        drift = drift_figures(host, bank, row["token"], pixels, [c.id for c in bank.concepts[:i + 1]])
        row["drift"], row["drift_abs"], row["own_effect"] = drift["relative"], drift["absolute"], drift["own_effect"]
    return bank, rows


def run_demo(out: Path, steps: int = 30, device: str = "cpu", log=print) -> dict:
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    photos = write_photos(out / "images")
    host = DiffusersHost.load("tiny", device)
    log(f"SeqLoRA demo on the tiny SD-1.5-architecture model ({device}), {len(STREAM)} concepts, "
        f"{steps} minibatches x K=3 bilevel iterations each")
    bank, rows = run_stream(host, "seqlora", photos, steps, log)
    bank.save(out / "bank.safetensors")
    lora_path, _ = export_lora(bank, None, out / "seqlora_concepts_lora.safetensors")
    baseline_bank, baseline = run_stream(host, "lora", photos, steps, log)
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
    mean = lambda rs: sum(abs(r["after_all"] - r["after_own"]) for r in rs[:-1]) / max(1, len(rs) - 1)
    orth = bank.max_orthogonality_error()
    mean_drift = lambda rs: sum(r["drift"] for r in rs[:-1]) / max(1, len(rs) - 1)
    log(f"mean |forgetting| over earlier concepts: seqlora {mean(rows):.6f}, unconstrained lora {mean(baseline):.6f}")
    log(f"mean drift over earlier concepts: seqlora {mean_drift(rows):.3f}, unconstrained lora {mean_drift(baseline):.3f}")
    mean_abs = lambda rs: sum(r["drift_abs"] for r in rs[:-1]) / max(1, len(rs) - 1)  # noqa: E731
    log(f"mean absolute drift over earlier concepts: seqlora {mean_abs(rows):.4f}, unconstrained lora {mean_abs(baseline):.4f}")
    worst = lambda rs: max(r["residual_max_entry"] for r in rs)  # noqa: E731
    log(f"largest |A B^T| entry of any concept: seqlora {worst(rows):.3g}, unconstrained lora {worst(baseline):.3g}")
    log(f"max orthogonality error between concept bases: seqlora {orth:.2e}, "
        f"unconstrained lora {baseline_bank.max_orthogonality_error(constrained_only=False):.2e}")
    log("seconds per concept (seqlora): " + ", ".join(f"{r['seconds']:.1f}" for r in rows))
    log(f"wrote {out / 'bank.safetensors'} and {lora_path}; total {time.time() - start:.0f} s")
    log("note: `tiny` has random weights, so these figures show the machinery (exact orthogonality, "
        "measured forgetting), not image quality")
    return {"seqlora": rows, "lora": baseline, "orthogonality_error": orth}
