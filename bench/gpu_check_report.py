"""Gather ``bench/gpu_check.sh``'s JSON files into one, read against the GPU goals.

    python bench/gpu_check_report.py OUT_DIR FINAL.json [--seconds S]

OUT_DIR holds the per-benchmark folders the script wrote (concept_time/, step_cost/,
kept_graph/, compile_check/); FINAL.json gets them all, the device named once, and one verdict
per goal (met / missed / not measured). Seconds per concept are extrapolated from the measured
minibatches to the CLI's default of 200: the run is sized to fit 8 minutes, a concept is not.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_STEPS = 200  # minibatches per concept, the CLI's default
GOALS = {"seconds_per_concept": 120.0, "peak_gb": 10.0, "seqlora_over_alternating_time": 1.5}


def load_all(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def verdict(value: float | None, goal: float) -> str:
    return "not measured" if value is None else ("met" if value <= goal else "missed")


def report(out: Path, seconds: float | None = None) -> dict:
    concept_rows = load_all(out / "concept_time")
    step_rows = load_all(out / "step_cost")
    kept_rows = load_all(out / "kept_graph")
    compile_rows = load_all(out / "compile_check")
    if not concept_rows:
        raise SystemExit(f"no concept_time results under {out} yet")
    concepts = [{"dtype": r["dtype"], "memory": r["memory"], "resolution": r["resolution"], "steps_measured": r["steps"],
                 "seconds_per_step": r["seconds_per_step"], "seconds_per_concept": r["seconds_per_step"] * DEFAULT_STEPS,
                 "peak_gb": (r["peak_extra_mb"] + r["model_mb"]) / 1024, "peak_extra_gb": r["peak_extra_mb"] / 1024,
                 "skipped_steps": r["skipped_steps"], "final_loss": r["final_loss"]} for r in concept_rows]
    default = [c for c in concepts if c["memory"] == "default"]
    fastest = min((c["seconds_per_concept"] for c in default), default=None)
    lowest_peak = min((c["peak_gb"] for c in concepts), default=None)
    ratio = step_rows[0]["seqlora_over_alternating_time"] if step_rows else None
    first = concept_rows[0]
    return {
        "benchmark": "gpu_check", "device": first["device"], "device_name": first["device_name"], "torch": first["torch"],
        "base": first["base"], "wall_seconds": seconds,
        "goals": {
            "seconds_per_concept": {"goal": GOALS["seconds_per_concept"], "best_default_memory": fastest,
                                    "verdict": verdict(fastest, GOALS["seconds_per_concept"])},
            "peak_gb": {"goal": GOALS["peak_gb"], "lowest": lowest_peak, "verdict": verdict(lowest_peak, GOALS["peak_gb"])},
            "seqlora_over_alternating_time": {"goal": GOALS["seqlora_over_alternating_time"], "measured": ratio,
                                              "verdict": verdict(ratio, GOALS["seqlora_over_alternating_time"])},
        },
        "concept_time": concepts, "step_cost": step_rows, "kept_graph": kept_rows, "compile_check": compile_rows,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("final", type=Path)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--quiet", action="store_true", help="write the JSON, print nothing (after each step)")
    args = p.parse_args()
    result = report(args.out, args.seconds)
    args.final.parent.mkdir(parents=True, exist_ok=True)
    args.final.write_text(json.dumps(result, indent=2) + "\n")
    if args.quiet:
        return
    print(f"{result['device_name']} ({result['device']}), {result['base']}, {result['wall_seconds']} s in all")
    for c in result["concept_time"]:
        print(f"  concept {c['dtype']:<9} {c['memory']:<15} {c['seconds_per_concept']:8.1f} s per {DEFAULT_STEPS}-minibatch "
              f"concept   peak {c['peak_gb']:.2f} GB   skipped {c['skipped_steps']}")
    for name, goal in result["goals"].items():
        print(f"  goal {name}: {goal['verdict']} ({ {k: v for k, v in goal.items() if k != 'verdict'} })")
    for c in result["compile_check"]:
        print(f"  torch.compile ({c['backend']}): compiled/eager {c['compiled_over_eager']}, "
              f"twice-differentiated pass compiled: {'runs' if c['twice_differentiated_compiled_runs'] else c['twice_differentiated_error']}")
    print(f"wrote {args.final}")


if __name__ == "__main__":
    main()
