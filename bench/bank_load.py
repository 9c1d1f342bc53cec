"""Time loading (and validating) a bank with many concepts: ``python bench/bank_load.py [--concepts 192]``.

Builds a synthetic bank with the ``default`` preset's layer shapes on SD-1.5 (32 UNet cross-attention
to_k / to_v, 48 text-encoder projections; inputs 768 wide) and exactly orthogonal rank-4 bases,
writes it once, then times ``load_bank`` cold (first read of the file in this process) and warm
(the same file again: served from the cache keyed by file identity). Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seqlora_core.bank.format import Bank, Concept, load_bank  # noqa: E402

# (out_features, in_features) of the default preset's layers on SD-1.5
UNET_OUT = [320] * 4 + [640] * 4 + [1280] * 4 + [1280] * 2 + [1280] * 6 + [640] * 6 + [320] * 6
LAYERS = {f"unet.block{i}.attn2.to_{kv}": (out, 768) for i, out in enumerate(UNET_OUT[:16]) for kv in "kv"}
LAYERS.update({f"text_encoder.layers.{i}.self_attn.{p}_proj": (768, 768) for i in range(12) for p in "qkvo"})


def synthetic_bank(concepts: int, rank: int = 4, seed: int = 0) -> Bank:
    gen = torch.Generator().manual_seed(seed)
    width = concepts * rank
    bases = {name: torch.linalg.qr(torch.randn(m, width, generator=gen, dtype=torch.float64))[0].float()
             for name, (_, m) in LAYERS.items()}
    bank = Bank({"architecture": "sd15", "fingerprint": "synthetic"})
    for i in range(concepts):
        cols = slice(i * rank, (i + 1) * rank)
        bank.concepts.append(Concept(
            id=f"c{i:03d}", token=f"<c{i:03d}>", init_word="object", rank=rank, method="seqlora",
            A={n: torch.randn(o, rank, generator=gen) * 1e-2 for n, (o, _) in LAYERS.items()},
            B={n: bases[n][:, cols].contiguous() for n in LAYERS},
            embedding=torch.randn(1, 768, generator=gen)))
    return bank


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concepts", type=int, default=192)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bank.safetensors"
        synthetic_bank(args.concepts).save(path)
        size = path.stat().st_size
        t0 = time.perf_counter()
        bank = load_bank(path)
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            load_bank(path)
            warm.append(time.perf_counter() - t0)
        assert len(bank.concepts) == args.concepts
    print(json.dumps({"concepts": args.concepts, "layers": len(LAYERS), "file_mib": round(size / 2**20, 1),
                      "cold_s": round(cold, 3), "warm_s": round(min(warm), 4),
                      "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
