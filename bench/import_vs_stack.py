"""Two LoRAs trained apart: stacked as a user stacks them, against imported into one bank.

For each seed two photo concepts are trained *apart*, each alone on the base as a plain LoRA
(``--method lora``), and exported as ordinary kohya LoRA files with their embeddings — the files
a user owns. Then they are used together two ways:

* **stacked**: both LoRAs applied at strength 1, as ComfyUI's and A1111's LoRA loaders do (their
  residuals summed, overlapping inputs and all);
* **imported**: both files brought into one bank with ``bank import`` (the second's basis made
  orthogonal to the first's, refitted on its trigger prompts' statistics), then composed.

Measured with both applied, on each concept's own photos (fixed noise and timesteps, as
``bench/forgetting.py``):

* **identification** (a diffusion classifier, ``app.identify.denoising_identification``'s rule
  with both loaded): concept i's photos are identified when "a photo of <t_i>" gives them a lower
  ε-loss than "a photo of <t_j>";
* **own loss, alone → with the other**: how much loading the other concept changes this
  concept's own ε-loss on its own prompt;
* **bleed on the other's prompt**: RMS change of ε̂ on concept j's prompt and photos when concept
  i is added to j (ε has RMS 1);
* the import's reported loss (share of the second LoRA's ΔW energy given up to the first's
  directions).

    python bench/import_vs_stack.py --base toy --seeds 0,1,2,3,4,5 --threads 1   # about 6 min on 2 cores

Writes ``bench/results/import_vs_stack-<base>-cpu.json`` and the table in ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from forgetting_report import replace_section  # noqa: E402
from seqlora_core.app.demo import write_photos  # noqa: E402
from seqlora_core.app.evaluate import prompt_predictions  # noqa: E402
from seqlora_core.app.images import load_images  # noqa: E402
from seqlora_core.app.import_lora import import_lora  # noqa: E402
from seqlora_core.bank.export import export_lora  # noqa: E402
from seqlora_core.bank.lora_file import read_lora_file  # noqa: E402
from seqlora_core.hosts.diffusers_host import DiffusersHost  # noqa: E402
from seqlora_core.method.trainer import TrainSettings, new_bank, train_concept  # noqa: E402

PAIRS = ((("<chelsea>", "cat", "chelsea"), ("<coffee>", "cup", "coffee")),
         (("<astronaut>", "person", "astronaut"), ("<rocket>", "rocket", "rocket")),
         (("<chelsea>", "cat", "chelsea"), ("<astronaut>", "person", "astronaut")))


def _settings(args, index: int, seed: int) -> TrainSettings:
    return TrainSettings(method="lora", steps=args.steps, bilevel_iters=3, inner_steps=2, rank=4, resolution=64,
                         lr_a=2e-3, lr_b=2e-3, lr_embedding=1e-2, targets=args.targets, seed=seed * 1000 + index)


def _loss(host, bank, prompt: str, pixels, applied, embeddings) -> tuple[float, torch.Tensor]:
    pred, noise = prompt_predictions(host, bank, prompt, pixels, applied, embeddings)
    return float(((pred - noise) ** 2).mean()), pred


def measure(host, bank, tokens: list[str], pixels: dict) -> dict:
    """Identification, own-loss change and bleed with both concepts of ``bank`` applied."""
    ids = [t.strip("<>") for t in tokens]
    emb = {c.token: c.embedding for c in bank.concepts}
    out = {"identified": [], "own_alone": [], "own_with_other": [], "bleed_on_other_prompt": []}
    for i, (token, ident) in enumerate(zip(tokens, ids)):
        other = ids[1 - i]
        losses = {t: _loss(host, bank, f"a photo of {t}", pixels[token], None, emb)[0] for t in tokens}
        out["identified"].append(min(losses, key=losses.get) == token)
        alone, _ = _loss(host, bank, f"a photo of {token}", pixels[token], [ident], emb)
        out["own_alone"].append(alone)
        out["own_with_other"].append(losses[token])
        # concept `other` added to this one, on this one's prompt and photos: its bleed here
        _, pred_alone = _loss(host, bank, f"a photo of {token}", pixels[token], [ident], emb)
        _, pred_both = _loss(host, bank, f"a photo of {token}", pixels[token], [ident, other], emb)
        out["bleed_on_other_prompt"].append(float((pred_both - pred_alone).pow(2).mean().sqrt()))
    return out


def run_pair(host, args, pair, seed: int, folder: Path) -> dict:
    tokens = [t for t, _, _ in pair]
    photos = write_photos(folder / "photos", pair)
    pixels = {t: load_images([photos[t]], 64) for t in tokens}
    files = []
    stacked = new_bank(host)
    for k, (token, word, _) in enumerate(pair):  # each trained alone on the base, as users train LoRAs
        result = train_concept(host, new_bank(host), pixels[token], token, word, _settings(args, k, seed))
        out, embeddings = export_lora(result.bank, None, folder / f"{token.strip('<>')}.safetensors")
        files.append((out, embeddings[0], word))
        stacked = stacked.with_concept(result.concept)  # both applied, as a LoRA loader stacks them
    imported = new_bank(host)
    lost = []
    for (lora, emb_file, word), token in zip(files, tokens):
        result = import_lora(host, imported, read_lora_file(lora), token, trigger=word,
                             embedding=load_file(emb_file)["emb_params"])
        imported = result.bank
        lost.append(result.lost_share())
    return {"seed": seed, "tokens": tokens, "stacked": measure(host, stacked, tokens, pixels),
            "imported": {**measure(host, imported, tokens, pixels), "import_lost": lost}}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict]) -> dict:
    """Per way (stacked / imported): mean and spread over runs of each run's mean figure."""
    out = {}
    for way in ("stacked", "imported"):
        rows = {"identification": [statistics.fmean(r[way]["identified"]) for r in runs],
                "own_loss_change": [statistics.fmean(w - a for w, a in zip(r[way]["own_with_other"], r[way]["own_alone"]))
                                    for r in runs],
                "bleed_on_other_prompt": [statistics.fmean(r[way]["bleed_on_other_prompt"]) for r in runs]}
        if way == "imported":
            rows["import_lost_second"] = [r[way]["import_lost"][1] for r in runs]
        out[way] = {k: _mean_sd(v) for k, v in rows.items()}
    return out


def _shown(argv: list[str]) -> list[str]:
    """The command line without where it wrote (--out, --results-md)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in ("--out", "--results-md"):
            skip = True
        elif not item.startswith(("--out=", "--results-md=")):
            out.append(item)
    return out


def table(summary: dict, runs: list[dict], args) -> str:
    def cell(way, key, pct=False):
        if key not in summary[way]:
            return "—"
        m, s = summary[way][key]
        return f"{m:.0%} ± {s:.0%}" if pct else f"{m:+.4f} ± {s:.4f}" if key == "own_loss_change" else f"{m:.4f} ± {s:.4f}"

    lines = [f"Two LoRAs trained apart (`--method lora`, `{args.targets}` targets, {args.steps} minibatches × K=3, "
             f"base `{args.base}`), exported as kohya files, then used together: stacked as LoRA loaders do, or "
             f"imported into one bank (`bank import`). {len(runs)} runs (pair × seed: "
             + ", ".join(f"{'+'.join(r['tokens'])} s{r['seed']}" for r in runs) + "), mean ± spread. "
             "Reproduce: `" + " ".join(["python bench/import_vs_stack.py"] + _shown(args.argv)) + "`.", "",
             "| | identified (diffusion classifier, both loaded) | own ε-loss change when the other is loaded | "
             "bleed on the other's prompt (RMS Δε̂) | ΔW energy the import gave up (second LoRA) |",
             "|---|---|---|---|---|"]
    for way, label in (("stacked", "stacked (both applied)"), ("imported", "imported into one bank")):
        lines.append(f"| {label} | {cell(way, 'identification', True)} | {cell(way, 'own_loss_change')} | "
                     f"{cell(way, 'bleed_on_other_prompt')} | {cell(way, 'import_lost_second', True)} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="toy")
    p.add_argument("--seeds", default="0,1,2,3,4,5")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--targets", default="default")
    p.add_argument("--pairs", type=int, default=len(PAIRS), help="how many of the photo pairs to use")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--results-md", default=str(ROOT / "bench" / "RESULTS.md"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    host = DiffusersHost.load(args.base, "cpu", torch.float32)
    start = time.time()
    runs = []
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        pair = PAIRS[seed % args.pairs]
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(run_pair(host, args, pair, seed, Path(tmp)))
        print(f"seed {seed} {'+'.join(runs[-1]['tokens'])}: stacked {json.dumps(runs[-1]['stacked'])}\n"
              f"    imported {json.dumps(runs[-1]['imported'])}", flush=True)
    summary = summarise(runs)
    text = table(summary, runs, args)
    print(text)
    result = {"base": args.base, "runs": runs, "summary": summary, "seconds": time.time() - start,
              "argv": _shown(argv), "steps": args.steps, "targets": args.targets, "torch": torch.__version__}
    out = Path(args.out) / f"import_vs_stack-{args.base}-cpu.json"
    out.write_text(json.dumps(result, indent=1))
    if args.results_md:
        replace_section(Path(args.results_md), "import-vs-stack", "## Imported LoRAs against stacked LoRAs\n\n" + text)
    return result


if __name__ == "__main__":
    main()
