"""A loss curve as an RGB image (no plotting library): for hosts that show images, not plots."""
from __future__ import annotations

import math

import numpy as np


def loss_curve_image(losses: list[float], width: int = 512, height: int = 256) -> np.ndarray:
    """(height, width, 3) uint8: the loss per step, with its moving average, min/max labelled."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 10, 20, height - 24
    draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
    values = [v for v in losses if math.isfinite(v)]
    if values:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        n = max(len(losses) - 1, 1)

        def point(i, v):
            return left + (right - left) * i / n, bottom - (bottom - top) * (v - lo) / span

        pts = [point(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=(170, 190, 230), width=1)
        window = max(1, len(losses) // 10)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        spts = [point(i, v) for i, v in enumerate(smooth) if math.isfinite(v)]
        if len(spts) > 1:
            draw.line(spts, fill=(30, 80, 200), width=2)
        draw.text((4, top - 4), f"{hi:.4f}", fill=(0, 0, 0))
        draw.text((4, bottom - 10), f"{lo:.4f}", fill=(0, 0, 0))
    draw.text((left, bottom + 6), f"loss over {len(losses)} steps", fill=(0, 0, 0))
    return np.asarray(img)


def heat_colour(value: float | None, top: float) -> tuple[int, int, int]:
    """White (0) → red (``top`` or more); grey for a missing value (None, the diagonal)."""
    if value is None or not math.isfinite(value):
        return (215, 215, 215)
    f = max(0.0, min(1.0, value / top)) if top > 0 else 0.0
    return (255, int(255 * (1 - f)), int(255 * (1 - f)))


def heatmap_image(matrix: list[list[float | None]], labels: list[str], title: str = "",
                  top: float | None = None, cell: int = 28) -> np.ndarray:
    """(H, W, 3) uint8: matrix[i][j] as cell (row i, column j), labelled rows and columns.

    ``top`` is the value drawn full red (default: the largest finite entry), printed under the map
    so that maps drawn on a shared scale can be compared; None entries are grey.
    """
    from PIL import Image, ImageDraw

    values = [v for row in matrix for v in row if v is not None and math.isfinite(v)]
    top = top if top is not None else max(values, default=0.0)
    n = len(labels)
    short = [label[:8] for label in labels]
    left, head = 64, 30 + (12 if title else 0)
    legend = f"red = {top:.3g} (row: affected, column: added)"
    width, height = left + n * cell + 10, head + n * cell + 22
    img = Image.new("RGB", (max(width, 6 * max(len(title), len(legend)) + 10), height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0))
    for j, label in enumerate(short):
        draw.text((left + j * cell + 2, head - 14), label[:4], fill=(60, 60, 60))
    for i, row in enumerate(matrix):
        draw.text((4, head + i * cell + cell // 2 - 6), short[i], fill=(60, 60, 60))
        for j, value in enumerate(row):
            box = (left + j * cell, head + i * cell, left + (j + 1) * cell - 1, head + (i + 1) * cell - 1)
            draw.rectangle(box, fill=heat_colour(value, top), outline=(240, 240, 240))
    draw.text((4, head + n * cell + 6), legend, fill=(0, 0, 0))
    return np.asarray(img)
