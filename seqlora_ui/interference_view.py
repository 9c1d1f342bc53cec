"""The Bank tab's interference view: the matrix as a heat map plus its worded summary.

Kept out of ``tab.py`` so that it can be tested without a browser; the figures come from
``seqlora_core.method.interference``, the words from ``seqlora_core.app.interference_report``.
"""
from __future__ import annotations

import html

import numpy as np

from seqlora_core.app.interference_report import interference_text
from seqlora_core.app.plot import heatmap_image
from seqlora_core.method.interference import bank_interference


def interference_view(bank) -> tuple[str, np.ndarray | None]:
    """(HTML text, (H, W, 3) uint8 heat map or None) for ``bank`` (None: no bank open)."""
    if bank is None or not bank.concepts:
        return "Open a bank with concepts to see how much they disturb one another.", None
    result = bank_interference(bank)
    text = "<pre>" + html.escape(interference_text(bank, result=result)) + "</pre>"
    if len(result.missing_stats) == len(result.concepts):
        return text, None
    return text, heatmap_image(result.matrix, result.concepts, "interference (row: affected, column: added)")
