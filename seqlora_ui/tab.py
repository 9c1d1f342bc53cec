"""The SeqLoRA tab: train concepts, manage a bank, compose and export — one gradio Blocks.

``build_tab(session)`` builds it for any host: A1111 calls it from ``scripts/seqlora_tab.py``
with its own host; ``python -m seqlora_ui`` serves it standalone on the diffusers host (``standalone.py``).
Only plain components and ``.click`` are used, so the same code runs on the gradio A1111 ships
(3.41) and on current gradio. Every error shows in the page as one sentence; the bank file is
only replaced (atomically) after a training succeeds, by a writer holding the bank's lock
(``seqlora_core.bank.lock``): a second Train click or browser tab is refused while one trains, and
a bank changed meanwhile is never overwritten (the result goes to a pending file beside it).
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

from seqlora_core.bank.format import Bank, load_bank
from seqlora_core.bank.lock import BankSession
from seqlora_core.settings import SETTINGS_BY_NAME, TRAINING_SETTINGS, Setting, train_settings
from seqlora_core.errors import InputError, SeqLoRAError
from seqlora_core.app.plot import loss_curve_image
from seqlora_core.app.images import load_images
from seqlora_core.bank.export import export_lora
from seqlora_core.method.trainer import train_concept


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
    summary = bank.summary()
    parts = [f"<div class='seqlora-capacity'><b>{len(bank.concepts)} concept(s)</b>, max orthogonality error "
             f"{summary['max_orthogonality_error']:.1e}"]
    for w in summary["widths"]:
        used, cap = w["used"], w["capacity"]
        pct = 100 * used / max(cap, 1)
        parts.append(f"<div>{w['layers']} layer(s) of width {w['width']}: {used} / {cap} concepts"
                     f"<div style='background:#ddd;height:8px;border-radius:4px'>"
                     f"<div class='seqlora-bar' style='background:#4a8;height:8px;border-radius:4px;width:{pct:.1f}%'>"
                     f"</div></div></div>")
        if w.get("leased_width"):
            parts.append(f"<div>… of which {w['leased_width']} input dimensions are leased out</div>")
    for lease in summary["leases"]:
        state = "returned" if lease["returned"] else "out"
        parts.append(f"<div class='seqlora-lease'>lease {html.escape(lease['name'])} ({lease['id']}): "
                     f"{lease['used']} / {lease['concepts']} concepts of rank {lease['rank']}, {state}</div>")
    parts.append("</div>")
    return "".join(parts)


def setting_input(gr, setting: Setting, default=None):
    """The gradio widget of one training setting (seqlora_core.settings), elem_id seqlora_<name>."""
    value = setting.default if default is None else default
    common = {"label": setting.title, "elem_id": f"seqlora_{setting.name}", "info": setting.help}
    if setting.choices is not None:
        return gr.Dropdown(choices=list(setting.choices), value=value, **common)
    if setting.kind is str:
        return gr.Textbox(value=value, **common)
    return gr.Number(value=value, precision=0 if setting.kind is int else None, **common)


def setting_inputs(gr, resolution: int) -> list:
    """Every training setting as a widget, in TRAINING_SETTINGS order; advanced ones folded away.

    ``resolution`` is the host's default training size (64 on the tiny test model)."""
    defaults = {"resolution": resolution}
    widgets = {}
    for advanced in (False, True):
        group = gr.Accordion("Advanced settings", open=False) if advanced else contextlib.nullcontext()
        with group:
            for s in TRAINING_SETTINGS:
                if s.advanced == advanced:
                    widgets[s.name] = setting_input(gr, s, defaults.get(s.name))
    return [widgets[s.name] for s in TRAINING_SETTINGS]


def _error(exc: Exception) -> str:
    return f"<span class='seqlora-error' style='color:#c33'>⚠ {html.escape(str(exc))}</span>"


def _gradio():
    import gradio as gr

    return gr


class TabActions:
    """What the tab's buttons do, on one :class:`TabSession` (each method is one click handler)."""

    def __init__(self, session: TabSession):
        self.session = session

    def refresh(self):
        """The Bank and Compose listings: concept rows, capacity, the two concept pickers."""
        update = _gradio().update
        try:
            bank = self.session.bank()
        except SeqLoRAError as exc:
            return [], _error(exc), update(choices=[]), update(choices=[])
        ids = [c.id for c in bank.concepts] if bank else []
        return bank_rows(bank), capacity_html(bank), update(choices=ids, value=None), update(choices=ids, value=ids)

    def train(self, files, token, init_word, *setting_values):
        """A generator: the page gets the loss curve live while a worker thread trains."""
        status = ""
        try:
            if not files:
                raise InputError("Upload at least one reference image.")
            settings = train_settings(dict(zip(SETTINGS_BY_NAME, setting_values)))
            pixels = load_images([_path(f) for f in files], settings.resolution)
            host = self.session.host()
            self.session.bank()  # a damaged bank is reported before anything starts
        except SeqLoRAError as exc:
            yield _error(exc), None, None
            return
        events: queue.Queue = queue.Queue()
        losses: list[float] = []

        def progress(step, total, loss):
            events.put(("step", step, total, loss))
            if self.session.on_progress is not None:
                self.session.on_progress(step, total, loss)

        def work():
            try:
                # the bank is read under its lock, which is held until the result is written
                with BankSession(self.session.bank_path, purpose="training in the SeqLoRA tab") as locked, \
                        self.session.job():
                    result = train_concept(host, locked.bank, pixels, token, init_word, settings, progress=progress,
                                           should_stop=self.session.should_stop)
                    locked.commit(result.bank, what=f"the bank with {result.concept.token}")
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
                if self.session.sample is not None:
                    try:
                        sample = np.asarray(self.session.sample(host, result.bank, f"a photo of {result.concept.token}",
                                                           [result.concept.id], {}))
                    except SeqLoRAError as exc:
                        status = _error(exc)
                status = status or (f"<span class='seqlora-ok'>trained {html.escape(result.concept.token)} in "
                                    f"{result.seconds:.0f} s, final loss {result.concept.final_loss:.4f}; "
                                    f"bank {html.escape(self.session.bank_path.name)} now holds "
                                    f"{len(result.bank.concepts)} concept(s)</span>")
                yield status, loss_curve_image(losses), sample
                return

    def open_bank(self, path_text, upload):
        try:
            if upload is not None:
                load_bank(_path(upload))  # validate before adopting it
                self.session.bank_path = Path(_path(upload))
            elif path_text:
                self.session.bank_path = Path(path_text).expanduser()
                if self.session.bank_path.exists():
                    load_bank(self.session.bank_path)
            msg = f"bank: {html.escape(str(self.session.bank_path))}"
        except SeqLoRAError as exc:
            msg = _error(exc)
        return (msg, *self.refresh())

    def show_interference(self):
        from .interference_view import interference_view

        try:
            return interference_view(self.session.bank())
        except SeqLoRAError as exc:
            return _error(exc), None

    def remove(self, ident):
        try:
            with BankSession(self.session.bank_path, purpose="removing in the SeqLoRA tab") as locked:
                if locked.bank is None or not ident:
                    raise InputError("Choose a concept to remove.")
                locked.commit(locked.bank.without(ident), removed={ident}, what=f"the bank without {ident}")
            msg = f"removed {html.escape(ident)}"
        except SeqLoRAError as exc:
            msg = _error(exc)
        return (msg, *self.refresh())

    def merge_in(self, upload, path_text, rebase):
        """Merge a second bank (uploaded or by path) into the open one."""
        from seqlora_core.bank.merge import merge_files

        try:
            other = _path(upload) if upload is not None else (path_text or "").strip()
            if not other:
                raise InputError("Upload a bank or give its path to merge it in.")
            path = self.session.bank_path
            result = merge_files(path, [path, Path(other).expanduser()], bool(rebase))
            notes = [f"rebased {html.escape(i)} (relative residual change {c:.3f})" for i, c in result.rebased]
            notes += [f"lease {html.escape(i)} returned" for i in result.returned]
            msg = (f"<span class='seqlora-ok'>merged: {len(result.bank.concepts)} concept(s)"
                   f"{'; ' + '; '.join(notes) if notes else ''}</span>")
        except SeqLoRAError as exc:
            msg = _error(exc)
        return (msg, *self.refresh())

    def lease_out(self, name, count, rank_value):
        """Lease room for ``count`` concepts to someone; the lease file is offered for download."""
        import re
        import time

        from seqlora_core.bank.lease import lease_to_file

        try:
            slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name or "lease").strip("-")[:40] or "lease"
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = self.session.export_dir / f"{self.session.bank_path.stem}.lease-{slug}-{stamp}.safetensors"
            lease = lease_to_file(self.session.bank_path, out, name or "", int(count or 0), int(rank_value or 0))
            msg = (f"<span class='seqlora-ok'>leased room for {lease.concepts} concept(s) of rank {lease.rank} to "
                   f"{html.escape(lease.name)}; send them {html.escape(out.name)} and merge it back when done</span>")
            return (msg, str(out), *self.refresh())
        except SeqLoRAError as exc:
            return (_error(exc), None, *self.refresh())

    def compose(self, ids, strengths_text, prompt):
        try:
            bank = self.session.bank()
            if bank is None or not ids:
                raise InputError("Choose at least one concept.")
            strengths = bank.parse_selection(strengths_text)[1] if (strengths_text or "").strip() else {}
            if self.session.sample is None:
                raise InputError("This host has no preview sampler; export the LoRA instead.")
            image = self.session.sample(self.session.host(), bank, prompt, list(ids), strengths)
            return "", np.asarray(image)
        except SeqLoRAError as exc:
            return _error(exc), None

    def export(self, ids):
        try:
            bank = self.session.bank()
            if bank is None or not ids:
                raise InputError("Choose at least one concept to export.")
            out = self.session.export_dir / f"seqlora_{'_'.join(ids)}.safetensors"
            lora, embeddings = export_lora(bank, list(ids), out)
            return f"<span class='seqlora-ok'>exported {html.escape(lora.name)} and {len(embeddings)} embedding(s)</span>", \
                [str(lora)] + [str(e) for e in embeddings]
        except SeqLoRAError as exc:
            return _error(exc), None


def build_tab(session: TabSession):
    """The tab as a gr.Blocks (caller launches it or hands it to its host): layout and wiring."""
    import gradio as gr

    actions = TabActions(session)
    with gr.Blocks(analytics_enabled=False, title="SeqLoRA") as tab:
        gr.Markdown("## SeqLoRA — teach concepts one after another, compose any of them")
        with gr.Tab("Train"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(label="Reference images", file_count="multiple", elem_id="seqlora_images")
                    token = gr.Textbox(label="Token", value="<my-concept>", elem_id="seqlora_token")
                    init_word = gr.Textbox(label="Init word", value="object", elem_id="seqlora_init_word")
                    setting_widgets = setting_inputs(gr, session.resolution)
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
            with gr.Row():
                merge_upload = gr.File(label="Merge in a bank or returned lease (upload)", file_count="single")
                merge_path = gr.Textbox(label="…or its path", elem_id="seqlora_merge_path")
                merge_rebase = gr.Checkbox(label="Rebase concepts trained apart without a lease", value=False)
                merge_btn = gr.Button("Merge", elem_id="seqlora_merge")
            with gr.Row():
                lease_name = gr.Textbox(label="Lease to (name)", elem_id="seqlora_lease_name")
                lease_count = gr.Number(label="Concepts", value=4, precision=0)
                lease_rank = gr.Number(label="Rank", value=4, precision=0)
                lease_btn = gr.Button("Lease", elem_id="seqlora_lease")
                lease_file = gr.File(label="Lease file", interactive=False)
            with gr.Row():
                interference_btn = gr.Button("Interference", elem_id="seqlora_interference")
            with gr.Row():
                interference_map = gr.Image(label="Interference", interactive=False)
                interference_text = gr.HTML(elem_id="seqlora_interference_text")
        with gr.Tab("Compose"):
            compose_ids = gr.CheckboxGroup(label="Concepts", choices=[], elem_id="seqlora_compose_ids")
            strengths = gr.Textbox(label="Strengths (id:0.8, …; default 1)", value="")
            prompt = gr.Textbox(label="Prompt", value="a photo of <my-concept>")
            with gr.Row():
                preview_btn = gr.Button("Generate preview")
                export_btn = gr.Button("Export LoRA", elem_id="seqlora_export")
            compose_status = gr.HTML(elem_id="seqlora_compose_status")
            preview = gr.Image(label="Preview", interactive=False)
            exported = gr.File(label="Exported files", file_count="multiple", interactive=False)

        listing = [concepts, capacity, remove_id, compose_ids]
        train_btn.click(actions.train, [files, token, init_word, *setting_widgets],
                        [train_status, curve, sample]).then(actions.refresh, None, listing)
        open_btn.click(actions.open_bank, [bank_path, upload], [bank_status, *listing])
        remove_btn.click(actions.remove, [remove_id], [bank_status, *listing])
        refresh_btn.click(actions.refresh, None, listing)
        merge_btn.click(actions.merge_in, [merge_upload, merge_path, merge_rebase], [bank_status, *listing])
        lease_btn.click(actions.lease_out, [lease_name, lease_count, lease_rank], [bank_status, lease_file, *listing])
        interference_btn.click(actions.show_interference, None, [interference_text, interference_map])
        preview_btn.click(actions.compose, [compose_ids, strengths, prompt], [compose_status, preview])
        export_btn.click(actions.export, [compose_ids], [compose_status, exported])
        tab.load(actions.refresh, None, listing)
    return tab
