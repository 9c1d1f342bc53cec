"""Cost of regional composition per sampling step inside a real A1111, side by side.

The same comparison as ``bench/regional_cost.py`` (plain composition of four concepts, then 2 and
4 boxes tiling the image with global and confined residuals; one UNet call on the CFG batch of
2 rows; interleaved repeats, medians), through A1111's own model and code: its ldm UNet with the
cross-attention optimisation A1111 selected, ``a1111.network.Composition`` and
``a1111.regional``. In A1111 each region calls the selected attention's whole forward (its query
and output projections included, so that xformers / SDP / sub-quadratic stay the user's), where
the diffusers path projects the query once: this measures what that costs.

Run inside A1111's Python, in its checkout (like ``tests/integration/a1111/loss_probe.py``):

    cd A1111_PATH && A1111_PYTHON /path/to/bench/a1111_regional_cost.py [--resolution 256] \\
        [--repeats 3] [--out DIR] -- [A1111 flags, e.g. --use-cpu all --no-half --ckpt FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    argv = sys.argv[1:]
    ours, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser()
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(ours)

    sys.argv = ["webui.py", *flags]
    sys.path.insert(0, os.getcwd())
    from modules import initialize

    initialize.imports()
    initialize.initialize()
    import torch
    from modules import devices, sd_hijack, shared

    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from a1111.host import A1111Host
    from a1111.network import Composition, Pick
    from a1111.regional import RegionalRequest, on_cfg_denoiser
    from regional_cost import _bank, report
    from seqlora_core.sampling.regions import Region

    res = args.resolution
    model = shared.sd_model
    host = A1111Host(model)
    bank = _bank(host, 4)
    picks = [Pick("bench", bank, "bench.safetensors", f"c{i}", 1.0) for i in range(4)]
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, res // 8, res // 8, generator=g)
    t = torch.tensor([500, 500])

    def tiling(n):  # one concept per box, as a user composes them
        w = res / n
        return [Region(f"a photo of <c{i}>", box=(i * w, 0, (i + 1) * w, res)) for i in range(n)]

    configs = {"plain": ((), "global"), "2 regions": (tiling(2), "global"), "2 confined": (tiling(2), "confined"),
               "4 regions": (tiling(4), "global"), "4 confined": (tiling(4), "confined")}

    def step(name, times, encode):
        regions, mode = configs[name]
        composition = Composition(model, sd_hijack.model_hijack.embedding_db)
        with torch.no_grad(), devices.autocast():
            start = time.perf_counter()
            if regions:
                request = RegionalRequest(list(regions), mode, False, (res, res))
                composition.apply_regional(picks, host.linear_layers(), request, "a scene", "", print)
            else:
                composition.apply(picks, host.linear_layers())
            cond, uncond = model.get_learned_conditioning(["a scene"]), model.get_learned_conditioning([""])
            encode[name].append(time.perf_counter() - start)
            on_cfg_denoiser(SimpleNamespace(text_cond=cond, text_uncond=uncond, x=latent, sampling_step=0,
                                            total_sampling_steps=20, denoiser=SimpleNamespace(step=0)))
            start = time.perf_counter()
            host.predict_noise(latent, t, torch.cat([cond, uncond]))
            times[name].append(time.perf_counter() - start)
        composition.remove()

    for name in configs:  # warm-up
        step(name, {name: []}, {name: []})
    times, encode = {k: [] for k in configs}, {k: [] for k in configs}
    for _ in range(args.repeats):
        for name in configs:
            step(name, times, encode)
    device = devices.device
    settings = {"host": "A1111", "flags": flags, "resolution": res, "cfg_batch": 2, "repeats": args.repeats,
                "dtype": str(host.dtype), "torch": torch.__version__,
                "cross_attention": shared.opts.cross_attention_optimization, "concepts": 4, "targets": "default"}
    report("a1111_regional_cost", times, encode, device,
           torch.cuda.get_device_name() if device.type == "cuda" else "cpu", settings, Path(args.out))
    os._exit(0)  # A1111's background threads would keep the process alive


if __name__ == "__main__":
    main()
