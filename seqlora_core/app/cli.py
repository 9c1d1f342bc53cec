"""``python -m seqlora_core``: train, inspect, export, generate, evaluate, demo.

Every user error prints one line to stderr and exits with code 2; the bank file is only ever
replaced atomically after a successful run, so Ctrl-C or any failure leaves it byte-identical.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..settings import METHODS
from ..errors import InputError, SeqLoRAError
from ..sampling.regions import parse_region

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _ids(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _load_host(args):
    from ..hosts.diffusers_host import DiffusersHost

    return DiffusersHost.load(args.base, args.device)


def _host_bank(args, path: Path):
    """Load host and an existing bank, and refuse a bank made for another base."""
    from ..bank.format import load_bank
    from ..bank.fingerprint import base_fingerprint

    bank = load_bank(path)
    host = _load_host(args)
    bank.check_base(host.architecture(), base_fingerprint(host.linear_layers()), args.allow_other_base)
    return host, bank


def default_resolution(host) -> int:
    return 64 if host.architecture() == "sd15-tiny" else 512


def cmd_train(args) -> None:
    from tqdm.auto import tqdm

    from ..bank.format import load_bank, token_to_id
    from ..bank.fingerprint import base_fingerprint
    from .images import load_images
    from ..method.trainer import TrainSettings, new_bank, train_concept

    bank_path = Path(args.bank)
    ident = token_to_id(args.token)
    bank = load_bank(bank_path) if bank_path.exists() else None
    if bank is not None and any(c.id == ident for c in bank.concepts):
        raise InputError(f"The bank already has a concept '{ident}'; choose another token.")
    host = _load_host(args)
    if bank is None:
        bank = new_bank(host, args.eps)
    else:
        bank.check_base(host.architecture(), base_fingerprint(host.linear_layers()), args.allow_other_base)
        if args.allow_other_base:
            bank.base["fingerprint"] = base_fingerprint(host.linear_layers())
    resolution = args.resolution or default_resolution(host)
    pixels = load_images(args.images, resolution)
    settings = TrainSettings(
        method=args.method, rank=args.rank, steps=args.steps, bilevel_iters=args.bilevel_iters,
        inner_steps=args.inner_steps, eps=bank.eps, resolution=resolution, batch_size=args.batch_size,
        seed=args.seed, optimizer=args.optimizer, lr_a=args.lr_a, lr_b=args.lr_b,
        lr_embedding=args.lr_embedding, hypergradient=args.hypergradient, targets=args.targets)
    bars = []  # opened at the first finished step, so an input error prints no empty bar

    def progress(step, total, loss):
        if not bars:
            bars.append(tqdm(total=total, desc=f"training {args.token}", unit="step", file=sys.stderr))
        bars[0].update(1)
        bars[0].set_postfix(loss=f"{loss:.4f}")

    try:
        result = train_concept(host, bank, pixels, args.token, args.init_word, settings, progress)
    finally:
        for bar in bars:
            bar.close()
    result.bank.save(bank_path)
    orth = result.bank.max_orthogonality_error()
    print(f"trained {result.concept.token} ({result.concept.method}, rank {result.concept.rank}) in "
          f"{result.seconds:.1f} s; final loss {result.concept.final_loss:.4f}; "
          f"max orthogonality error {orth:.2e}; bank {bank_path} now holds {len(result.bank.concepts)} concept(s)")


def bank_summary(bank) -> dict:
    return {"concepts": [{"id": c.id, "token": c.token, "rank": c.rank, "method": c.method,
                          "init_word": c.init_word, "created": c.created, "final_loss": c.final_loss}
                         for c in bank.concepts],
            "layers": bank.layer_table(),
            "max_orthogonality_error": bank.max_orthogonality_error(),
            "base": bank.base, "eps": bank.eps}


def cmd_bank_info(args) -> None:
    from ..bank.format import load_bank

    summary = bank_summary(load_bank(args.file))
    if args.json:
        print(json.dumps(summary))
        return
    print(f"base: {summary['base'].get('architecture')} (fingerprint {summary['base'].get('fingerprint')}), eps {summary['eps']:g}")
    print(f"{len(summary['concepts'])} concept(s):")
    for c in summary["concepts"]:
        loss = f"{c['final_loss']:.4f}" if isinstance(c["final_loss"], (int, float)) else "-"
        print(f"  {c['id']:<20} {c['token']:<22} rank {c['rank']}  {c['method']:<13} loss {loss}  {c['created']}")
    layers = summary["layers"]
    if layers:
        fullest = min(layers, key=lambda r: r["capacity"] - r["used"])
        print(f"{len(layers)} adapted layer(s); the fullest, {fullest['name']} "
              f"({fullest['in_features']} wide), holds {fullest['used']} of {fullest['capacity']} concepts")
        widths = {}
        for r in layers:
            widths.setdefault((r["in_features"], r["used"], r["capacity"]), []).append(r["name"])
        for (m, used, cap), names in sorted(widths.items()):
            bar = "#" * round(20 * used / max(cap, 1))
            print(f"  {len(names):>4} layer(s) of width {m:<5} [{bar:<20}] {used}/{cap}")
    print(f"max orthogonality error: {summary['max_orthogonality_error']:.2e}")


def cmd_bank_remove(args) -> None:
    from ..bank.format import load_bank

    bank = load_bank(args.file)
    bank.without(args.concept).save(args.file)
    print(f"removed {args.concept} from {args.file}")


def cmd_export(args) -> None:
    from ..bank.format import load_bank
    from ..bank.export import export_lora

    bank = load_bank(args.file)
    out, embeddings = export_lora(bank, _ids(args.concepts), args.out)
    print(f"wrote {out} and {len(embeddings)} embedding file(s) in {embeddings[0].parent}")


def cmd_generate(args) -> None:
    from ..bank.format import parse_strengths
    from ..sampling.generate import generate

    host, bank = _host_bank(args, Path(args.bank))
    strengths = parse_strengths(args.strength or [])
    resolution = args.resolution or default_resolution(host)
    regions = [parse_region(r) for r in args.region or []]
    controls = load_controls(host, args, resolution)
    image = generate(host, bank, args.prompt, _ids(args.concepts), strengths, args.negative, args.steps,
                     args.guidance, resolution, args.seed, regions, controls)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out}")


def load_controls(host, args, resolution: int) -> list:
    """--sketch / --keypose images paired, in order, with the --adapter models."""
    from ..sampling.control import Control, control_image, load_control_model
    from ..sampling.keypose import load_image_rgb, load_keypose

    images = []
    if args.sketch:
        images.append(load_image_rgb(args.sketch, resolution, resolution))
    if args.keypose:
        images.append(load_keypose(args.keypose, resolution, resolution))
    adapters = args.adapter or []
    if len(adapters) != len(images):
        raise InputError(f"Give one --adapter per control image: {len(images)} image(s) "
                         f"(--sketch, --keypose, in that order) but {len(adapters)} adapter(s).")
    controls = []
    for path, rgb in zip(adapters, images):
        model = load_control_model(path, host.device, host.dtype)
        controls.append(Control(model, control_image(rgb, model)))
    return controls


def cmd_eval(args) -> None:
    from .evaluate import concept_loss
    from .images import load_images

    host, bank = _host_bank(args, Path(args.file))
    resolution = args.resolution or default_resolution(host)
    rows = []
    for item in args.images:
        token, sep, folder = item.partition("=")
        if not sep:
            raise InputError(f"--images takes <token>=DIR, got '{item}'.")
        loss = concept_loss(host, bank, token, load_images([folder], resolution), _ids(args.concepts))
        rows.append({"token": token, "loss": loss})
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['token']:<24} {r['loss']:.6f}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps, device=args.device)



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seqlora_core", description="SeqLoRA: continual multi-concept LoRA for SD-1.5.")
    sub = p.add_subparsers(dest="command", required=True)

    def host_args(sp, base_required=True):
        sp.add_argument("--base", required=base_required, default="tiny", help="tiny | sd15-random | PATH (diffusers folder or .safetensors)")
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda")
        sp.add_argument("--allow-other-base", action="store_true", help="use a bank made for another base model")
        sp.add_argument("--resolution", type=int, default=None, help="pixels (default 512; 64 on tiny)")

    t = sub.add_parser("train", help="append one concept to a bank (creates the bank if missing)")
    t.add_argument("--bank", required=True)
    host_args(t)
    t.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    t.add_argument("--token", required=True, help='e.g. "<astro>"')
    t.add_argument("--init-word", default="object")
    t.add_argument("--method", choices=METHODS, default="seqlora")
    t.add_argument("--rank", type=int, default=4)
    t.add_argument("--steps", type=int, default=200, help="minibatches (each runs K bilevel iterations)")
    t.add_argument("--bilevel-iters", type=int, default=3, help="K")
    t.add_argument("--inner-steps", type=int, default=2, help="T")
    t.add_argument("--eps", type=float, default=1e-8, help="projector regularisation (new banks)")
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    t.add_argument("--lr-a", type=float, default=1e-4)
    t.add_argument("--lr-b", type=float, default=1e-4)
    t.add_argument("--lr-embedding", type=float, default=5e-3)
    t.add_argument("--hypergradient", choices=("paper", "unrolled"), default="paper")
    t.add_argument("--targets", default="default", help="default | full | comma-separated regexes")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bank", help="inspect or edit a bank")
    bsub = b.add_subparsers(dest="bank_command", required=True)
    bi = bsub.add_parser("info")
    bi.add_argument("file")
    bi.add_argument("--json", action="store_true")
    bi.set_defaults(func=cmd_bank_info)
    br = bsub.add_parser("remove")
    br.add_argument("file")
    br.add_argument("--concept", required=True)
    br.set_defaults(func=cmd_bank_remove)

    e = sub.add_parser("export", help="export concepts as one kohya-format LoRA + embeddings")
    e.add_argument("file")
    e.add_argument("--concepts", default=None, help="ID,ID,... (default: all)")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="render a prompt with concepts composed")
    g.add_argument("--bank", required=True)
    host_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative", default="")
    g.add_argument("--concepts", default=None)
    g.add_argument("--strength", action="append", help="ID=VALUE, repeatable")
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--region", action="append", help='"x0,y0,x1,y1:prompt" in pixels, repeatable')
    g.add_argument("--sketch", default=None, help="sketch image (PNG)")
    g.add_argument("--keypose", default=None, help="keypose image (PNG) or OpenPose keypoints (JSON)")
    g.add_argument("--adapter", action="append", help="T2I-Adapter or ControlNet folder, one per control image")
    g.add_argument("--out", required=True)
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("eval", help="denoising loss per concept with fixed noise and timesteps")
    v.add_argument("file")
    host_args(v)
    v.add_argument("--images", nargs="+", required=True, help="<token>=DIR ...")
    v.add_argument("--concepts", default=None, help="concepts applied (default: all)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="train a stream of concepts from real photos on tiny and report forgetting")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--steps", type=int, default=30)
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SeqLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; no file was changed", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
