"""Does training stay small and finite? The demo's stream under its shipped settings, per step rule.

Trains the demo's four-concept stream of scikit-image photos (``seqlora_core.app.demo``: same
images, settings and 30 minibatches × K = 3 iterations) with ``seqlora`` under each step-rule
variant named on the command line, and with unconstrained ``lora`` beside it, for each seed and
each thread count (the same seed on 1 and 2 threads differed by 70× in ‖A‖ under the old rule:
the reduction order is enough to tip a chaotic run). Per concept: the largest ‖A‖_F of a layer,
the largest |A·Bᵀ| entry (fp16's largest number is 65504), ‖ΔW‖, seconds, its loss right after
its training and after the whole stream, and the later concepts' drift on its prompt (relative
and absolute, ``app.evaluate.drift_figures``).

A variant is RULE/HYPERGRADIENT/START (``method.bilevel``, deviations D1–D3):
RULE ``trust-region`` (the default since issue 17) or ``calibrated-once``
(the rule before it); HYPERGRADIENT ``truncated``, ``paper`` or ``unrolled``; START ``a-plus``
(step 5 from A⁺) or ``a`` (DESIGN as written).

    python bench/stability.py --variants calibrated-once/paper/a-plus,trust-region/paper/a-plus,trust-region/truncated/a-plus \\
        --seeds 0,1 --threads 1,2          # writes bench/results/stability-tiny-cpu.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import seqlora_core.method.trainer as trainer  # noqa: E402
from seqlora_core.app.demo import STREAM, run_stream, write_photos  # noqa: E402
from seqlora_core.errors import SeqLoRAError  # noqa: E402
from seqlora_core.hosts.diffusers_host import DiffusersHost  # noqa: E402

DEFAULT_VARIANT = "trust-region/paper/a-plus"


def parse_variant(text: str) -> dict:
    rule, hypergradient, start = text.split("/")
    return {"inner_rule": rule, "hypergradient": hypergradient, "a_start": start}


class variant_applied:
    """Within the block, the trainer builds its BilevelConfig with these fields replaced."""

    def __init__(self, fields: dict):
        self.fields, self._original = fields, trainer.bilevel_config

    def __enter__(self):
        original = self._original
        trainer.bilevel_config = lambda settings: dataclasses.replace(original(settings), **self.fields)

    def __exit__(self, *exc):
        trainer.bilevel_config = self._original


def stream_figures(host, method: str, photos: dict, steps: int, seed: int, threads: int, fields: dict | None,
                   stream=STREAM, log=lambda *_: None) -> dict:
    """One stream's per-concept figures (``rows``), or where it stopped (``error``)."""
    torch.set_num_threads(threads)
    start = time.time()
    try:
        with variant_applied(fields or {}):
            _, rows = run_stream(host, method, photos, steps, log, seed=seed, stream=stream)
        error = None
    except SeqLoRAError as e:
        rows, error = [], str(e)
    return {"method": method, "seed": seed, "threads": threads, "variant": fields, "rows": rows, "error": error,
            "seconds": time.time() - start}


def summary(run: dict) -> dict:
    rows = run["rows"]
    if not rows:
        return {"error": run["error"]}
    earlier = rows[:-1]
    mean = lambda key: sum(r[key] for r in earlier) / max(1, len(earlier))  # noqa: E731
    return {"max_a": max(r["residual_max_a"] for r in rows), "max_entry": max(r["residual_max_entry"] for r in rows),
            "forgetting": sum(abs(r["after_all"] - r["after_own"]) for r in earlier) / max(1, len(earlier)),
            "drift": mean("drift"), "drift_abs": mean("drift_abs"),
            "own_loss": sum(r["after_own"] for r in rows) / len(rows),
            "seconds_per_concept": sum(r["seconds"] for r in rows) / len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=DEFAULT_VARIANT)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-lora", action="store_true", help="skip the unconstrained baseline")
    ap.add_argument("--base", default="tiny", choices=("tiny", "toy"))
    ap.add_argument("--out", default=None, help="default bench/results/stability-<base>-cpu.json")
    args = ap.parse_args()
    args.out = args.out or str(ROOT / "bench" / "results" / f"stability-{args.base}-cpu.json")
    host = DiffusersHost.load(args.base, "cpu")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        photos = write_photos(Path(tmp))
        for seed in [int(s) for s in args.seeds.split(",")]:
            for threads in [int(t) for t in args.threads.split(",")]:
                jobs = [("seqlora", parse_variant(v)) for v in args.variants.split(",")]
                jobs += [] if args.no_lora else [("lora", None)]
                for method, fields in jobs:
                    run = stream_figures(host, method, photos, args.steps, seed, threads, fields)
                    run["summary"] = summary(run)
                    runs.append(run)
                    name = method if fields is None else "/".join(fields.values())
                    print(json.dumps({"run": name, "seed": seed, "threads": threads, **run["summary"]}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(previous + runs, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
