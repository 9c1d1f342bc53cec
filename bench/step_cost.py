"""Time and peak memory of one training step for seqlora, alternating and frozen-basis.

A "step" is one bilevel iteration on one minibatch (the unit of the paper's cost comparison),
measured through the real training path (``train_concept`` with K = 1) on the full-size SD-1.5
architecture with random weights. The three methods run in this one invocation, each in its own
child process so that peak memory is measured per method (CPU: peak RSS above the loaded
model; GPU: torch.cuda.max_memory_allocated above the loaded model). Results go to
``bench/results/`` as JSON with the machine named.

    python bench/step_cost.py                        # CPU: 128 px (16×16 latent), 3 timed steps
    python bench/step_cost.py --device cuda          # GPU: 512 px, the host's default fp16
    python bench/step_cost.py --methods seqlora --memory low --tag lowmem   # one lever at a time
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("frozen-basis", "alternating", "seqlora")
# glibc: serve big blocks from the heap and never trim it, so freed tensors' pages are reused
KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**34),
              "MALLOC_TOP_PAD_": str(2**30)}


def child(args) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import torch

    from _memory import PeakMemory

    from seqlora_core.hosts.diffusers_host import DiffusersHost
    from seqlora_core.app.images import load_images
    from seqlora_core.method.trainer import TrainSettings, train_concept
    from seqlora_core.app.demo import write_photos

    torch.manual_seed(0)
    host = DiffusersHost.load(args.base, args.device, args.dtype)
    photos = write_photos(Path(args.workdir))
    pixels = load_images([next(iter(photos.values()))], args.resolution)
    cuda = host.device.type == "cuda"
    stamps, cpu_stamps = [], []

    def progress(step, total, loss):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())  # CPU seconds of this process: less sensitive to a busy machine

    settings = TrainSettings(method=args.method, steps=args.steps + 1, bilevel_iters=1, inner_steps=2,
                             resolution=args.resolution, lr_a=1e-4, lr_b=1e-4,
                             memory=args.memory)
    start, cpu_start = time.perf_counter(), time.process_time()
    with PeakMemory(host.device) as memory:
        train_concept(host, None, pixels, "<bench>", "dog", settings, progress)
    times = [b - a for a, b in zip([start] + stamps, stamps)][1:]  # drop the warm-up step
    cpu_times = [b - a for a, b in zip([cpu_start] + cpu_stamps, cpu_stamps)][1:]
    return {"method": args.method, "memory": args.memory, "step_seconds": times, "mean_step_seconds": sum(times) / len(times),
            "cpu_step_seconds": cpu_times, "mean_cpu_step_seconds": sum(cpu_times) / len(cpu_times),
            "peak_extra_mb": memory.peak, "model_mb": memory.start, "device": str(host.device),
            "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            "torch": torch.__version__, "dtype": str(host.dtype)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="sd15-random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--steps", type=int, default=3, help="timed steps per method (after one warm-up)")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--memory", default="default", help="the memory setting: default | low (the kept graph built after "
                   "A+, bilevel D6) | checkpoint (its UNet blocks recomputed, method/checkpointing.py) | low+checkpoint")
    p.add_argument("--low-memory", action="store_true", help="same as --memory low")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    p.add_argument("--child", dest="method", default=None)
    p.add_argument("--workdir", default=str(ROOT / "out" / "bench"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU: let glibc keep freed blocks (as a GPU caching allocator does) instead of "
                        "returning them to the OS after every pass; separates compute from page faults")
    args = p.parse_args()
    if args.low_memory:
        args.memory = "low"
    if args.resolution is None:
        args.resolution = 512 if args.device == "cuda" else 128
    if args.method:
        print(json.dumps(child(args)))
        return
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method, "--base", args.base, "--device", args.device,
               "--resolution", str(args.resolution), "--steps", str(args.steps), "--workdir", args.workdir,
               "--dtype", args.dtype, "--memory", args.memory]
        env = dict(os.environ, **KEEP_FREED) if args.keep_freed_memory else None
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{method:<13} {r['mean_step_seconds']:8.2f} s/step ({r['mean_cpu_step_seconds']:.2f} CPU s)   peak +{r['peak_extra_mb']:8.0f} MiB   "
              f"({', '.join(f'{t:.2f}' for t in r['step_seconds'])})", flush=True)
    by = {r["method"]: r for r in rows}
    ratio_time = ratio_mem = None
    if "seqlora" in by and "alternating" in by:
        ratio_time = by["seqlora"]["mean_step_seconds"] / by["alternating"]["mean_step_seconds"]
        ratio_mem = by["seqlora"]["peak_extra_mb"] / max(by["alternating"]["peak_extra_mb"], 1e-9)
        print(f"seqlora / alternating: time x{ratio_time:.2f} (target <= 1.5), peak memory x{ratio_mem:.2f}")
    result = {
        "benchmark": "step_cost", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "device": rows[0]["device"], "device_name": rows[0]["device_name"]},
        "settings": {"base": args.base, "resolution": args.resolution, "batch_size": 1, "inner_steps": 2,
                     "targets": "default", "timed_steps": args.steps, "dtype": rows[0]["dtype"], "torch": rows[0]["torch"],
                     "keep_freed_memory": args.keep_freed_memory, "memory": args.memory,
                     "low_memory": "low" in args.memory},
        "methods": rows, "seqlora_over_alternating_time": ratio_time, "seqlora_over_alternating_memory": ratio_mem,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if args.device == "cuda" else "cpu"
    memory = "" if args.memory == "default" else "-" + args.memory.replace("+", "-")
    path = out / (f"step_cost-{tag}-{args.resolution}px{'-keepmem' if args.keep_freed_memory else ''}{memory}"
                  f"{'-' + args.tag if args.tag else ''}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
