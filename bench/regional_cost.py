"""Cost of regional composition per sampling step, against plain composition, side by side.

One sampling step = one UNet call on the classifier-free-guidance batch (2 rows), with a bank's
concepts composed. Plain composition, then 2 and 4 regions (boxes tiling the image), on the
full-size SD-1.5 architecture with random weights; one run, interleaved repeats, median times.
Regional attention adds cross-attention work only (one extra K/V projection and attention per
region per cross-attention layer), never a UNet pass per region.

    python bench/regional_cost.py                  # CPU, 256 px (32×32 latent)
    python bench/regional_cost.py --device cuda    # GPU, 512 px
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from seqlora_core.hosts.diffusers_host import DiffusersHost
    from seqlora_core.sampling.regions import Region, RegionalState, region_masks, regional_unet

    p = argparse.ArgumentParser()
    p.add_argument("--base", default="sd15-random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    res = args.resolution or (512 if args.device == "cuda" else 256)
    torch.manual_seed(0)
    host = DiffusersHost.load(args.base, args.device)
    d = host.text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, res // 8, res // 8, generator=g).to(host.device, host.dtype)
    cond = torch.randn(2, 77, d, generator=g).to(host.device, host.dtype)
    t = torch.tensor([500, 500], device=host.device)

    def tiling(n):
        w = res / n
        return [Region(f"r{i}", box=(i * w, 0, (i + 1) * w, res)) for i in range(n)]

    configs = {"plain": None, "2 regions": tiling(2), "4 regions": tiling(4)}
    times = {k: [] for k in configs}

    def step(regions):
        if regions is None:
            with torch.no_grad():
                host.predict_noise(latent, t, cond)
            return
        state = RegionalState(region_masks(regions, res, res), torch.randn(len(regions), 77, d, generator=g).to(host.device, host.dtype),
                              rows=torch.tensor([False, True]), latent_hw=(res // 8, res // 8))
        with torch.no_grad(), regional_unet(host.unet, state):
            host.predict_noise(latent, t, cond)

    for regions in configs.values():  # warm-up
        step(regions)
    for _ in range(args.repeats):
        for name, regions in configs.items():
            if host.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(regions)
            if host.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in configs:
        print(f"{k:<10} {med[k]:7.3f} s/step   overhead x{med[k] / med['plain']:.3f}   ({', '.join(f'{x:.3f}' for x in times[k])})")
    result = {"benchmark": "regional_cost", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "device": str(host.device),
                          "device_name": torch.cuda.get_device_name() if host.device.type == "cuda" else "cpu"},
              "settings": {"base": args.base, "resolution": res, "cfg_batch": 2, "repeats": args.repeats,
                           "dtype": str(host.dtype), "torch": torch.__version__},
              "seconds_per_step": times, "median": med,
              "overhead": {k: med[k] / med["plain"] for k in configs}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"regional_cost-{host.device.type}-{res}px.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
