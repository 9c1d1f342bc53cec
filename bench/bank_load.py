"""Time loading (and validating) banks: ``python bench/bank_load.py [--concepts 1 192] [--old REV]``.

Builds synthetic banks with the ``default`` preset's layer shapes on SD-1.5 (32 UNet cross-attention
to_k / to_v, 48 text-encoder projections; inputs 768 wide) and exactly orthogonal rank-4 bases,
writes each once, then times ``load_bank`` in a fresh process per measurement: the first load
(what a host pays when a bank appears or changes), a second one (served from the cache keyed by
file identity), and the whole process (interpreter start, imports, both loads). With ``--old REV`` (and ``--new REV``, else the working tree) the same files are also loaded by the code of commit REV
(``git archive`` of its ``seqlora_core`` into a temporary folder), alternating old and new so
that both see the same machine load; each figure is the least of ``--repeats`` processes. Prints
one JSON line per figure, then a table with the 1-concept and N-concept first loads side by side,
their ratio, and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
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


CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from seqlora_core.bank.format import load_bank
t0 = time.perf_counter(); bank = load_bank(sys.argv[2]); first = time.perf_counter() - t0
t0 = time.perf_counter(); load_bank(sys.argv[2]); again = time.perf_counter() - t0
print(json.dumps({"first_s": first, "again_s": again, "concepts": len(bank.concepts)}))
"""


def time_load(code_root: Path, bank: Path) -> dict:
    """One fresh process loading ``bank`` twice with the code under ``code_root``; ``process_s``
    is the whole process's wall time (interpreter, imports, both loads): what a command-line
    user waits for."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(code_root), str(bank)], check=True,
                         capture_output=True, text=True, cwd=code_root)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), process_s=time.perf_counter() - start)


def old_tree(rev: str, into: Path) -> Path:  # noqa: D401 (also the --new tree)
    """``seqlora_core`` as of commit ``rev``, extracted under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "seqlora_core"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concepts", type=int, nargs="+", default=[1, 192])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--old", help="a commit whose loader to time on the same files (e.g. 442f7f5)")
    p.add_argument("--new", help="a commit to time as the new code (default: this working tree)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        banks = {}
        for n in args.concepts:
            banks[n] = tmp / f"bank{n}.safetensors"
            synthetic_bank(n).save(banks[n])
        variants = {"new": ROOT}
        if args.new:
            (tmp / "new").mkdir()
            variants = {"new": old_tree(args.new, tmp / "new")}
        if args.old:
            (tmp / "old").mkdir()
            variants = {"old": old_tree(args.old, tmp / "old"), **variants}
        best: dict[tuple[str, int], dict] = {}
        for _ in range(args.repeats):
            for n, path in banks.items():
                for name, root in variants.items():
                    r = time_load(root, path)
                    assert r["concepts"] == n
                    key = (name, n)  # the least of each figure over the repeats
                    best[key] = {k: min(v, best.get(key, r)[k]) for k, v in r.items()}
        load = os.getloadavg()
        for (name, n), r in best.items():
            print(json.dumps({"code": f"{name} ({getattr(args, name) or 'working tree'})", "concepts": n,
                              "layers": len(LAYERS), "file_mib": round(banks[n].stat().st_size / 2**20, 1),
                              "first_s": round(r["first_s"], 3), "again_s": round(r["again_s"], 4),
                              "process_s": round(r["process_s"], 2)}))
    lo, hi = min(args.concepts), max(args.concepts)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, least of {args.repeats} fresh processes, "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min), {time.strftime('%Y-%m-%d')}")
    print(f"| code | {lo} concept(s): first load | {hi} concepts: first load | ratio {hi}/{lo} "
          f"| {lo} concept(s): whole process | {hi} concepts: whole process | ratio {hi}/{lo} |")
    print("|---|---|---|---|---|---|---|")
    for name in variants:
        a, b = best[(name, lo)]["first_s"], best[(name, hi)]["first_s"]
        pa, pb = best[(name, lo)]["process_s"], best[(name, hi)]["process_s"]
        label = f"{name} ({getattr(args, name) or 'working tree'})"
        print(f"| {label} | {a:.3f} s | {b:.3f} s | ×{b / a:.1f} | {pa:.2f} s | {pb:.2f} s | ×{pb / pa:.2f} |")
    if args.old:
        print(f"speed-up at {hi} concepts: ×{best[('old', hi)]['first_s'] / best[('new', hi)]['first_s']:.1f}")


if __name__ == "__main__":
    main()
