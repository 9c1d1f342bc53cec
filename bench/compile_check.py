"""Does ``torch.compile`` help a SeqLoRA training step? Timed side by side in one process.

Two questions, on the real loss (``trainer.denoising_loss``, default targets, LoRA hooks bound):

* the once-differentiated pass (forward + ∇ to A, B and the embedding: the inner steps and the
  A step of every iteration) — seconds per pass eager against ``torch.compile(unet)``, after
  warm-up passes that pay the compilation;
* the twice-differentiated pass (∇_A L with its graph, then H_BA[v]) — whether it runs at all
  when compiled (AOTAutograd has no double backward; the expected answer is an error, recorded
  as its first line, not a traceback).

A JSON row with the device named goes to ``--out``. ``--backend aot_eager`` skips code
generation (the CPU dry run of ``bench/gpu_check.sh`` uses it so that CI does not spend minutes
compiling C++); ``inductor`` is the default and what a GPU run measures.

    python bench/compile_check.py --device cuda --resolution 512
    python bench/compile_check.py --base tiny --resolution 64 --backend aot_eager
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed_passes(run, device, n: int) -> float:
    """Mean seconds of ``n`` calls of ``run`` (device synchronised around each)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(n):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="sd15-random")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--backend", default="inductor", help="torch.compile backend: inductor | aot_eager | …")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()

    import torch

    from seqlora_core.hosts.diffusers_host import DiffusersHost
    from seqlora_core.method.bilevel import cross_hessian_vector_product, loss_and_gradients
    from seqlora_core.method.lora import LoRAHooks
    from seqlora_core.method.targets import select_layers
    from seqlora_core.method.trainer import denoising_loss, twice_differentiable

    host = DiffusersHost.load(args.base, args.device, args.dtype)
    dev = host.device
    layers = select_layers(host.linear_layers(), "default")
    names = list(layers)
    g = torch.Generator().manual_seed(0)
    a = [(torch.randn(layers[n].out_features, 4, generator=g) * 0.01).to(dev) for n in names]
    b = [torch.linalg.qr(torch.randn(layers[n].in_features, 4, generator=g))[0].to(dev) for n in names]
    latents = torch.randn(1, 4, args.resolution // 8, args.resolution // 8, generator=g).to(dev)
    noise = torch.randn(latents.shape, generator=g).to(dev)
    t = torch.tensor([400], device=dev)
    emb = [host.init_embedding("cat").to(dev)]

    with LoRAHooks(layers) as hooks:
        def loss_fn(a_, b_, e_):
            hooks.bind(dict(zip(names, a_)), dict(zip(names, b_)))
            return denoising_loss(host, latents + noise, noise, t, ["a photo of <x>"], {"<x>": e_[0]})

        def once() -> None:
            loss_and_gradients(loss_fn, a, b, emb, of=("a", "b", "embedding"))

        def twice() -> None:
            leaves_a = [x.detach().requires_grad_() for x in a]
            leaves_b = [x.detach().requires_grad_() for x in b]
            with twice_differentiable(host)():
                loss = loss_fn(leaves_a, leaves_b, emb)
                grad_a = torch.autograd.grad(loss, leaves_a, create_graph=True)
            cross_hessian_vector_product(grad_a, leaves_b, [torch.ones_like(x) for x in leaves_a])

        timed_passes(once, dev, args.warmup)
        eager = timed_passes(once, dev, args.passes)
        eager_unet = host.unet
        host.unet = torch.compile(eager_unet, backend=args.backend)
        try:
            start = time.perf_counter()
            timed_passes(once, dev, args.warmup)
            warmup_seconds = time.perf_counter() - start
            compiled, compile_error = timed_passes(once, dev, args.passes), None
        except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
            compiled, warmup_seconds, compile_error = None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        try:
            twice()
            twice_error = None
        except Exception as e:  # noqa: BLE001
            twice_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        host.unet = eager_unet

    cuda = dev.type == "cuda"
    row = {"benchmark": "compile_check", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "device": str(dev), "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
           "torch": torch.__version__, "dtype": str(host.dtype).removeprefix("torch."), "base": args.base,
           "resolution": args.resolution, "backend": args.backend, "passes": args.passes,
           "once_differentiated_eager_s": eager, "once_differentiated_compiled_s": compiled,
           "compiled_over_eager": compiled / eager if compiled else None,
           "compile_warmup_s": warmup_seconds, "compile_error": compile_error,
           "twice_differentiated_compiled_runs": twice_error is None, "twice_differentiated_error": twice_error}
    print(json.dumps(row, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compile_check-{'cuda' if cuda else 'cpu'}-{args.base}-{args.resolution}px-{row['dtype']}-{args.backend}.json"
    path.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
