"""Interference and forecast on the ComfyUI and tab surfaces, without ComfyUI or a browser: the
data Basis Bank Info hands its panel and its `interference` output, and the tab's Forecast button."""
from __future__ import annotations

import json
import re

import pytest

from conftest import quick_settings
from seqlora_core.method.forecast import forecast_training
from seqlora_core.method.interference import bank_interference
from seqlora_core.settings import TRAINING_SETTINGS


def test_info_node_panel_carries_the_matrix_and_the_worst_layers(stream_bank):
    from nodes.operations import interference_info

    text, panel = interference_info(stream_bank)
    result = bank_interference(stream_bank)
    assert panel["concepts"] == result.concepts
    assert panel["tokens"] == [c.token for c in stream_bank.concepts]
    assert panel["matrix"] == result.matrix
    n = len(stream_bank.concepts)
    assert all((panel["matrix"][i][j] is None) == (i == j) for i in range(n) for j in range(n))
    assert len(panel["worst_layers"]) == 3
    shares = [w["share"] for w in panel["worst_layers"]]
    assert shares == sorted(shares, reverse=True) and shares[0] > 0
    assert all(w["layer"] in stream_bank.layer_shapes() for w in panel["worst_layers"])
    assert {w["affected"] for w in panel["worst_layers"]} <= set(result.concepts)
    assert "random-weight" in panel["note"]
    json.dumps(panel, allow_nan=False)  # what ComfyUI sends to the browser: strict JSON
    # the node's `interference` output: the same matrix in words, the worst layers named
    assert "worst layers:" in text and "most disturbed:" in text
    for w in panel["worst_layers"]:
        assert w["layer"] in text
    affected, added, value = result.worst_pair()
    assert f"most disturbed: {affected} by {added}: {value:.3g}" in text


def test_info_node_on_an_empty_bank(stream_bank):
    from nodes.operations import interference_info

    empty = stream_bank
    for c in stream_bank.concepts:
        empty = empty.without(c.id)
    assert interference_info(empty) == ("the bank holds no concepts", None)


@pytest.fixture()
def tab(host, stream_bank, tmp_path):
    pytest.importorskip("gradio")
    from seqlora_ui.tab import TabActions, TabSession

    bank_path = tmp_path / "bank.safetensors"
    stream_bank.save(bank_path)
    return TabActions(TabSession(host_factory=lambda: host, bank_path=bank_path, resolution=64)), bank_path


def _values(**over):
    quick = {**quick_settings().__dict__, **over}
    return [quick.get(s.name, s.default) for s in TRAINING_SETTINGS]


def test_tab_forecast_button_reports_without_training(tab, host, stream_bank, photos, pixels):
    actions, bank_path = tab
    token = list(photos)[3]
    files = sorted(str(p) for p in photos[token].iterdir())
    before = bank_path.read_bytes()
    html_text = actions.forecast(files, token, "thing", *_values())
    assert "seqlora-forecast" in html_text and "seqlora-error" not in html_text
    assert f"forecast for {token.replace('<', '&lt;').replace('>', '&gt;')}" in html_text
    assert "random-weight" in html_text
    assert bank_path.read_bytes() == before  # nothing trained, nothing saved
    # the figures are the core's forecast for these images, bank and settings
    fc = forecast_training(host, stream_bank, pixels[token], token, "thing", quick_settings())
    for ident, bound in zip(fc.concepts, fc.bound):
        shown = re.search(rf"{ident}\s+([\d.]+) %", html_text)
        assert shown and abs(float(shown.group(1)) - 100 * bound) < 0.006, ident


def test_tab_forecast_button_errors_are_one_sentence(tab, photos):
    actions, _ = tab
    taken = list(photos)[0]
    files = sorted(str(p) for p in photos[taken].iterdir())
    assert "seqlora-error" in actions.forecast([], "<new>", "thing", *_values())
    taken_msg = actions.forecast(files, taken, "thing", *_values())
    assert "seqlora-error" in taken_msg and "already has" in taken_msg
    bad = actions.forecast(files, "<new>", "thing", *_values(rank=0))
    assert "seqlora-error" in bad


def test_forecast_refuses_a_bank_for_another_base(host, stream_bank, pixels):
    from dataclasses import replace

    from seqlora_core.errors import BankError

    from tests.test_cli import ANOTHER_BASE

    other = replace(stream_bank, base={**stream_bank.base, **ANOTHER_BASE})
    token = list(pixels)[3]
    with pytest.raises(BankError, match="another base"):
        forecast_training(host, other, pixels[token], token, "thing", quick_settings())


def test_forecast_in_half_precision_matches_fp32(pixels):
    """The forecast pass on a fp16 / bf16 model (a ComfyUI or A1111 base in half precision)."""
    import torch

    from seqlora_core.hosts.diffusers_host import DiffusersHost
    from seqlora_core.method.trainer import train_concept

    first, second = list(pixels)[:2]
    bounds = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        host = DiffusersHost.load("tiny", "cpu", dtype)
        bank = train_concept(host, None, pixels[first], first, "thing", quick_settings()).bank
        fc = forecast_training(host, bank, pixels[second], second, "thing", quick_settings())
        (b,), (e,), (f,) = fc.bound, fc.expected, fc.free
        assert 0 <= e <= b + 1e-6 and 0 < b <= f + 1e-6 and f <= 1 + 1e-6, dtype
        assert 0 < fc.new_free_fraction <= 1 + 1e-6
        bounds[dtype] = b
    assert abs(bounds[torch.bfloat16] - bounds[torch.float32]) < 0.05
    assert abs(bounds[torch.float16] - bounds[torch.float32]) < 0.05
