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


def fit_square(img, resolution: int, fit: str = "crop", fill=(127, 127, 127)):
    """The PIL image as an R×R square. ``crop``: shorter side resized to R, then centre-cropped;
    ``pad``: longer side resized to R, the rest filled with ``fill`` (nothing of the subject is
    cut); ``stretch``: resized to R×R ignoring the aspect ratio. Photos and their masks go
    through the same geometry."""
    from PIL import Image

    if fit == "stretch":
        img = img.resize((resolution, resolution), Image.BICUBIC)
    elif fit == "pad":
        w, h = img.size
        scale = resolution / max(w, h)
        small = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        img = Image.new(img.mode, (resolution, resolution), fill)
        img.paste(small, ((resolution - small.width) // 2, (resolution - small.height) // 2))
    elif fit != "crop":
        raise InputError(f"Fit '{fit}' is not one of {', '.join(FITS)}.")
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(img, resolution: int, fit: str = "crop") -> Tensor:
    """(3, R, R) in [-1, 1], shaped by ``fit_square`` (grey bars for ``pad``)."""
    img = fit_square(img.convert("RGB"), resolution, fit)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def alpha_channel(img):
    """The image's alpha as a PIL "L" image (255 = opaque), or None when it has no transparency."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = img.convert("RGBA").getchannel("A")
        return alpha if alpha.getextrema()[0] < 255 else None
    return None


def pil_to_mask(mask_l, resolution: int, fit: str = "crop") -> Tensor:
    """(R, R) in [0, 1] from a PIL "L" mask (255 = subject), shaped like its photo; ``pad``'s
    bars are background (0)."""
    arr = np.asarray(fit_square(mask_l.convert("L"), resolution, fit, fill=0), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).clamp(0, 1)


def mask_file(mask_dir: Path, photo: Path) -> Path:
    """The mask of ``photo`` in ``mask_dir``: a file of the same name, or of the same stem with any
    image suffix (photo.jpg → photo.png)."""
    same = mask_dir / photo.name
    if same.is_file():
        return same
    for f in sorted(mask_dir.glob(photo.stem + ".*")):
        if f.suffix.lower() in IMAGE_SUFFIXES:
            return f
    raise InputError(f"No mask for {photo.name} in {mask_dir} (expected {photo.stem}.png, white = subject).")


def read_mask(path: Path, resolution: int, fit: str = "crop") -> Tensor:
    """A mask file: its alpha when it has transparency, else its grey levels (white = subject)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            alpha = alpha_channel(img)
            return pil_to_mask(img.convert("L") if alpha is None else alpha, resolution, fit)
    except (UnidentifiedImageError, OSError, ValueError):
        raise InputError(f"Mask {path} could not be read as an image.") from None


def load_images(paths: Iterable[str | Path], resolution: int, warn: Callable[[str], None] = _warn,
                fit: str = "crop") -> Tensor:
    """(N, 3, R, R); files that are not images are skipped with a warning."""
    return load_images_and_masks(paths, resolution, warn, fit)[0]


def load_images_and_masks(paths: Iterable[str | Path], resolution: int, warn: Callable[[str], None] = _warn,
                          fit: str = "crop", mask_dir: str | Path | None = None) -> tuple[Tensor, Tensor | None]:
    """(N, 3, R, R) photos and (N, R, R) masks in [0, 1], 1 = subject. A photo's mask is its file in
    ``mask_dir`` when one is given (``mask_file``), else its alpha channel (a PNG with a transparent
    background trains on the subject only). Masks are None when no photo has one; a photo without
    one gets a mask of ones. Files that are not images are skipped with a warning."""
    from PIL import Image, UnidentifiedImageError

    if mask_dir is not None and not Path(mask_dir).is_dir():
        raise InputError(f"Mask folder {mask_dir} does not exist.")
    out, masks = [], []
    for f in image_files(paths):
        try:
            with Image.open(f) as img:
                img.load()
                out.append(pil_to_tensor(img, resolution, fit))
                alpha = alpha_channel(img) if mask_dir is None else None
        except (UnidentifiedImageError, OSError, ValueError):
            warn(f"skipping {f}: not an image")
            continue
        if mask_dir is not None:
            masks.append(read_mask(mask_file(Path(mask_dir), f), resolution, fit))
        else:
            masks.append(None if alpha is None else pil_to_mask(alpha, resolution, fit))
    if not out:
        raise InputError("No usable images were given (none of the files could be read as an image).")
    if all(m is None for m in masks):
        return torch.stack(out), None
    full = torch.ones(resolution, resolution)
    return torch.stack(out), torch.stack([full if m is None else m for m in masks])
