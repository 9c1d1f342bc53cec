"""The SeqLoRA tab: train concepts, manage a bank, compose and export — one gradio Blocks.

``build_tab(session)`` builds it for any host: A1111 calls it from ``scripts/seqlora_tab.py``
with its own host; ``python -m seqlora_ui`` serves it standalone on the diffusers host (``standalone.py``).
Only plain components and ``.click`` are used, so the same code runs on the gradio A1111 ships
(3.41) and on current gradio. Every error shows in the page as one sentence; the bank file is
only replaced (atomically) after a training succeeds.
"""
from __future__ import annotations

import contextlib
import html
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seqlora_core.bank.format import Bank, load_bank, parse_strengths
from seqlora_core.settings import METHODS
from seqlora_core.errors import InputError, SeqLoRAError
from seqlora_core.app.plot import loss_curve_image


def _path(f) -> str:
    """gradio 3 passes tempfile wrappers, gradio 4+ plain paths."""
    return f if isinstance(f, str) else getattr(f, "name", str(f))


@dataclass
class TabSession:
    """What the tab works on: a host (created lazily) and the bank file in use."""
    host_factory: Callable[[], object]
    bank_path: Path
    resolution: int = 512
    export_dir: Path = field(default_factory=lambda: Path("out") / "exports")
    sample: Callable | None = None  # (host, bank, prompt, ids, strengths) -> PIL image
    job: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # host's GPU lock / job
    should_stop: Callable[[], bool] | None = None  # host's interrupt flag
    on_progress: Callable[[int, int, float], None] | None = None  # host's own progress display
    _host: object = None

    def host(self):
        if self._host is None:
            self._host = self.host_factory()
        return self._host

    def bank(self) -> Bank | None:
        return load_bank(self.bank_path) if self.bank_path.exists() else None


def bank_rows(bank: Bank | None) -> list[list]:
    if bank is None:
        return []
    return [[c.id, c.token, c.method, c.rank, round(c.final_loss or 0.0, 5), c.created] for c in bank.concepts]


def capacity_html(bank: Bank | None) -> str:
    if bank is None or not bank.concepts:
        return "<div class='seqlora-capacity'>No concepts yet.</div>"
    parts = [f"<div class='seqlora-capacity'><b>{len(bank.concepts)} concept(s)</b>, max orthogonality error "
             f"{bank.max_orthogonality_error():.1e}"]
    for w in bank.width_summary():
        used, cap = w["used"], w["capacity"]
        pct = 100 * used / max(cap, 1)
        parts.append(f"<div>{w['layers']} layer(s) of width {w['width']}: {used} / {cap} concepts"
                     f"<div style='background:#ddd;height:8px;border-radius:4px'>"
                     f"<div class='seqlora-bar' style='background:#4a8;height:8px;border-radius:4px;width:{pct:.1f}%'>"
                     f"</div></div></div>")
    parts.append("</div>")
    return "".join(parts)


def _error(exc: Exception) -> str:
    return f"<span class='seqlora-error' style='color:#c33'>⚠ {html.escape(str(exc))}</span>"


def build_tab(session: TabSession):
    """The tab as a gr.Blocks (caller launches it or hands it to its host)."""
    import gradio as gr

    from seqlora_core.bank.export import export_lora
    from seqlora_core.app.images import load_images
    from seqlora_core.method.trainer import TrainSettings, train_concept

    def refresh():
        try:
            bank = session.bank()
        except SeqLoRAError as exc:
            return [], _error(exc), gr.update(choices=[]), gr.update(choices=[])
        ids = [c.id for c in bank.concepts] if bank else []
        return bank_rows(bank), capacity_html(bank), gr.update(choices=ids, value=None), gr.update(choices=ids, value=ids)

    def train(files, token, init_word, method, rank, steps, iters, inner, lr, seed):
        """A generator: the page gets the loss curve live while a worker thread trains."""
        status = ""
        try:
            if not files:
                raise InputError("Upload at least one reference image.")
            pixels = load_images([_path(f) for f in files], session.resolution)
            host = session.host()
            bank = session.bank()
            settings = TrainSettings(method=method, rank=int(rank), steps=int(steps), bilevel_iters=int(iters),
                                     inner_steps=int(inner), lr_a=float(lr), lr_b=float(lr), seed=int(seed),
                                     resolution=session.resolution)
        except SeqLoRAError as exc:
            yield _error(exc), None, None
            return
        events: queue.Queue = queue.Queue()
        losses: list[float] = []

        def progress(step, total, loss):
            events.put(("step", step, total, loss))
            if session.on_progress is not None:
                session.on_progress(step, total, loss)

        def work():
            try:
                with session.job():
                    result = train_concept(host, bank, pixels, token, init_word, settings, progress=progress,
                                           should_stop=session.should_stop)
                result.bank.save(session.bank_path)
                events.put(("done", result))
            except Exception as exc:  # shown in the page; the bank file is untouched
                events.put(("error", exc))

        threading.Thread(target=work, daemon=True).start()
        while True:
            kind, *payload = events.get()
            if kind == "step":
                step, total, loss = payload
                losses.append(loss)
                if step == total or step % max(1, total // 50) == 0:
                    yield f"training {html.escape(token)}: step {step} / {total}, loss {loss:.4f}", loss_curve_image(losses), None
            elif kind == "error":
                yield _error(payload[0]), (loss_curve_image(losses) if losses else None), None
                return
            else:
                result = payload[0]
                sample = None
                if session.sample is not None:
                    try:
                        sample = np.asarray(session.sample(host, result.bank, f"a photo of {result.concept.token}",
                                                           [result.concept.id], {}))
                    except SeqLoRAError as exc:
                        status = _error(exc)
                status = status or (f"<span class='seqlora-ok'>trained {html.escape(result.concept.token)} in "
                                    f"{result.seconds:.0f} s, final loss {result.concept.final_loss:.4f}; "
                                    f"bank {html.escape(session.bank_path.name)} now holds "
                                    f"{len(result.bank.concepts)} concept(s)</span>")
                yield status, loss_curve_image(losses), sample
                return

    def open_bank(path_text, upload):
        try:
            if upload is not None:
                load_bank(_path(upload))  # validate before adopting it
                session.bank_path = Path(_path(upload))
            elif path_text:
                session.bank_path = Path(path_text).expanduser()
                if session.bank_path.exists():
                    load_bank(session.bank_path)
            msg = f"bank: {html.escape(str(session.bank_path))}"
        except SeqLoRAError as exc:
            msg = _error(exc)
        return (msg, *refresh())

    def remove(ident):
        try:
            bank = session.bank()
            if bank is None or not ident:
                raise InputError("Choose a concept to remove.")
            bank.without(ident).save(session.bank_path)
            msg = f"removed {html.escape(ident)}"
        except SeqLoRAError as exc:
            msg = _error(exc)
        return (msg, *refresh())

    def compose(ids, strengths_text, prompt):
        try:
            bank = session.bank()
            if bank is None or not ids:
                raise InputError("Choose at least one concept.")
            strengths = parse_strengths([p.strip() for p in (strengths_text or "").split(",") if p.strip()])
            if session.sample is None:
                raise InputError("This host has no preview sampler; export the LoRA instead.")
            image = session.sample(session.host(), bank, prompt, list(ids), strengths)
            return "", np.asarray(image)
        except SeqLoRAError as exc:
            return _error(exc), None

    def export(ids):
        try:
            bank = session.bank()
            if bank is None or not ids:
                raise InputError("Choose at least one concept to export.")
            out = session.export_dir / f"seqlora_{'_'.join(ids)}.safetensors"
            lora, embeddings = export_lora(bank, list(ids), out)
            return f"<span class='seqlora-ok'>exported {html.escape(lora.name)} and {len(embeddings)} embedding(s)</span>", \
                [str(lora)] + [str(e) for e in embeddings]
        except SeqLoRAError as exc:
            return _error(exc), None

    with gr.Blocks(analytics_enabled=False, title="SeqLoRA") as tab:
        gr.Markdown("## SeqLoRA — teach concepts one after another, compose any of them")
        with gr.Tab("Train"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(label="Reference images", file_count="multiple", elem_id="seqlora_images")
                    token = gr.Textbox(label="Token", value="<my-concept>", elem_id="seqlora_token")
                    init_word = gr.Textbox(label="Init word", value="object", elem_id="seqlora_init_word")
                    method = gr.Dropdown(label="Method", choices=list(METHODS), value="seqlora")
                    with gr.Row():
                        rank = gr.Number(label="Rank", value=4, precision=0)
                        steps = gr.Number(label="Steps", value=200, precision=0, elem_id="seqlora_steps")
                        iters = gr.Number(label="Bilevel iterations (K)", value=3, precision=0, elem_id="seqlora_iters")
                        inner = gr.Number(label="Inner steps (T)", value=2, precision=0)
                    with gr.Row():
                        lr = gr.Number(label="Learning rate", value=1e-4, elem_id="seqlora_lr")
                        seed = gr.Number(label="Seed", value=0, precision=0)
                    train_btn = gr.Button("Train", variant="primary", elem_id="seqlora_train")
                with gr.Column():
                    train_status = gr.HTML(elem_id="seqlora_train_status")
                    curve = gr.Image(label="Loss", interactive=False)
                    sample = gr.Image(label="Sample", interactive=False)
        with gr.Tab("Bank"):
            bank_status = gr.HTML(f"bank: {html.escape(str(session.bank_path))}", elem_id="seqlora_bank_status")
            with gr.Row():
                bank_path = gr.Textbox(label="Open bank (path)", value=str(session.bank_path))
                upload = gr.File(label="…or upload a bank", file_count="single")
                open_btn = gr.Button("Open")
            concepts = gr.Dataframe(headers=["id", "token", "method", "rank", "final loss", "created"],
                                    interactive=False, elem_id="seqlora_concepts")
            capacity = gr.HTML(elem_id="seqlora_capacity")
            with gr.Row():
                remove_id = gr.Dropdown(label="Concept", choices=[])
                remove_btn = gr.Button("Remove concept")
                refresh_btn = gr.Button("Refresh", elem_id="seqlora_refresh")
        with gr.Tab("Compose"):
            compose_ids = gr.CheckboxGroup(label="Concepts", choices=[], elem_id="seqlora_compose_ids")
            strengths = gr.Textbox(label="Strengths (id=0.8, …; default 1)", value="")
            prompt = gr.Textbox(label="Prompt", value="a photo of <my-concept>")
            with gr.Row():
                preview_btn = gr.Button("Generate preview")
                export_btn = gr.Button("Export LoRA", elem_id="seqlora_export")
            compose_status = gr.HTML(elem_id="seqlora_compose_status")
            preview = gr.Image(label="Preview", interactive=False)
            exported = gr.File(label="Exported files", file_count="multiple", interactive=False)

        listing = [concepts, capacity, remove_id, compose_ids]
        train_btn.click(train, [files, token, init_word, method, rank, steps, iters, inner, lr, seed],
                        [train_status, curve, sample]).then(refresh, None, listing)
        open_btn.click(open_bank, [bank_path, upload], [bank_status, *listing])
        remove_btn.click(remove, [remove_id], [bank_status, *listing])
        refresh_btn.click(refresh, None, listing)
        preview_btn.click(compose, [compose_ids, strengths, prompt], [compose_status, preview])
        export_btn.click(export, [compose_ids], [compose_status, exported])
        tab.load(refresh, None, listing)
    return tab
