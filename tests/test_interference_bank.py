"""Interference from a real (tiny) bank's stored statistics, the forecast before training, and the CLI."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import quick_settings
from seqlora_core.method.forecast import forecast_training
from seqlora_core.method.interference import bank_interference, measured_exposure
from seqlora_core.method.trainer import train_concept

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--steps", "1", "--bilevel-iters", "1", "--lr-a", "3e-3", "--lr-b", "3e-3"]


def test_matrix_from_the_bank_alone(stream_bank):
    result = bank_interference(stream_bank)
    ids = [c.id for c in stream_bank.concepts]
    assert result.concepts == ids and result.missing_stats == []
    for i, row in enumerate(result.matrix):
        for j, value in enumerate(row):
            assert (value is None) == (i == j)
            if i != j:
                assert math.isfinite(value) and value >= 0
    assert max(v for row in result.matrix for v in row if v is not None) > 0  # orthogonal bases, yet inputs overlap
    name, share, affected, added = result.worst_layers(1)[0]
    assert name in stream_bank.layer_shapes() and share > 0 and affected in ids and added in ids
    # per-layer shares add up to the matrix entry
    i, j = ids.index(affected), ids.index(added)
    total = sum(table[i][j] for table in result.layers.values() if table[i][j] is not None)
    assert abs(total - result.matrix[i][j]) <= 1e-9 * max(1.0, result.matrix[i][j])


def test_forecast_bounds_what_the_trained_concept_reads(host, stream_bank, pixels):
    token = list(pixels)[3]
    settings = quick_settings("seqlora")
    fc = forecast_training(host, stream_bank, pixels[token], token, "thing", settings)
    assert fc.concepts == [c.id for c in stream_bank.concepts]
    assert 0 < fc.new_free_fraction <= 1 + 1e-9
    for b, e, f in zip(fc.bound, fc.expected, fc.free):
        assert 0 <= e <= b + 1e-9 and 0 < b <= f + 1e-9 and f <= 1 + 1e-9
    new = train_concept(host, stream_bank, pixels[token], token, "thing", settings).concept
    factors = {l: (new.A[l], new.B[l]) for l in new.A}
    for old, bound in zip(stream_bank.concepts, fc.bound):
        measured = measured_exposure(factors, old.stats)
        assert 0 < measured <= bound * (1 + 1e-4) + 1e-9


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), SEQLORA_CACHE=str(ROOT / ".cache"))
    proc = subprocess.run([sys.executable, "-m", "seqlora_core", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cli_forecast_then_interference(photos, tmp_path):
    bank = tmp_path / "bank.safetensors"
    first, second = list(photos)[:2]
    cli("train", "--bank", bank, "--base", "tiny", "--images", photos[first], "--token", first, *QUICK)
    before = bank.read_bytes()
    only = cli("train", "--bank", bank, "--base", "tiny", "--images", photos[second], "--token", second,
               "--forecast-only", *QUICK)
    assert f"forecast for {second}" in only and "random-weight" in only
    assert bank.read_bytes() == before  # a forecast alone changes nothing
    out = cli("train", "--bank", bank, "--base", "tiny", "--images", photos[second], "--token", second,
              "--forecast", *QUICK)
    at_most = float(re.search(rf"{first.strip('<>')}\s+([\d.]+) %", out).group(1))
    reads = float(re.search(r"reads ([\d.]+) % of its energy \(forecast at most ([\d.]+) %\)", out).group(1))
    assert 0 < reads <= at_most + 0.01  # printed with two decimals
    data = json.loads(cli("bank", "interference", bank, "--json"))
    assert data["concepts"] == [first.strip("<>"), second.strip("<>")]
    assert data["matrix"][0][0] is None and data["matrix"][1][1] is None
    assert data["matrix"][0][1] > 0 and data["matrix"][1][0] > 0
    assert data["layers"] and data["worst_layers"][0]["layer"] in data["layers"]
    text = cli("bank", "interference", bank)
    assert "worst layers:" in text and "most disturbed:" in text and "random-weight" in text


def test_bank_tab_view_shows_the_heat_map_and_the_words(stream_bank):
    from seqlora_ui.interference_view import interference_view

    text, image = interference_view(stream_bank)
    assert "worst layers:" in text and "random-weight" in text
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
    red_cells = ((image[..., 0] == 255) & (image[..., 1] < 128)).sum()
    assert red_cells > 0  # the worst pair is drawn strongly red
    assert interference_view(None)[1] is None
