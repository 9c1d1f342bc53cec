"""Memory of the twice-differentiated pass alone, per memory setting: the graph it keeps for the
cross-Hessian product, and the peak of the pass and the product together.

One minibatch of the real loss (``trainer.denoising_loss``, default targets, the trainer's own
``differentiable_context``) at (A, B); three figures above the level before the pass (MiB):
after the forward, once ∇_A L with its graph is held (what stays while the other passes of an
iteration run), and the peak through the product H_BA[v]. Each setting runs in its own process
(``bench/_memory.py``; CPU: resident memory, glibc told to return freed blocks at once so that
resident memory follows the live tensors). JSON to ``bench/results/``.

    python bench/kept_graph.py --base sd15-random --resolution 128
    python bench/kept_graph.py --base sd15-random --resolution 256 --slice-queries 256
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("default", "checkpoint", "slice", "checkpoint+slice")
RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def child(args) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import contextlib

    import torch

    from _memory import PeakMemory, rss_mb
    from seqlora_core.hosts.diffusers_host import DiffusersHost
    from seqlora_core.method.attention_slicing import SlicedAttention
    from seqlora_core.method.lora import LoRAHooks
    from seqlora_core.method.targets import select_layers
    from seqlora_core.method.trainer import denoising_loss, differentiable_context

    SlicedAttention.default_chunk = args.slice_queries
    host = DiffusersHost.load(args.base, args.device, args.dtype)
    layers = select_layers(host.linear_layers(), "default")
    names = list(layers)
    g = torch.Generator().manual_seed(0)
    dev = host.device
    a = [(torch.randn(layers[n].out_features, 4, generator=g) * 0.01).to(dev).requires_grad_() for n in names]
    b = [torch.linalg.qr(torch.randn(layers[n].in_features, 4, generator=g))[0].to(dev).requires_grad_() for n in names]
    latents = torch.randn(1, 4, args.resolution // 8, args.resolution // 8, generator=g).to(dev)
    noise = torch.randn(latents.shape, generator=g).to(dev)
    emb = host.init_embedding("cat").to(dev)
    v = [torch.randn(t.shape, generator=g).to(dev) for t in a]
    context, checkpointing = differentiable_context(host, args.mode)
    with LoRAHooks(layers) as hooks, checkpointing or contextlib.nullcontext():
        if checkpointing is not None:
            checkpointing.hooks = hooks
        hooks.bind(dict(zip(names, a)), dict(zip(names, b)))
        gc.collect()
        with PeakMemory(dev) as peak:
            start = rss_mb() if dev.type == "cpu" else torch.cuda.memory_allocated() / 2**20
            now = (lambda: rss_mb() - start) if dev.type == "cpu" else (lambda: torch.cuda.memory_allocated() / 2**20 - start)
            with context():
                loss = denoising_loss(host, latents + noise, noise, torch.tensor([400], device=dev),
                                      ["a photo of <x>"], {"<x>": emb})
                after_forward = now()
                grad_a = torch.autograd.grad(loss, a, create_graph=True)
            del loss
            gc.collect()
            kept = now()
            torch.autograd.grad(grad_a, b, grad_outputs=v)
            del grad_a
    return {"memory": args.mode, "after_forward_mb": after_forward, "kept_graph_mb": kept,
            "peak_mb": peak.peak, "model_mb": peak.start, "device": str(dev), "dtype": str(host.dtype),
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or platform.machine()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="sd15-random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--slice-queries", type=int, default=1024, help="queries per attention slice for the slice lever")
    p.add_argument("--child", dest="mode", default=None)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode, "--base", args.base, "--device", args.device, "--dtype", args.dtype,
               "--resolution", str(args.resolution), "--slice-queries", str(args.slice_queries)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **RETURN_FREED))
        if proc.returncode != 0:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{mode:<18} after forward +{r['after_forward_mb']:7.0f} MiB   kept graph +{r['kept_graph_mb']:7.0f} MiB   "
              f"peak +{r['peak_mb']:7.0f} MiB", flush=True)
    result = {"benchmark": "kept_graph", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "device": rows[0]["device"], "device_name": rows[0]["device_name"]},
              "settings": {"base": args.base, "resolution": args.resolution, "batch_size": 1, "targets": "default",
                           "dtype": rows[0]["dtype"], "torch": rows[0]["torch"], "slice_queries": args.slice_queries},
              "modes": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if args.device == "cuda" else "cpu"
    path = out / f"kept_graph-{tag}-{args.base}-{args.resolution}px.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
