"""Reference photos from a folder under ComfyUI's input/, for Train Concept.

ComfyUI users keep a concept's photos in a folder; one Load Image per photo chained through
ImageBatch also needs every photo at the same size. Here a whole folder becomes one IMAGE batch,
each photo cropped, padded or stretched to a square of the chosen size (``seqlora_core.app.images``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from seqlora_core.app.images import IMAGE_SUFFIXES, load_images_and_masks
from seqlora_core.errors import InputError


def image_folders(input_dir: str) -> list[str]:
    """Sub-folders of ``input_dir`` (relative, '/'-separated, sorted) that hold at least one image."""
    root = Path(input_dir)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if Path(dirpath) != root and any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in filenames):
            found.append(Path(dirpath).relative_to(root).as_posix())
    return sorted(found)


def folder_path(input_dir: str, folder: str) -> Path:
    """The folder inside ``input_dir``; refuses paths that leave it."""
    root = Path(input_dir).resolve()
    path = (root / folder).resolve()
    if root not in path.parents or not path.is_dir():
        raise InputError(f"There is no folder '{folder}' in ComfyUI's input folder.")
    return path


def load_folder(input_dir: str, folder: str, size: int, fit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI IMAGE (N, size, size, 3) in [0, 1] of every image in the folder (sorted by name), and
    its MASK (N, size, size) as ComfyUI's Load Image gives it: 1 - alpha (1 where a PNG is
    transparent, 0 for photos without transparency; ``pad``'s bars are 1 in a photo with
    transparency)."""
    skipped: list[str] = []
    pixels, masks = load_images_and_masks([folder_path(input_dir, folder)], size, warn=skipped.append, fit=fit)
    masks = torch.ones(len(pixels), size, size) if masks is None else masks
    images = ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
    return images, (1 - masks).contiguous()
