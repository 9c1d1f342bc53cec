"""The standalone SeqLoRA app: the tab of ``tab.py`` on the diffusers host, for people without a
host UI (``python -m seqlora_ui``). A1111 builds the same tab over its own model instead."""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

from .tab import TabSession, build_tab


def diffusers_sample(factory):
    """The tab's sampler on the diffusers host: ``sampling.generate``, so the Compose page's regions,
    residuals mode and automatic regions mean exactly what the command line's do."""
    from seqlora_core.sampling.generate import generate

    def sample(bank, prompt, ids, strengths, size, sample_steps, **regional):  # regions, residuals, auto_regions
        return generate(factory(), bank, prompt, ids, strengths, steps=sample_steps, resolution=size, **regional)

    return sample


def serve(base: str, bank: str, port: int, device: str = "auto", steps: int = 25,
          allow_any_path: bool = False) -> None:
    """The tab on the diffusers host, served on 127.0.0.1 only. Bank paths typed into the page
    stay inside the bank's folder unless ``allow_any_path`` (a page on localhost is still reachable
    by other users of the machine and by port forwarding)."""
    from seqlora_core.hosts.diffusers_host import DiffusersHost

    @functools.cache
    def factory():  # one model for the app's lifetime, loaded on first use
        return DiffusersHost.load(base, device)

    small = base in ("tiny", "toy")  # tiny's 64 px modules; toy has learned, so it gets real sampling steps
    resolution = 64 if small else 512

    session = TabSession(factory, Path(bank), resolution=resolution, sample=diffusers_sample(factory), regional=True,
                         sample_steps={"tiny": 4, "toy": 20}.get(base, steps),
                         export_dir=Path(bank).resolve().parent / "exports",
                         bank_root=None if allow_any_path else Path(bank).resolve().parent)
    tab = build_tab(session)
    tab.queue().launch(server_name="127.0.0.1", server_port=port, show_error=True, prevent_thread_lock=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m seqlora_ui", description="Serve the SeqLoRA tab (gradio) on 127.0.0.1.")
    p.add_argument("--base", default="toy", help="toy (pretrained on the toy world) | tiny | sd15-random | PATH")
    p.add_argument("--bank", default="out/ui/bank.safetensors")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto")
    p.add_argument("--allow-any-path", action="store_true",
                   help="let the page open and merge banks anywhere the server can read (default: only "
                        "inside the --bank file's folder)")
    args = p.parse_args(argv)
    serve(args.base, args.bank, args.port, args.device, allow_any_path=args.allow_any_path)
