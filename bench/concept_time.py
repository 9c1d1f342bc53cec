"""End to end: one concept at the paper's defaults (K = 3, T = 2, rank 4), timed.

Trains one concept through the real path (``train_concept``: encoding the images, every
minibatch, the returned bank) and reports the seconds, the peak memory above the loaded model
(GPU: ``torch.cuda.max_memory_allocated``; CPU: peak RSS), the final loss and the steps skipped
for non-finite gradients, as JSON with the device named. The issue's targets are for a GPU:
at most 120 s and 10 GB on one H100 at 512 px, SD-1.5 in fp16.

    python bench/concept_time.py --device cuda                      # sd15-random, 512 px, fp16, 200 steps
    python bench/concept_time.py --device cuda --memory low        # the low-memory order (bilevel D6)
    python bench/concept_time.py --base tiny --resolution 64 --steps 20   # CPU: shows it works
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _memory import PeakMemory  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="sd15-random")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (64 on tiny)")
    p.add_argument("--steps", type=int, default=200, help="minibatches (the CLI's default)")
    p.add_argument("--method", default="seqlora")
    p.add_argument("--memory", default="default", help="default | low (bilevel D6) | checkpoint | low+checkpoint")
    p.add_argument("--low-memory", action="store_true", help="same as --memory low")
    p.add_argument("--images", type=int, default=4, help="how many scikit-image photos of one concept")
    p.add_argument("--workdir", default=str(ROOT / "out" / "bench"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    if args.low_memory:
        args.memory = "low"

    import torch

    from seqlora_core.app.demo import write_photos
    from seqlora_core.app.images import load_images
    from seqlora_core.hosts.diffusers_host import DiffusersHost
    from seqlora_core.method.trainer import TrainSettings, train_concept

    torch.manual_seed(0)
    host = DiffusersHost.load(args.base, args.device, args.dtype)
    resolution = args.resolution or (64 if host.architecture() == "sd15-tiny" else 512)
    folder = next(iter(write_photos(Path(args.workdir)).values()))
    pixels = load_images([folder], resolution)[: args.images]
    cuda = host.device.type == "cuda"
    settings = TrainSettings(method=args.method, rank=4, steps=args.steps, bilevel_iters=3, inner_steps=2,
                             resolution=resolution, memory=args.memory)
    start = time.perf_counter()
    with PeakMemory(host.device) as memory:
        result = train_concept(host, None, pixels, "<bench>", "dog", settings)
    seconds = time.perf_counter() - start
    row = {
        "benchmark": "concept_time", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(host.device),
        "device_name": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        "cores": os.cpu_count(), "torch": torch.__version__, "dtype": str(host.dtype).removeprefix("torch."),
        "base": args.base, "resolution": resolution, "images": len(pixels), "method": args.method,
        "K": 3, "T": 2, "rank": 4, "steps": args.steps, "memory": args.memory,
        "seconds": seconds, "seconds_per_step": seconds / args.steps,
        "peak_extra_mb": memory.peak, "model_mb": memory.start,
        "final_loss": result.concept.final_loss, "skipped_steps": result.skipped_steps,
    }
    print(json.dumps(row, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = (f"concept_time-{'cuda' if cuda else 'cpu'}-{args.base}-{resolution}px-{row['dtype']}"
            f"{'' if args.memory == 'default' else '-' + args.memory.replace('+', '-')}.json")
    (out / name).write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
