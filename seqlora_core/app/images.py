"""Reference images → tensors in [-1, 1] at the training resolution (centre crop, no hub, no GPU)."""
from __future__ import annotations

import re
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


def image_files(paths: Iterable[str | Path], warn: Callable[[str], None] = _warn) -> list[Path]:
    """Files given directly, plus every file inside given folders (sorted, not recursive).

    Inside a folder, an entry named like an image that is no readable file (a folder called
    ``x.png``, a broken link, a link loop) is skipped with a warning naming it: the user put it
    there as a picture, so silently training on one picture fewer would hide a mistake, while
    refusing the run for it would punish an otherwise usable folder (unreadable non-image files
    are skipped the same way). Other sub-folders (a masks folder, say) are passed over quietly."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.name.startswith("."):
                    continue
                if f.is_file():
                    files.append(f)
                elif f.suffix.lower() in IMAGE_SUFFIXES:
                    warn(f"skipping {f}: {_not_a_file(f)}")
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"Image path {p} does not exist.")
    return files


def _not_a_file(f: Path) -> str:
    """Why a path named like an image cannot be read as a file, in a few words."""
    if f.is_symlink():
        try:
            f.resolve(strict=True)
        except (OSError, RuntimeError):  # RuntimeError: a link loop on Python < 3.13
            return "a broken link or a link loop"
    return "a folder, not an image file" if f.is_dir() else "not a regular file"


def upright_rgb_ready(img):
    """The image turned as its EXIF orientation says (phones store portraits on their side) and,
    for 16-bit and 32-bit greyscale ('I;16', 'I', 'F'), scaled to 8-bit 'L': PIL's own convert
    clips those values at 255, so a 16-bit PNG came out solid white."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img) or img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        else:  # 16-bit samples (PNG), also when PIL gives them as 32-bit 'I'
            top = 65535.0 if img.mode.startswith("I;16") or (arr.size and arr.max() > 255) else 255.0
        img = Image.fromarray(np.clip(np.nan_to_num(arr) * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    return img


def open_image(path: Path):
    """The loaded, upright PIL image at ``path``; an image too large to decode safely is one
    InputError naming the file (PIL refuses files over twice ``Image.MAX_IMAGE_PIXELS``, ~179
    megapixels, as a possible decompression bomb). Refused, not downscaled: shrinking needs the
    whole image decoded first, the memory the limit is there to protect; the user's image editor
    does it once. Other unreadable files raise as PIL does (callers skip them with a warning)."""
    from PIL import Image

    try:
        with Image.open(path) as src:
            src.load()
            img = upright_rgb_ready(src)
            return img.copy() if img is src else img  # closing ``src`` invalidates its pixels
    except Image.DecompressionBombError as exc:
        size = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f" ({int(size.group(1)) / 1e6:.0f} megapixels)" if size else ""
        raise InputError(f"Image {path} is too large to load safely{pixels}; scale it down to a few "
                         "thousand pixels a side and run again.") from None


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
        img = open_image(path)
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
    for f in image_files(paths, warn):
        try:
            img = open_image(f)
            out.append(pil_to_tensor(img, resolution, fit))
            alpha = alpha_channel(img) if mask_dir is None else None
        except (UnidentifiedImageError, OSError, ValueError):
            warn(f"skipping {f}: not an image")
            continue
        if mask_dir is not None:
            source = mask_file(Path(mask_dir), f)
            masks.append(read_mask(source, resolution, fit))
        else:
            source = f
            masks.append(None if alpha is None else pil_to_mask(alpha, resolution, fit))
        if masks[-1] is not None and float(masks[-1].sum()) <= 0:
            raise InputError(f"The mask of {f} marks nothing to train on ({source.name} is fully "
                             f"{'transparent' if source == f else 'black'}); give it a subject or leave it out.")
    if not out:
        raise InputError("No usable images were given (none of the files could be read as an image).")
    if all(m is None for m in masks):
        return torch.stack(out), None
    full = torch.ones(resolution, resolution)
    return torch.stack(out), torch.stack([full if m is None else m for m in masks])
