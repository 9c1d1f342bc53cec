"""``python -m seqlora_core``: train, inspect, export, generate, evaluate, demo.

Every user error prints one line to stderr and exits with code 2; the bank file is only ever
replaced atomically after a successful run, so Ctrl-C or any failure leaves it byte-identical.
Flags are checked while parsing, and this module imports no torch at its top, so a bad flag is
refused in a fraction of a second, before any model or bank is touched.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

from ..settings import DEFAULT_RESIDUALS, RESIDUAL_MODES, SETTINGS_BY_NAME, TRAINING_SETTINGS, Setting, train_settings
from ..errors import InputError, SeqLoRAError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
MAX_GUIDANCE = 100.0  # classifier-free guidance beyond this only saturates the picture
MAX_SAMPLING_STEPS = 1000  # DDIM's training schedule has 1000 timesteps
MAX_RESOLUTION = 2048  # sampling beyond this needs tens of GB; SD-1.5 was trained at 512


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's one-line errors (exit 2) instead of usage + message."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {message.rstrip('.')}; see {self.prog} --help\n")


def _flag_type(check):
    """An argparse type from a checker that raises InputError: its sentence becomes the error."""
    def convert(text: str):
        try:
            return check(text)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = getattr(check, "__name__", "value")  # argparse names the type in messages
    return convert


def finite_float(lo: float, hi: float, label: str):
    """A float flag in [lo, hi]: NaN and ±inf pass a plain ``float`` and every comparison."""
    return _flag_type(Setting(label, float, None, label, "", min=lo, max=hi).coerce)


def int_in(lo: int, hi: int, label: str, multiple: int | None = None):
    """A whole-number flag in [lo, hi] (and a multiple of ``multiple``), checked at parse time."""
    return _flag_type(Setting(label, int, None, label, "", min=lo, max=hi, multiple=multiple).coerce)


def _ids(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _json_safe(value):
    """``value`` with every non-finite float as None: json.dumps writes NaN / Infinity, which
    is not JSON (a bank may hold a NaN loss or ε written before settings were checked)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def print_json(value) -> None:
    """The --json output of every command: strict JSON that json.loads and other parsers read."""
    print(json.dumps(_json_safe(value), allow_nan=False))


def output_file(text: str, what: str) -> Path:
    """An output path checked before any work: not empty, not a folder, in a place a file can be
    created (the nearest existing folder takes a temporary file), so a long run cannot end in a
    traceback from the final write."""
    import tempfile

    if not text.strip():
        raise InputError(f"The {what} path is empty.")
    path = Path(text).expanduser()
    if path.is_dir():
        raise InputError(f"The {what} path {path} is a folder; give a file name.")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a folder")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InputError(f"Cannot write the {what} {path}: no file can be created in {folder} "
                         f"({exc.strerror or exc}).") from None
    return path


def image_file(text: str) -> Path:
    """An output image path whose extension PIL can write (checked before the model loads)."""
    from PIL import Image

    path = output_file(text, "image")
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt not in Image.SAVE:
        raise InputError(f"Cannot write an image as '{path.suffix or path.name}'; give a name ending in .png, .jpg or .webp.")
    return path


def input_file(text: str | None, what: str) -> None:
    """A file or folder the run reads, checked before the model loads."""
    if text is not None and not Path(text).expanduser().exists():
        raise InputError(f"The {what} {text} does not exist.")


def _load_host(args):
    from ..hosts.diffusers_host import DiffusersHost

    return DiffusersHost.load(args.base, args.device, getattr(args, "dtype", None))


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


def _bank_on(host, bank, allow_other_base: bool, eps: float | None = None):
    """The bank a writer extends on ``host``: a new one (with ``eps``) where there is none, else
    ``bank`` checked against the host's base, and with ``allow_other_base`` re-recorded for it."""
    from ..bank.fingerprint import base_fingerprint
    from ..method.trainer import new_bank

    fingerprint = base_fingerprint(host.linear_layers())
    if bank is None:
        return new_bank(host, fingerprint=fingerprint, **({} if eps is None else {"eps": eps}))
    bank.check_base(host.architecture(), fingerprint, allow_other_base)
    if allow_other_base:
        bank.base.update(fingerprint.base_fields())
    return bank


@contextlib.contextmanager
def step_bar(desc: str):
    """A ``progress(step, total, loss)`` callback drawing a tqdm bar on stderr; the bar opens at the
    first finished step (so an input error prints no empty bar) and closes when the block ends."""
    from tqdm.auto import tqdm

    bars = []

    def progress(step, total, loss):
        if not bars:
            bars.append(tqdm(total=total, desc=desc, unit="step", file=sys.stderr))
        bars[0].update(1)
        bars[0].set_postfix(loss=f"{loss:.4f}")

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()


def cmd_train(args) -> None:
    from ..bank.format import Bank
    from ..bank.lock import BankSession
    from ..bank.provenance import author_or_env
    from .images import load_images_and_masks
    from ..method.trainer import train_concept

    bank_path = Path(args.bank)
    # the bank is read under its lock, held until the result is written (no lost concept)
    with BankSession(bank_path, args.wait, f"training {args.token}") as session:
        bank = session.bank
        (bank or Bank({})).check_new_token(args.token)  # before the model loads
        host = _load_host(args)
        bank = _bank_on(host, bank, args.allow_other_base, train_settings({"eps": args.eps}).eps)
        given = {s.name: getattr(args, s.name) for s in TRAINING_SETTINGS}
        settings = train_settings({**given, "eps": bank.eps,
                                   "resolution": args.resolution or default_resolution(host)})
        pixels, masks = load_images_and_masks(args.images, settings.resolution, mask_dir=args.masks)
        forecast = None
        if args.forecast or args.forecast_only:
            forecast = print_forecast(host, bank, pixels, args.token, args.init_word, settings)
            if args.forecast_only:
                return
        with step_bar(f"training {args.token}") as progress:
            result = train_concept(host, bank, pixels, args.token, args.init_word, settings, progress,
                                   author=author_or_env(args.author), masks=masks)
        session.commit(result.bank, what=f"the bank with {result.concept.token}")
    orth = result.bank.max_orthogonality_error()
    final = result.concept.final_loss
    where = f" (lease {result.bank.confinement.name})" if result.bank.confined_to else ""
    print(f"trained {result.concept.token} ({result.concept.method}, rank {result.concept.rank}) in "
          f"{result.seconds:.1f} s; final loss {'-' if final is None else f'{final:.4f}'}; "
          f"max orthogonality error {orth:.2e}; bank {bank_path}{where} now holds {len(result.bank.concepts)} concept(s)")
    if result.skipped_steps:
        print(f"note: {result.skipped_steps} step(s) had non-finite gradients in {str(host.dtype).removeprefix('torch.')} "
              f"and were skipped (loss scale now {result.loss_scale:g})", file=sys.stderr)
    if args.forecast:
        from .interference_report import after_training_text

        print(after_training_text(result.bank, result.concept.id, forecast))


def print_forecast(host, bank, pixels, token, init_word, settings):
    """The forecast of ``train --forecast``: one pass over the new images, no training step."""
    from ..method.forecast import forecast_training
    from .interference_report import forecast_text

    forecast = forecast_training(host, bank, pixels, token, init_word, settings)
    print(forecast_text(forecast, token, bank), flush=True)
    return forecast


def cmd_bank_info(args) -> None:
    from ..bank.format import load_bank

    summary = load_bank(args.file).summary()
    if args.json:
        print_json(summary)
        return
    print(f"base: {summary['base'].get('architecture')} (fingerprint {summary['base'].get('fingerprint')}), eps {summary['eps']:g}")
    if summary["lease_file_of"]:
        print(f"lease file of lease {summary['lease_file_of']}: new concepts go inside the lease")
    print(f"{len(summary['concepts'])} concept(s):")
    for c in summary["concepts"]:
        loss = f"{c['final_loss']:.4f}" if isinstance(c["final_loss"], (int, float)) else "-"
        extra = "".join([f"  by {c['author']}" if c["author"] else "", f"  lease {c['lease']}" if c["lease"] else ""])
        print(f"  {c['id']:<20} {c['token']:<22} rank {c['rank']}  {c['method']:<13} loss {loss}  "
              f"{c['created']}  {c['hash'][:12]}{extra}")
    fullest = summary["fullest"]
    if fullest:
        print(f"{len(summary['layers'])} adapted layer(s); the fullest, {fullest['name']} "
              f"({fullest['in_features']} wide), holds {fullest['used']} of {fullest['capacity']} concepts")
        for w in summary["widths"]:
            bar = "#" * round(20 * w["used"] / max(w["capacity"], 1))
            leased = f", {w['leased_width']} dims leased out" if w["leased_width"] else ""
            print(f"  {w['layers']:>4} layer(s) of width {w['width']:<5} [{bar:<20}] {w['used']}/{w['capacity']}{leased}")
    for lease in summary["leases"]:
        state = f"returned {lease['returned']}" if lease["returned"] else "out"
        print(f"lease {lease['id']} ({lease['name']}): {lease['concepts']} x rank {lease['rank']}, "
              f"{lease['used']} used, {state}")
    print(f"max orthogonality error: {summary['max_orthogonality_error']:.2e}")
    if summary["history"]:
        print("history:")
        for e in summary["history"][-args.history:]:
            ids = ", ".join(f"{c['id']} {c['hash'][:8]}" for c in e["concepts"])
            extra = "  ".join(str(e[k]) for k in ("lease", "author", "note") if e.get(k))
            print(f"  {e['time']}  {e['action']:<7} {ids}  {extra}".rstrip())


def cmd_bank_interference(args) -> None:
    from ..bank.format import load_bank
    from ..method.interference import bank_interference
    from .interference_report import honesty_line, matrix_lines, worst_layers_json

    bank = load_bank(args.file)
    result = bank_interference(bank)
    note = honesty_line(bank)
    if args.json:
        print_json({**result.to_json(), "worst_layers": worst_layers_json(result, args.worst), "note": note})
        return
    if not bank.concepts:
        print("the bank holds no concepts")
        return
    print("\n".join(matrix_lines(result, args.worst) + ([note] if note else [])))


def cmd_bank_remove(args) -> None:
    from ..bank.lock import BankSession
    from ..bank.provenance import author_or_env
    from ..errors import BankError

    with BankSession(args.file, args.wait, f"removing {args.concept}") as session:
        if session.bank is None:
            raise BankError(f"Bank file {args.file} does not exist.")
        session.commit(session.bank.without(args.concept, author_or_env(args.author)), removed={args.concept},
                       what=f"the bank without {args.concept}")
    print(f"removed {args.concept} from {args.file}")


def cmd_bank_lease(args) -> None:
    from ..bank.lease_file import lease_to_file
    from ..bank.provenance import author_or_env

    lease = lease_to_file(args.file, args.out, args.name, args.concepts, args.rank, args.wait,
                          author_or_env(args.author), args.seed)
    print(f"leased {lease.width} input dimensions of each of {len(lease.blocks)} layers to {lease.name} "
          f"(lease {lease.id}: {lease.concepts} concept(s) of rank {lease.rank}); wrote {args.out}; "
          f"train with --bank {args.out}, then: python -m seqlora_core bank merge --out {args.file} {args.file} {args.out}")


def cmd_bank_merge(args) -> None:
    import time

    from ..bank.merge import merge_files, parse_renames
    from ..bank.provenance import author_or_env

    start = time.perf_counter()
    result = merge_files(args.out, args.banks, args.rebase, parse_renames(args.rename or []), args.wait,
                         author_or_env(args.author))
    seconds = time.perf_counter() - start
    for old, new in result.renamed:
        print(f"renamed {old} -> {new}")
    for ident in result.dropped:
        print(f"left out {ident}: an input's history records its removal")
    for ident, change in result.rebased:
        print(f"rebased {ident}: relative residual change {change:.4f}")
    for ident in result.returned:
        print(f"lease {ident} returned")
    print(f"merged {len(args.banks)} banks into {args.out}: {len(result.bank.concepts)} concept(s), "
          f"max orthogonality error {result.bank.max_orthogonality_error():.2e}, {seconds:.2f} s")


def cmd_bank_import(args) -> None:
    from ..bank.format import Bank
    from ..bank.lock import BankSession
    from ..bank.lora_file import read_lora_file
    from ..bank.provenance import author_or_env
    from .images import load_images
    from .import_lora import import_lora, report_lines

    lora = read_lora_file(args.lora)  # a file that is not a LoRA is refused before the model loads
    input_file(args.images, "image folder")
    input_file(args.embedding, "embedding file")
    embedding = _embedding_file(args.embedding) if args.embedding else None
    with BankSession(Path(args.file), args.wait, f"importing {args.token}") as session:
        bank = session.bank
        (bank or Bank({})).check_new_token(args.token)
        host = _load_host(args)
        bank = _bank_on(host, bank, args.allow_other_base)
        pixels = None
        if args.images:
            pixels = load_images([args.images], args.resolution or default_resolution(host))
        with step_bar(f"learning {args.token}") as progress:
            result = import_lora(host, bank, lora, args.token, args.trigger, args.strength, args.rank, args.targets,
                                 pixels, embedding, "plain" if args.plain else "auto", author_or_env(args.author),
                                 progress=progress)
        session.commit(result.bank, what=f"the bank with {result.concept.token}")
    print("\n".join(report_lines(result, per_layer=args.layers)))
    print(f"bank {args.file} now holds {len(result.bank.concepts)} concept(s); max orthogonality error "
          f"{result.bank.max_orthogonality_error():.2e}")


def _embedding_file(text: str):
    """The first vector of a textual-inversion embedding file (``emb_params``, A1111's
    ``string_to_param``-less safetensors, or a single tensor)."""
    from safetensors.torch import load_file

    from ..errors import InputError

    try:
        tensors = load_file(text)
    except Exception:
        raise InputError(f"{text} is not a readable safetensors embedding file.") from None
    tensor = tensors.get("emb_params", next(iter(tensors.values())) if len(tensors) == 1 else None)
    if tensor is None or tensor.dim() not in (1, 2) or not bool(tensor.isfinite().all()):
        raise InputError(f"{text} is not an embedding file (one tensor 'emb_params' of k × d vectors).")
    return tensor.reshape(-1, tensor.shape[-1]).float()


def cmd_export(args) -> None:
    from ..bank.format import load_bank
    from ..bank.export import export_lora

    output_file(args.out, "export")
    bank = load_bank(args.file)
    out, embeddings = export_lora(bank, _ids(args.concepts), args.out)
    print(f"wrote {out} and {len(embeddings)} embedding file(s) in {embeddings[0].parent}")


def cmd_generate(args) -> None:
    from ..bank.format import parse_selection_text
    from ..sampling.generate import generate
    from ..sampling.regions import parse_region

    parse_selection_text(args.concepts)  # strengths, regions, paths and files checked before the model loads
    regions = [parse_region(r) for r in args.region or []]
    out = image_file(args.out)
    input_file(args.sketch, "sketch")
    input_file(args.keypose, "keypose")
    for adapter in args.adapter or []:
        input_file(adapter, "adapter")
    if args.bank:
        host, bank = _host_bank(args, Path(args.bank))
        ids, strengths = bank.parse_selection(args.concepts)
    else:  # the base alone: what it draws before any concept
        from ..method.trainer import new_bank

        host = _load_host(args)
        bank, ids, strengths = new_bank(host), [], {}
    resolution = args.resolution or default_resolution(host)
    controls = load_controls(host, args, resolution)
    image = generate(host, bank, args.prompt, ids, strengths, args.negative, args.steps,
                     args.guidance, resolution, args.seed, regions, controls, args.residuals, args.auto_regions)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
    except OSError as exc:  # the place changed while sampling
        raise InputError(f"Cannot write the image {out}: {exc.strerror or exc}.") from None
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
        print_json(rows)
    else:
        for r in rows:
            print(f"{r['token']:<24} {r['loss']:.6f}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps, device=args.device, base=args.base)



def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per training setting (seqlora_core.settings); None means "not given": the default."""
    for s in TRAINING_SETTINGS:
        symbol = f" [{s.symbol}]" if s.symbol else ""
        parser.add_argument(s.flag, type=_flag_type(s.coerce), choices=s.choices, default=None, metavar=None if s.choices else s.name.upper(),
                            help=f"{s.help}{symbol} (default {s.default})")


def _host_args(sp: argparse.ArgumentParser, with_resolution: bool = True) -> None:
    sp.add_argument("--base", required=True, help="tiny | toy | sd15-random | PATH (diffusers folder or .safetensors)")
    sp.add_argument("--device", default="auto", help="auto | cpu | cuda")
    sp.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                    help="the model's precision (auto: fp16 on CUDA, fp32 on CPU); LoRA factors stay fp32")
    sp.add_argument("--allow-other-base", action="store_true", help="use a bank made for another base model")
    if with_resolution:  # train takes --resolution with the other training settings
        sp.add_argument("--resolution", type=int_in(64, MAX_RESOLUTION, "Resolution", multiple=8), default=None,
                        help=f"pixels, a multiple of 8 from 64 to {MAX_RESOLUTION} (default 512; 64 on tiny)")


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="append one concept to a bank (creates the bank if missing)")
    t.add_argument("--bank", required=True)
    _host_args(t, with_resolution=False)
    t.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    t.add_argument("--masks", default=None, metavar="DIR",
                   help="a folder with one mask per image, same file name (photo.jpg -> photo.png; white or "
                        "opaque = subject): only the subject is learned. Without it a PNG's transparency is "
                        "its mask")
    t.add_argument("--token", required=True, help='e.g. "<astro>"')
    t.add_argument("--init-word", default="object")
    add_setting_flags(t)
    t.add_argument("--forecast", action="store_true",
                   help="before training, forecast how much of each earlier concept the new one can disturb; "
                        "after, print the measured interference row and column")
    t.add_argument("--forecast-only", action="store_true", help="print the forecast and stop (the bank is not changed)")
    _writer_args(t)
    t.set_defaults(func=cmd_train)


def _writer_args(sp: argparse.ArgumentParser) -> None:
    """Flags of every command that changes a bank (it holds the bank's lock meanwhile)."""
    sp.add_argument("--wait", action="store_true", help="wait for another process changing the bank instead of stopping")
    sp.add_argument("--author", default=None, help="recorded with new concepts and in the history (default: $SEQLORA_AUTHOR)")


def _add_bank(sub) -> None:
    b = sub.add_parser("bank", help="inspect or edit a bank")
    bsub = b.add_subparsers(dest="bank_command", required=True)
    bi = bsub.add_parser("info")
    bi.add_argument("file")
    bi.add_argument("--json", action="store_true")
    bi.add_argument("--history", type=int, default=20, help="how many recent history entries to show")
    bi.set_defaults(func=cmd_bank_info)
    bx = bsub.add_parser("interference", help="how much each concept's residual disturbs each other's layer inputs")
    bx.add_argument("file")
    bx.add_argument("--json", action="store_true")
    bx.add_argument("--worst", type=int, default=3, help="how many of the worst layers to name")
    bx.set_defaults(func=cmd_bank_interference)
    br = bsub.add_parser("remove")
    br.add_argument("file")
    br.add_argument("--concept", required=True)
    _writer_args(br)
    br.set_defaults(func=cmd_bank_remove)
    bl = bsub.add_parser("lease", help="reserve room for N concepts that someone trains apart and merges back exactly")
    bl.add_argument("file")
    bl.add_argument("--name", required=True, help="who or what the lease is for")
    bl.add_argument("--concepts", type=int, required=True, help="N: concepts the lease holds")
    bl.add_argument("--rank", type=int, default=4, help="R: their rank")
    bl.add_argument("--out", required=True, help="the lease file to hand out")
    bl.add_argument("--seed", type=int, default=None, help="seed of the leased directions (default: random)")
    _writer_args(bl)
    bl.set_defaults(func=cmd_bank_lease)
    bm = bsub.add_parser("merge", help="merge banks of one base (returned leases exactly; forks with --rebase)")
    bm.add_argument("banks", nargs="+", help="two or more bank or lease files")
    bm.add_argument("--out", required=True, help="merged bank (may be one of the inputs)")
    bm.add_argument("--rebase", action="store_true", help="make overlapping later concepts orthogonal (refits A)")
    bm.add_argument("--rename", action="append", help="OLD=NEW for an id held with different contents by two inputs")
    _writer_args(bm)
    bm.set_defaults(func=cmd_bank_merge)
    bp = bsub.add_parser("import", help="bring a LoRA file (kohya, diffusers or peft) into a bank as an orthogonal concept")
    bp.add_argument("file", help="the bank (created if missing)")
    bp.add_argument("lora", help="the LoRA .safetensors file")
    bp.add_argument("--token", required=True, help='the concept\'s token, e.g. "<hero>"')
    bp.add_argument("--trigger", default=None, help="the LoRA's trigger words (default: the file's most frequent caption tag)")
    bp.add_argument("--strength", type=finite_float(-10, 10, "Strength"), default=1.0, help="folded into the concept")
    bp.add_argument("--rank", type=int_in(1, 1024, "Rank"), default=None, help="the concept's rank (default: the bank's; 4 when new)")
    bp.add_argument("--targets", default=None, help="layers a new bank adapts (default: the bank's layers, or the default preset)")
    bp.add_argument("--images", default=None, metavar="DIR",
                    help="images of the concept: weight every layer's fit by them and learn the token")
    bp.add_argument("--embedding", default=None, metavar="FILE", help="the token's vector from an embedding file")
    bp.add_argument("--plain", action="store_true", help="fit by plain SVD, without input statistics")
    bp.add_argument("--layers", action="store_true", help="print the loss of every layer")
    _host_args(bp)
    _writer_args(bp)
    bp.set_defaults(func=cmd_bank_import)


def _add_export(sub) -> None:
    e = sub.add_parser("export", help="export concepts as one kohya-format LoRA + embeddings")
    e.add_argument("file")
    e.add_argument("--concepts", default=None, help="ID,ID,... (default: all)")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export)


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="render a prompt with concepts composed (or the base alone)")
    g.add_argument("--bank", default=None, help="bank file (default: none, the base alone)")
    _host_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative", default="")
    g.add_argument("--concepts", default="all", help="all, or ID[:STRENGTH],… e.g. chelsea:0.8,coffee")
    g.add_argument("--steps", type=int_in(1, MAX_SAMPLING_STEPS, "Sampling steps"), default=25,
                   help=f"DDIM steps, 1 to {MAX_SAMPLING_STEPS}")
    g.add_argument("--guidance", type=finite_float(0.0, MAX_GUIDANCE, "Guidance"), default=7.5,
                   help=f"classifier-free guidance scale, 0 to {MAX_GUIDANCE:g}")
    seed = SETTINGS_BY_NAME["seed"]  # one range for every seed
    g.add_argument("--seed", type=int_in(int(seed.min), int(seed.max), "Seed"), default=0,
                   help=f"0 to {int(seed.max)}")
    g.add_argument("--region", action="append", help='"x0,y0,x1,y1:prompt" in pixels, repeatable')
    g.add_argument("--auto-regions", action="store_true",
                   help="no boxes: each concept the prompt names finds its region from its token's attention in the "
                        "first steps, then only its own residuals act there (drawn --region boxes win)")
    g.add_argument("--residuals", choices=RESIDUAL_MODES, default=DEFAULT_RESIDUALS,
                   help="with regions: confined (each prompt, the global one and each region's, with only the "
                        "concepts it names) or global (every concept on every prompt); default "
                        f"{DEFAULT_RESIDUALS}")
    g.add_argument("--sketch", default=None, help="sketch image (PNG)")
    g.add_argument("--keypose", default=None, help="keypose image (PNG) or OpenPose keypoints (JSON)")
    g.add_argument("--adapter", action="append", help="T2I-Adapter or ControlNet folder, one per control image")
    g.add_argument("--out", required=True)
    g.set_defaults(func=cmd_generate)


def _add_eval(sub) -> None:
    v = sub.add_parser("eval", help="denoising loss per concept with fixed noise and timesteps")
    v.add_argument("file")
    _host_args(v)
    v.add_argument("--images", nargs="+", required=True, help="<token>=DIR ...")
    v.add_argument("--concepts", default=None, help="concepts applied (default: all)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_eval)


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="train a stream of concepts from real photos on toy and report forgetting")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--base", default="toy", choices=("toy", "tiny"), help="toy (pretrained on the toy world) | tiny (random weights)")
    d.add_argument("--steps", type=int, default=30)
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m seqlora_core", description="SeqLoRA: continual multi-concept LoRA for SD-1.5.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_bank, _add_export, _add_generate, _add_eval, _add_demo):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SeqLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # the last boundary for a file the checks above could not foresee
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot use{where}: {exc.strerror or str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; no file was changed", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
