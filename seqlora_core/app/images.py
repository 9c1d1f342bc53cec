"""Reference images → tensors in [-1, 1] at the training resolution (centre crop, no hub, no GPU)."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files given directly, plus every file inside given folders (sorted, not recursive)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"Image path {p} does not exist.")
    return files


FITS = ("crop", "pad", "stretch")  # how a photo becomes an R×R training image


def pil_to_tensor(img, resolution: int, fit: str = "crop") -> Tensor:
    """(3, R, R) in [-1, 1]. ``crop``: shorter side resized to R, then centre-cropped; ``pad``: longer
    side resized to R, the rest filled with grey (nothing of the subject is cut); ``stretch``:
    resized to R×R ignoring the aspect ratio."""
    from PIL import Image

    img = img.convert("RGB")
    if fit == "stretch":
        img = img.resize((resolution, resolution), Image.BICUBIC)
    elif fit == "pad":
        w, h = img.size
        scale = resolution / max(w, h)
        small = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        img = Image.new("RGB", (resolution, resolution), (127, 127, 127))
        img.paste(small, ((resolution - small.width) // 2, (resolution - small.height) // 2))
    elif fit != "crop":
        raise InputError(f"Fit '{fit}' is not one of {', '.join(FITS)}.")
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_images(paths: Iterable[str | Path], resolution: int, warn: Callable[[str], None] = _warn,
                fit: str = "crop") -> Tensor:
    """(N, 3, R, R); files that are not images are skipped with a warning."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for f in image_files(paths):
        try:
            with Image.open(f) as img:
                img.load()
                out.append(pil_to_tensor(img, resolution, fit))
        except (UnidentifiedImageError, OSError, ValueError):
            warn(f"skipping {f}: not an image")
    if not out:
        raise InputError("No usable images were given (none of the files could be read as an image).")
    return torch.stack(out)
