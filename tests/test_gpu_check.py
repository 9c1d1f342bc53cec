"""The prepared GPU run (``bench/gpu_check.sh``) cannot rot: its ``--dry-run`` runs every step of
it on the CPU (``tiny``, 64 px, 2 minibatches) and gathers one JSON read against the GPU goals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_runs_every_step_and_writes_one_json():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((ROOT / "out" / "gpu_check-dryrun" / "gpu_check-cpu.json").read_text())
    assert result["device"] == "cpu" and result["base"] == "tiny"
    assert {(c["dtype"], c["memory"]) for c in result["concept_time"]} == {
        (d, m) for d in ("float16", "bfloat16") for m in ("default", "low+checkpoint")}
    # fp16's dynamic loss scale may skip its first iterations (2 minibatches x K = 3 here); bf16 needs none
    assert all(c["seconds_per_concept"] > 0 and c["skipped_steps"] < 2 * 3 for c in result["concept_time"])
    assert all(c["skipped_steps"] == 0 for c in result["concept_time"] if c["dtype"] == "bfloat16")
    assert result["step_cost"][0]["seqlora_over_alternating_time"] > 0
    assert [m["memory"] for m in result["kept_graph"][0]["modes"]] == ["default", "checkpoint+slice"]
    compiled = result["compile_check"][0]
    assert compiled["compile_error"] is None and compiled["once_differentiated_compiled_s"] > 0
    assert set(result["goals"]) == {"seconds_per_concept", "peak_gb", "seqlora_over_alternating_time"}
    assert all(g["verdict"] in ("met", "missed") for g in result["goals"].values())
