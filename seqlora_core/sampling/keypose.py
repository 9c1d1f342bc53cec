"""Draw an OpenPose-style keypose image from keypoints (the 18-point body model).

Accepts OpenPose JSON (``{"people": [{"pose_keypoints_2d": [x, y, c, …]}], "canvas_width": W,
"canvas_height": H}``) and draws the colour-coded skeleton that keypose T2I-Adapters and
OpenPose ControlNets were trained on: limbs as thick coloured sticks, joints as dots, on black.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError

# OpenPose BODY-18 limbs (1-based joint indices) and colours, as in the ControlNet annotator
LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
         (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18)]
COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]


def people_keypoints(data: dict) -> list[list[tuple[float, float, float]]]:
    people = []
    for person in data.get("people", []):
        flat = person.get("pose_keypoints_2d", [])
        people.append([tuple(flat[i:i + 3]) for i in range(0, len(flat) - 2, 3)])
    return people


def draw_keypose(data: dict, width: int | None = None, height: int | None = None, stick: int = 4) -> np.ndarray:
    """(H, W, 3) uint8 keypose image; keypoints with confidence 0 are skipped.

    Coordinates ≤ 1 everywhere are read as fractions of the canvas, otherwise as pixels of
    ``canvas_width`` × ``canvas_height`` (rescaled to the requested size).
    """
    from PIL import Image, ImageDraw

    cw, ch = data.get("canvas_width"), data.get("canvas_height")
    width = int(width or cw or 512)
    height = int(height or ch or 512)
    people = people_keypoints(data)
    normalised = all(x <= 1 and y <= 1 for p in people for x, y, _ in p)
    sx = width if normalised else width / float(cw or width)
    sy = height if normalised else height / float(ch or height)
    img = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for points in people:
        pts = [(x * sx, y * sy, c) for x, y, c in points]
        for (a, b), color in zip(LIMBS, COLORS):
            if a <= len(pts) and b <= len(pts) and pts[a - 1][2] > 0 and pts[b - 1][2] > 0:
                draw.line([pts[a - 1][:2], pts[b - 1][:2]], fill=tuple(int(c * 0.6) for c in color), width=stick)
        for (x, y, c), color in zip(pts, COLORS):
            if c > 0:
                draw.ellipse([x - stick, y - stick, x + stick, y + stick], fill=color)
    return np.asarray(img)


def load_image_rgb(path: str | Path, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 of an image file, resized."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB").resize((width, height), Image.BICUBIC))
    except (OSError, UnidentifiedImageError) as exc:  # missing, unreadable or not an image
        raise InputError(f"Cannot read the image {path}: {getattr(exc, 'strerror', None) or exc}.") from None


def load_keypose(path: str | Path, width: int, height: int) -> np.ndarray:
    """A keypose image from a .json of keypoints (drawn) or from an image file (resized)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            return draw_keypose(json.loads(path.read_text()), width, height)
        except OSError as exc:
            raise InputError(f"Cannot read the keypose {path}: {exc.strerror or exc}.") from None
        except (ValueError, TypeError, AttributeError, IndexError) as exc:  # bad JSON or another shape
            raise InputError(f"{path.name} is not OpenPose keypoints JSON (people[].pose_keypoints_2d): "
                             f"{str(exc).splitlines()[0]}.") from None
    return load_image_rgb(path, width, height)
