"""The README's picture grid of regional composition (issue 20): two concepts side by side, global
against confined residuals, and automatic regions, on a bank trained by ``make demo``.

    python bench/regional_grid.py --bank out/demo/bank.safetensors --base toy --out docs/regional-grid.png

One row per pair of the bank's concepts (1+2, 3+4) and sampling seed. Columns: the pair's two
photos; the two in one prompt with both composed everywhere (no regions); left box | right box
with every concept acting on every prompt (``--residuals global``); the same boxes confined (each
box's prompt with only its concept); automatic regions (no boxes), or the one-sentence refusal
written on a grey tile. 20 DDIM steps, guidance 7.5, 64 px, the library's own ``generate``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from seqlora_core.app.demo import STREAM, write_photos  # noqa: E402
from seqlora_core.app.demo_grid import save_rows  # noqa: E402
from seqlora_core.app.identify import SAMPLE_STEPS, to_uint8  # noqa: E402
from seqlora_core.app.images import load_images  # noqa: E402
from seqlora_core.bank.format import load_bank  # noqa: E402
from seqlora_core.errors import InputError  # noqa: E402
from seqlora_core.hosts.diffusers_host import DiffusersHost  # noqa: E402
from seqlora_core.sampling.generate import generate  # noqa: E402
from seqlora_core.sampling.regions import Region  # noqa: E402

RES = 64


def _grey() -> np.ndarray:
    """A grey tile: automatic regions refused (the sentence is printed, not drawn), or no photo."""
    return np.full((RES, RES, 3), 160, np.uint8)


def pair_rows(host, bank, left, right, photos: dict, seeds) -> list[list[tuple[np.ndarray, str]]]:
    """One row of (picture, label) per seed for the concepts ``left`` | ``right`` (module docstring)."""
    a, b = left.token, right.token
    boxes = [Region(f"a photo of {a}", box=(0, 0, RES // 2, RES)), Region(f"a photo of {b}", box=(RES // 2, 0, RES, RES))]
    both, prompt = [left.id, right.id], "two things side by side"
    rows = []
    for seed in seeds:
        def draw(text: str, **kw) -> np.ndarray:
            return np.asarray(generate(host, bank, text, both, steps=SAMPLE_STEPS, resolution=RES, seed=seed, **kw))

        try:
            auto, auto_label = draw(f"a photo of {a} and {b}", auto_regions=True), "automatic regions"
        except InputError as exc:
            print(f"seed {seed}, {a} and {b}: automatic regions refused: {exc}")
            auto, auto_label = _grey(), "automatic: refused"
        rows.append([(photos.get(a, _grey()), f"photo {a}"), (photos.get(b, _grey()), f"photo {b}"),
                     (draw(f"a photo of {a} and {b}"), "one prompt, no regions"),
                     (draw(prompt, regions=boxes, residuals="global"), "boxes, global"),
                     (draw(prompt, regions=boxes, residuals="confined"), "boxes, confined"),
                     (auto, auto_label)])
    return rows


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bank", default=str(ROOT / "out" / "demo" / "bank.safetensors"), help="a bank from make demo")
    p.add_argument("--base", default="toy")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", default=str(ROOT / "docs" / "regional-grid.png"))
    args = p.parse_args(argv)
    host = DiffusersHost.load(args.base, "cpu", torch.float32)
    bank = load_bank(args.bank)
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_photos(Path(tmp), STREAM)
        photos = {t: to_uint8(load_images([folders[t]], RES)[:1])[0] for t in folders}
    concepts = bank.concepts
    rows = []
    for i in range(0, len(concepts) - 1, 2):
        rows += pair_rows(host, bank, concepts[i], concepts[i + 1], photos, [int(s) for s in args.seeds.split(",")])
    out = save_rows(rows, Path(args.out))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
