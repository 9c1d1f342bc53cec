"""The demo's picture grid: what the concepts look like alone, together, in regions, and what
the base draws for its own caption with and without them (``make demo`` writes ``grid.png``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bank.format import Bank
from .identify import sample_picture, to_uint8

TILE = 128  # each 64 px picture drawn at twice its size
LABEL = 26  # pixels of caption under each tile
BASE_CAPTION = "a yellow circle on a blue background"


def _picture(host, bank: Bank, prompt: str, ids, regions=()) -> np.ndarray:
    return sample_picture(host, bank, prompt, ids, 0, regions)


def grid_rows(host, bank: Bank, stream, photos: dict | None = None) -> list[list[tuple[np.ndarray, str]]]:
    """Rows of (picture, label): the training photos; each concept alone; each with every
    concept loaded; two composed in one prompt, the same two in two regions, the base's caption
    on the base alone and with every concept loaded."""
    from ..method.trainer import new_bank
    from ..sampling.regions import Region

    tokens = [t for t, _, _ in stream]
    ids = {c.token: c.id for c in bank.concepts}
    rows = []
    if photos is not None:
        rows.append([(to_uint8(photos[t][:1])[0], f"photo {t}") for t in tokens])
    rows.append([(_picture(host, bank, f"a photo of {t}", [ids[t]]), f"{t} alone") for t in tokens])
    rows.append([(_picture(host, bank, f"a photo of {t}", None), f"{t}, all loaded") for t in tokens])
    a, b = tokens[0], tokens[1]
    regions = (Region(f"a photo of {a}", (0, 0, 32, 64)), Region(f"a photo of {b}", (32, 0, 64, 64)))
    rows.append([(_picture(host, bank, f"a photo of {a} and {b}", [ids[a], ids[b]]), f"{a}+{b}"),
                 (_picture(host, bank, f"a photo of {a} and {b}", None, regions=regions), f"{a} | {b} regions"),
                 (_picture(host, new_bank(host), BASE_CAPTION, None), "base caption, base"),  # ([] selects all)
                 (_picture(host, bank, BASE_CAPTION, None), "base caption, all")])
    return rows


def write_grid(host, bank: Bank, stream, path: Path, photos: dict | None = None) -> Path:
    """The grid as one PNG at ``path``."""
    return save_rows(grid_rows(host, bank, stream, photos), path)


def save_rows(rows: list[list[tuple[np.ndarray, str]]], path: Path) -> Path:
    """Rows of (64 px picture, label) as one labelled PNG at ``path``."""
    from PIL import Image, ImageDraw

    width = max(len(r) for r in rows) * TILE
    canvas = Image.new("RGB", (width, len(rows) * (TILE + LABEL)), "white")
    draw = ImageDraw.Draw(canvas)
    for y, row in enumerate(rows):
        for x, (picture, label) in enumerate(row):
            top = y * (TILE + LABEL)
            canvas.paste(Image.fromarray(picture).resize((TILE, TILE), Image.NEAREST), (x * TILE, top))
            draw.text((x * TILE + 3, top + TILE + 6), label[:22], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
