"""Write the example inputs the shipped workflows use (a developer tool; needs scikit-image).

    python example_inputs/make_examples.py

The photos are scikit-image's sample photos (CC0, see NOTICE), made small (short side 256 px); the
sketch is the edges of a picture laid out like the regional example (cat left, cup right), white
on black as a sketch T2I-Adapter expects. ComfyUI gets them in its input folder when the pack
loads (nodes/examples.py); nothing here runs inside ComfyUI.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SHORT = 256


def small(img: Image.Image, short: int = SHORT) -> Image.Image:
    w, h = img.size
    k = short / min(w, h)
    return img.resize((round(w * k), round(h * k)), Image.LANCZOS)


def views(img: Image.Image) -> list[Image.Image]:
    """Full frame, left and right squares (the demo's three views of one photo)."""
    w, h = img.size
    side = min(w, h)
    return [img, img.crop((0, 0, side, side)), img.crop((w - side, h - side, w, h))]


def sketch(cat: Image.Image, cup: Image.Image, size: int = 512) -> Image.Image:
    """Edges of the cat in the left half and the cup in the right half, white on black."""
    from skimage import feature

    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    for img, x0 in ((cat, 0), (cup, size // 2)):
        w, h = img.size
        side = min(w, h)
        square = img.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
        canvas.paste(square.resize((size // 2, size // 2), Image.LANCZOS), (x0, size // 4))
    gray = np.asarray(canvas.convert("L"), dtype=np.float64) / 255
    edges = feature.canny(gray, sigma=2.5)
    return Image.fromarray((edges * 255).astype(np.uint8)).convert("1")


def main() -> None:
    import skimage.data

    cat, cup = Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.coffee())
    small(cat).save(HERE / "seqlora_chelsea.jpg", quality=90)
    folder = HERE / "seqlora_coffee"
    folder.mkdir(exist_ok=True)
    for i, view in enumerate(views(cup)):
        small(view).save(folder / f"coffee_{i + 1}.jpg", quality=90)
    sketch(cat, cup).save(HERE / "seqlora_sketch.png", optimize=True)
    for f in sorted(HERE.rglob("*")):
        if f.suffix in (".jpg", ".png"):
            print(f.relative_to(HERE), Image.open(f).size, f.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
