"""What sharing costs on full-size SD-1.5 shapes: bank size per concept with and without activation
statistics, and the time of a lease, an exact merge of returned leases, a rebase merge of forks,
and a bank load (validation + hash check).

Concepts are synthetic but shaped and constrained exactly like trained ones (the ``default``
targets of SD-1.5: 32 UNet cross-attention to_k / to_v layers and 48 text-encoder attention
projections, all 768 wide; rank 4; bases built in the free space one after another; q = 8
eigenpairs per layer): file sizes and the linear algebra of lease / merge / rebase do not depend
on what the concept learned, and training full-size concepts on a CPU would take hours.

    python bench/sharing_cost.py [--concepts 40] [--per-lease 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seqlora_core.bank.format import Bank, Concept, load_bank  # noqa: E402
from seqlora_core.bank.lease_file import lease_to_file  # noqa: E402
from seqlora_core.bank.merge import merge_files  # noqa: E402
from seqlora_core.method.projector import NullSpaceProjector  # noqa: E402

M, RANK, Q = 768, 4, 8
UNET_OUT = [320] * 4 + [640] * 4 + [1280] * 4 + [1280] * 2 + [1280] * 6 + [640] * 6 + [320] * 6


def sd15_default_layers() -> dict[str, int]:
    """layer → out_features for the default targets (every one 768 wide)."""
    layers = {}
    for k, n in enumerate(UNET_OUT):
        layers[f"unet.block{k // 2}.attn2.to_{'kv'[k % 2]}"] = n
    for i in range(12):
        for p in ("q", "k", "v", "out"):
            layers[f"text_encoder.text_model.encoder.layers.{i}.self_attn.{p}_proj"] = 768
    return layers


def synthetic_concept(ident: str, bank: Bank, layers: dict[str, int], gen: torch.Generator, stats: bool) -> Concept:
    B = {name: bank.projector(name, M).random_orthonormal(RANK, gen) for name in layers}
    A = {name: torch.randn(n, RANK, generator=gen) * 0.01 for name, n in layers.items()}
    eig = None
    if stats:
        eig = {name: (torch.linspace(4, 0.5, Q), torch.linalg.qr(torch.randn(M, Q, generator=gen))[0]) for name in layers}
    return Concept(ident, f"<{ident}>", "thing", RANK, "seqlora", A, B, torch.randn(1, 768, generator=gen) * 0.01,
                   settings={"rank": RANK}, final_loss=0.1, stats=eig, lease=bank.confined_to)


def grow(bank: Bank, prefix: str, count: int, layers, gen, stats: bool = True) -> Bank:
    for i in range(count):
        bank = bank.with_concept(synthetic_concept(f"{prefix}{i}", bank, layers, gen, stats))
    return bank


CPU_SECONDS: dict[str, float] = {}


def timed(fn, label: str = ""):
    """(result, wall seconds); the process CPU seconds go to CPU_SECONDS[label] (on a shared
    machine the CPU time is the steadier figure; torch runs on one thread here)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if label:
        CPU_SECONDS[label] = time.process_time() - cpu
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concepts", type=int, default=40, help="concepts in the shared bank")
    p.add_argument("--per-lease", type=int, default=5, help="concepts trained in each of two leases / forks")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    layers = sd15_default_layers()
    gen = torch.Generator().manual_seed(0)
    base = {"architecture": "sd15", "fingerprint": "0" * 16}
    folder = Path(tempfile.mkdtemp(prefix="seqlora-sharing-"))
    results = {"layers": len(layers), "rank": RANK, "q": Q, "concepts": args.concepts, "per_lease": args.per_lease}

    with_stats = grow(Bank(base), "c", args.concepts, layers, gen, stats=True)
    without = Bank(base, concepts=[Concept(**{**c.__dict__, "stats": None}) for c in with_stats.concepts])
    for name, bank in (("with_stats", with_stats), ("without_stats", without)):
        path = folder / f"{name}.safetensors"
        bank.save(path)
        results[f"bank_bytes_{name}"] = path.stat().st_size
        results[f"bytes_per_concept_{name}"] = path.stat().st_size / len(bank.concepts)
    _, results["load_s"] = timed(lambda: load_bank(folder / "with_stats.safetensors"), "load_cpu_s")

    main_path = folder / "with_stats.safetensors"
    leases = []
    for who in ("alice", "bob"):
        out = folder / f"{who}.safetensors"
        lease, seconds = timed(lambda: lease_to_file(main_path, out, who, args.per_lease, RANK, seed=1),
                               f"lease_cpu_s_{who}")
        results[f"lease_s_{who}"] = seconds
        leases.append(out)
    for out in leases:  # fill each lease as its holder would
        lease_bank = load_bank(out)
        grow(lease_bank, out.stem[:1], args.per_lease, layers, gen).save(out)
    merged = folder / "merged.safetensors"
    result, results["merge_leases_s"] = timed(lambda: merge_files(merged, [main_path, *leases]), "merge_leases_cpu_s")
    results["merge_leases_max_overlap"] = result.bank.max_orthogonality_error()

    forks = []
    for k in range(2):
        fork = folder / f"fork{k}.safetensors"
        grow(with_stats, f"f{k}-", args.per_lease, layers, torch.Generator().manual_seed(10 + k)).save(fork)
        forks.append(fork)
    rebased_out = folder / "rebased.safetensors"
    result, results["merge_rebase_s"] = timed(lambda: merge_files(rebased_out, forks, rebase=True),
                                              "merge_rebase_cpu_s")
    results["rebased_concepts"] = len(result.rebased)
    results["rebase_max_overlap"] = result.bank.max_orthogonality_error()
    results["rebase_mean_relative_change"] = sum(c for _, c in result.rebased) / max(len(result.rebased), 1)

    results.update(CPU_SECONDS)
    for key, value in results.items():
        print(f"{key:32} {value:.4g}" if isinstance(value, float) else f"{key:32} {value}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
