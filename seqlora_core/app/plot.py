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
