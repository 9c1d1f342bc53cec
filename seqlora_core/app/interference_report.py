"""Interference and forecast as text lines, shared by the command line and the tab.

The figures come from ``method.interference``; this module only words them, including what
they do and do not cover (the stored top-q principal directions; random-weight bases).
"""
from __future__ import annotations

import json

from ..method.interference import ExposureForecast, Interference, concept_moments, measured_exposure

RANDOM_BASES = ("sd15-tiny",)
MATRIX_MEANING = ("interference[row][column]: energy of the column concept's residual on the row concept's "
                  "layer inputs, relative to the row concept's own residual there, summed over layers "
                  "(in the top principal directions of the row concept's stored activation statistics)")


def honesty_line(bank) -> str | None:
    """A warning when the bank belongs to a random-weight base (its figures show the machinery),
    or to the toy base (a small model that has learned only its toy world)."""
    if bank.base.get("architecture") not in RANDOM_BASES:
        return None
    from ..hosts.base_models import TOY_RECORD

    if TOY_RECORD.exists() and bank.base.get("fingerprint") == json.loads(TOY_RECORD.read_text()).get("fingerprint"):
        return ("note: this bank was trained on the toy base, which has learned only a world of coloured shapes; "
                "the figures show how concepts interact there, not on SD-1.5")
    return ("note: this bank was trained on the random-weight tiny model; the figures show the machinery, "
            "not how real concepts interact")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def matrix_lines(result: Interference, worst: int = 3) -> list[str]:
    ids = result.concepts
    width = max([8] + [len(i) for i in ids]) + 1
    lines = [MATRIX_MEANING, " " * width + "".join(f"{i[:9]:>10}" for i in ids)]
    for i, row in zip(ids, result.matrix):
        lines.append(f"{i:<{width}}" + "".join(f"{_fmt(v):>10}" for v in row))
    pair = result.worst_pair()
    if pair is not None:
        affected, added, value = pair
        lines.append(f"most disturbed: {affected} by {added}: {value:.3g} times {affected}'s own residual energy")
    layers = result.worst_layers(worst)
    if layers:
        lines.append("worst layers:")
        lines += [f"  {name}  {value:.3g} ({added} on {affected})" for name, value, affected, added in layers]
    if result.missing_stats:
        lines.append("no activation statistics (trained before bank format 2 or with --stats-q 0), rows left "
                     f"empty: {', '.join(result.missing_stats)}")
    return lines


def forecast_lines(fc: ExposureForecast, token: str) -> list[str]:
    lines = [f"forecast for {token} over {fc.layers} layer(s), before training:"]
    if fc.new_free_fraction is not None:
        lines.append(f"  {100 * fc.new_free_fraction:.1f} % of {token}'s own input energy lies in the free space "
                     "its basis is confined to")
    if not fc.concepts:
        lines.append("  the bank is empty: nothing to disturb")
        return lines
    lines.append("  share of each earlier concept's activation energy the new concept can read "
                 "(at most / expected / free space in all):")
    for ident, b, e, f in zip(fc.concepts, fc.bound, fc.expected, fc.free):
        if b is None:
            lines.append(f"  {ident:<20} no activation statistics stored: cannot forecast")
        else:
            lines.append(f"  {ident:<20} {100 * b:6.2f} % / {100 * (e or 0):6.2f} % / {100 * f:6.2f} %")
    return lines


def after_training_lines(bank, new_id: str, fc: ExposureForecast | None, result: Interference) -> list[str]:
    """The measured row and column of the new concept, and its measured exposure next to the forecast."""
    idx = result.concepts.index(new_id)
    new = bank.get(new_id)
    factors = {l: (new.A[l], new.B[l]) for l in new.A}
    lines = [f"measured after training ({MATRIX_MEANING.split(':')[0]}):"]
    for j, ident in enumerate(result.concepts):
        if j == idx:
            continue
        on_old, on_new = result.matrix[j][idx], result.matrix[idx][j]
        exposure = measured_exposure(factors, concept_moments(bank.get(ident)) or {})
        bound = None
        if fc is not None and ident in fc.concepts:
            bound = fc.bound[fc.concepts.index(ident)]
        reach = "" if exposure is None else f"; reads {100 * exposure:.2f} % of its energy" + (
            "" if bound is None else f" (forecast at most {100 * bound:.2f} %)")
        lines.append(f"  {new_id} on {ident}: {_fmt(on_old)}   {ident} on {new_id}: {_fmt(on_new)}{reach}")
    if len(result.concepts) == 1:
        lines.append("  the only concept in the bank")
    return lines


# -- whole reports, shared by the CLI, the tab and the ComfyUI nodes ---------------------------
def worst_layers_json(result: Interference, count: int = 3) -> list[dict]:
    """The worst layers as records (``bank interference --json``, the ComfyUI panel)."""
    return [{"layer": name, "share": value, "affected": affected, "added": added}
            for name, value, affected, added in result.worst_layers(count)]


def interference_text(bank, worst: int = 3, result: Interference | None = None) -> str:
    """The bank's interference matrix in words (matrix, most disturbed pair, worst layers, and the
    random-weight note where it applies); ``result``: the bank's matrix when already computed."""
    if not bank.concepts:
        return "the bank holds no concepts"
    if result is None:
        from ..method.interference import bank_interference

        result = bank_interference(bank)
    note = honesty_line(bank)
    return "\n".join(matrix_lines(result, worst) + ([note] if note else []))


def forecast_text(fc: ExposureForecast, token: str, bank) -> str:
    """The forecast before training in words, with the random-weight note for such a bank."""
    note = honesty_line(bank) if bank is not None and bank.concepts else None
    return "\n".join(forecast_lines(fc, token) + ([note] if note else []))


def after_training_text(bank, new_id: str, fc: ExposureForecast | None) -> str:
    """The new concept's measured interference row and column, next to the forecast."""
    from ..method.interference import bank_interference

    return "\n".join(after_training_lines(bank, new_id, fc, bank_interference(bank)))
