"""Cost of regional composition per sampling step, against plain composition, side by side.

One sampling step = one UNet call on the classifier-free-guidance batch (2 rows), with a bank of
four concepts (default targets) composed. Plain composition, then 2 and 4 regions (boxes tiling
the image, one concept named per box) with global and with confined residuals, on the full-size
SD-1.5 architecture with random weights; one run, interleaved repeats, median times. Regional
attention adds cross-attention work only (one extra K/V projection and attention per region per
cross-attention layer), never a UNet pass per region; confinement adds one text-encoder pass per
region (its own concepts), once per picture, and regional attention on the unconditional row.

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


def _bank(host, concepts: int):
    """``concepts`` concepts with random factors on the default targets (no training needed)."""
    import torch

    from seqlora_core.bank.format import Concept
    from seqlora_core.method.targets import select_layers
    from seqlora_core.method.trainer import new_bank

    bank = new_bank(host)
    gen = torch.Generator().manual_seed(1)
    d = host.init_embedding("cat").shape[1]
    for i in range(concepts):
        a, b = {}, {}
        for name, layer in select_layers(host.linear_layers(), "default").items():
            b[name] = bank.projector(name, layer.in_features).random_orthonormal(4, gen)
            a[name] = 0.01 * torch.randn(layer.out_features, 4, generator=gen)
        bank = bank.with_concept(Concept(f"c{i}", f"<c{i}>", "cat", 4, "seqlora", a, b, torch.randn(1, d, generator=gen)))
    return bank


def main() -> None:
    import contextlib

    import torch

    from seqlora_core.hosts.diffusers_host import DiffusersHost
    from seqlora_core.sampling.generate import _compose
    from seqlora_core.sampling.regions import Region

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
    bank = _bank(host, 4)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, res // 8, res // 8, generator=g).to(host.device, host.dtype)
    t = torch.tensor([500, 500], device=host.device)

    def tiling(n):  # one concept per box, as a user composes them
        w = res / n
        return [Region(f"a photo of <c{i}>", box=(i * w, 0, (i + 1) * w, res)) for i in range(n)]

    configs = {"plain": ((), "global"), "2 regions": (tiling(2), "global"), "2 confined": (tiling(2), "confined"),
               "4 regions": (tiling(4), "global"), "4 confined": (tiling(4), "confined")}
    times = {k: [] for k in configs}
    encode = {k: [] for k in configs}

    def sync():
        if host.device.type == "cuda":
            torch.cuda.synchronize()

    def step(name):
        regions, mode = configs[name]
        with torch.no_grad(), contextlib.ExitStack() as stack:
            sync()
            start = time.perf_counter()
            cond = _compose(stack, host, bank, "a scene", None, None, "", regions, mode, res)  # prompts encoded
            sync()
            encode[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            host.predict_noise(latent, t, cond)
            sync()
            times[name].append(time.perf_counter() - start)

    for name in configs:  # warm-up
        step(name)
    times = {k: [] for k in configs}
    encode = {k: [] for k in configs}
    for _ in range(args.repeats):
        for name in configs:
            step(name)
    device_name = torch.cuda.get_device_name() if host.device.type == "cuda" else "cpu"
    settings = {"base": args.base, "resolution": res, "cfg_batch": 2, "repeats": args.repeats,
                "dtype": str(host.dtype), "torch": torch.__version__, "concepts": 4, "targets": "default"}
    report("regional_cost", times, encode, host.device, device_name, settings, Path(args.out))


def report(benchmark: str, times: dict[str, list[float]], encode: dict[str, list[float]], device, device_name: str,
           settings: dict, out: Path) -> Path:
    """Print each configuration's median step and its overhead over ``plain``, and write the JSON
    (``<benchmark>-<device type>-<resolution>px.json``); shared with ``a1111_regional_cost.py``."""
    med = {k: statistics.median(v) for k, v in times.items()}
    med_encode = {k: statistics.median(v) for k, v in encode.items()}
    for k in times:
        print(f"{k:<11} {med[k]:7.3f} s/step   overhead x{med[k] / med['plain']:.3f}   composed and prompts encoded "
              f"in {med_encode[k] * 1000:6.1f} ms once per picture   ({', '.join(f'{x:.3f}' for x in times[k])})")
    result = {"benchmark": benchmark, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "device": str(device), "device_name": device_name},
              "settings": settings, "seconds_per_step": times, "median": med, "encode_seconds": encode,
              "median_encode": med_encode, "overhead": {k: med[k] / med["plain"] for k in times}}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{benchmark}-{device.type}-{settings['resolution']}px.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
