"""How well a base follows the toy world's captions, read from the pixels it draws.

``caption_accuracy`` generates each caption with the library's own sampler (``generate``, the
base alone) and reads the picture back with ``world.read``: a caption is followed when the
object's and the background's colours both read back as asked (the shape is reported beside).
``reconstruction_psnr`` is the VAE's round trip on fresh world pictures.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import world

GUIDANCE = 7.5  # the CLI's default
SAMPLE_STEPS = 20


def caption_accuracy(host, specs: Sequence[world.Spec], seeds: Sequence[int] = (0, 1),
                     steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE, resolution: int = 64) -> dict:
    """Shares of generated pictures whose colours (``colours``), shape (``shape``) and all three
    (``all``) read back as the caption says, over ``specs`` × ``seeds``; ``misses``: the captions
    and what was read instead."""
    from ..method.trainer import new_bank
    from ..sampling.generate import generate

    bank = new_bank(host)
    colours = shape = both = 0
    misses = []
    for spec in specs:
        for seed in seeds:
            image = np.asarray(generate(host, bank, spec.caption, steps=steps, guidance=guidance,
                                        resolution=resolution, seed=seed))
            got = world.read(image)
            ok_colours = spec.same_colours(got)
            colours += ok_colours
            shape += got.shape == spec.shape
            both += ok_colours and got.shape == spec.shape
            if not ok_colours:
                misses.append(f"{spec.caption} (seed {seed}): read {got.colour} on {got.background}")
    n = len(specs) * len(seeds)
    return {"colours": colours / n, "shape": shape / n, "all": both / n, "n": n, "misses": misses}


@torch.no_grad()
def reconstruction_psnr(host, n: int = 64, seed: int = 99, size: int = 64) -> float:
    """Mean PSNR (dB, pixels in [0, 255]) of the VAE's encode → decode on ``n`` world pictures."""
    rng = np.random.default_rng(seed)
    specs = world.all_specs()
    x = torch.from_numpy(world.batch([specs[i] for i in rng.integers(0, len(specs), n)], size, rng))
    return psnr(host, x)


@torch.no_grad()
def psnr(host, pixels: torch.Tensor) -> float:
    """Mean PSNR of the host VAE's round trip of (N, 3, R, R) pixels in [-1, 1]."""
    recon = host.decode_latents(host.encode_images(pixels)).float().clamp(-1, 1).cpu()
    mse = ((recon - pixels) * 127.5).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(255 ** 2 / mse.clamp_min(1e-8))).mean())


def measure_base(parts, log=print, seeds: Sequence[int] = (0, 1, 2, 3)) -> dict:
    """The figures recorded with the shipped weights: caption following on the held-out and on
    the training captions, and the VAE's PSNR on world pictures."""
    from ..hosts.diffusers_host import DiffusersHost

    host = DiffusersHost(parts, torch.device("cpu"), torch.float32)
    held = caption_accuracy(host, world.held_out_specs(), seeds)
    seen = caption_accuracy(host, world.training_specs(), seeds[:1])
    figures = {"held_out": held, "training_captions": seen, "vae_psnr_world": reconstruction_psnr(host),
               "sample_steps": SAMPLE_STEPS, "guidance": GUIDANCE}
    log(f"  held-out captions followed (both colours): {held['colours']:.1%} of {held['n']}, shape {held['shape']:.1%}; "
        f"training captions {seen['colours']:.1%} of {seen['n']}, shape {seen['shape']:.1%}; "
        f"VAE PSNR {figures['vae_psnr_world']:.1f} dB")
    return figures


def caption_grid(host, specs: Sequence[world.Spec], path, per_row: int = 5, seed: int = 0):
    """What the base alone draws for ``specs`` (one seed), labelled with what was read back:
    the picture behind the README's view of the base."""
    from ..app.demo_grid import save_rows
    from ..method.trainer import new_bank
    from ..sampling.generate import generate

    bank = new_bank(host)
    tiles = []
    for spec in specs:
        image = np.asarray(generate(host, bank, spec.caption, steps=SAMPLE_STEPS, guidance=GUIDANCE, resolution=64,
                                    seed=seed))
        got = world.read(image)
        mark = "ok" if spec.same_colours(got) else "MISS"
        tiles.append((image, f"{spec.colour} {spec.shape[:3]}/{spec.background} {mark}"))
    return save_rows([tiles[i:i + per_row] for i in range(0, len(tiles), per_row)], path)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m seqlora_core.toy.measure [--base toy] [--seeds 16]``: the caption figures of a
    base with more pictures than ``toy.json`` records (4 seeds per held-out caption), for a
    tighter estimate; ``--json FILE`` keeps every miss; ``--grid FILE`` draws the README's view
    of the base (the nine held-out captions, then six training ones, seed 0)."""
    import argparse
    import json

    from ..hosts.diffusers_host import DiffusersHost

    p = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    p.add_argument("--base", default="toy")
    p.add_argument("--seeds", type=int, default=16, help="pictures per held-out caption (seeds 0..N-1)")
    p.add_argument("--json", default="", help="write the figures and the misses here")
    p.add_argument("--grid", default="", help="write the held-out and six training captions' pictures here (PNG)")
    args = p.parse_args(argv)
    host = DiffusersHost.load(args.base, "cpu", torch.float32)
    if args.grid:
        training = world.training_specs()
        caption_grid(host, [*world.held_out_specs(), *training[::len(training) // 6][:6]], Path(args.grid))
        print(f"wrote {args.grid}")
    held = caption_accuracy(host, world.held_out_specs(), range(args.seeds))
    print(f"{args.base}: held-out captions followed (both colours) {held['colours']:.1%} of {held['n']} pictures "
          f"({len(world.held_out_specs())} captions x {args.seeds} seeds), shape right {held['shape']:.1%}")
    for miss in held["misses"]:
        print("  miss:", miss)
    if args.json:
        Path(args.json).write_text(json.dumps({"base": args.base, "held_out": held}, indent=1) + "\n")


if __name__ == "__main__":
    main()
