"""Does a concept get learned, and after how many minibatches? Learning curves on ``toy``.

One photo concept trained with the shipped defaults' learning rates (``settings.py``: made for
SD-1.5 at 512 px) and with the small bases' rates (``bench/forgetting.py`` on tiny and toy, and
``make demo``'s), for several minibatch counts. Per run: the concept's ε-loss on its photos
(fixed noise and timesteps) against the base's, and the share of generated "a photo of <token>"
identified as its own photo among the demo's four (``app/identify.py``). Writes
``bench/results/learning_curve-toy-cpu.json`` and prints the table that ``bench/RESULTS.md`` keeps.

    python bench/learning_curve.py [--concept '<coffee>'] [--threads 1]   # toy, CPU
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from seqlora_core.app.demo import STREAM, write_photos  # noqa: E402
from seqlora_core.app.evaluate import concept_loss  # noqa: E402
from seqlora_core.app.identify import base_loss, identification, references  # noqa: E402
from seqlora_core.app.images import load_images  # noqa: E402
from seqlora_core.hosts.diffusers_host import DiffusersHost  # noqa: E402
from seqlora_core.method.trainer import TrainSettings, train_concept  # noqa: E402
from seqlora_core.settings import SETTINGS_BY_NAME  # noqa: E402

# name → (lr_a, lr_b, lr_embedding), minibatch counts
RATES = {"shipped": ((SETTINGS_BY_NAME["lr_a"].default, SETTINGS_BY_NAME["lr_b"].default,
                      SETTINGS_BY_NAME["lr_embedding"].default), (30, 100, 200)),
         "forgetting bench": ((2e-3, 2e-3, 1e-2), (30, 100, 200)),
         "demo": ((3e-3, 3e-3, 1e-2), (100,)),
         "high": ((1e-2, 1e-2, 3e-2), (30, 100))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="toy")
    p.add_argument("--concept", default="<chelsea>", help="one of the demo's tokens")
    p.add_argument("--method", default="seqlora")
    p.add_argument("--seeds", default="0,1,2,3", help="sampling seeds for identification")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "learning_curve-toy-cpu.json"))
    args = p.parse_args(argv)
    start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    host = DiffusersHost.load(args.base, "cpu", torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_photos(Path(tmp))
        pixels = {t: load_images([folders[t]], 64) for t, _, _ in STREAM}
    refs = references(pixels)
    token, init_word = next((t, w) for t, w, _ in STREAM if t == args.concept)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = base_loss(host, f"a photo of a {init_word}", pixels[token])
    rows = []
    for name, ((lr_a, lr_b, lr_e), counts) in RATES.items():
        for steps in counts:
            settings = TrainSettings(method=args.method, steps=steps, resolution=64, lr_a=lr_a, lr_b=lr_b,
                                     lr_embedding=lr_e, seed=0)
            result = train_concept(host, None, pixels[token], token, init_word, settings)
            own = concept_loss(host, result.bank, token, pixels[token])
            ident = identification(host, result.bank, [token], refs, None, seeds)["accuracy"]
            rows.append({"rates": name, "lr": [lr_a, lr_b, lr_e], "steps": steps, "seconds": result.seconds,
                         "loss": own, "loss_over_base": own / base, "identified": ident,
                         "train_losses": result.losses})
            print(f"{name:<11} lr {lr_a:g}/{lr_b:g}/{lr_e:g}  {steps:4d} minibatches  {result.seconds:6.1f} s  "
                  f"loss {own:.5f} ({own / base:.3f} of the base's {base:.5f})  identified {ident:.0%}", flush=True)
    out = {"benchmark": "learning_curve", "base": args.base, "concept": token, "method": args.method,
           "base_loss": base, "identify_seeds": seeds, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "seconds_total": time.time() - start, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("| rates (A / B / embedding) | minibatches | s | loss ÷ base's | identified |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rates']} ({r['lr'][0]:g} / {r['lr'][1]:g} / {r['lr'][2]:g}) | {r['steps']} | {r['seconds']:.0f} | "
              f"{r['loss_over_base']:.3f} | {r['identified']:.0%} |")
    print(f"wrote {args.out}; {out['seconds_total']:.0f} s")
    return out


if __name__ == "__main__":
    main()
