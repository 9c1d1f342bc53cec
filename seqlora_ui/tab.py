"""The SeqLoRA tab: train concepts, manage a bank, compose and export — one gradio Blocks.

``build_tab(session)`` builds it for any host: A1111 calls it from ``scripts/seqlora_tab.py``
with its own host; ``python -m seqlora_ui`` serves it standalone on the diffusers host (``standalone.py``).
Only plain components and ``.click`` are used, so the same code runs on the gradio A1111 ships
(3.41) and on current gradio. Every error shows in the page as one sentence; the bank file is
only replaced (atomically) after a training succeeds, by a writer holding the bank's lock
(``seqlora_core.bank.lock``): a second Train click or browser tab is refused while one trains, and
a bank changed meanwhile is never overwritten (the result goes to a pending file beside it).
Training runs in a worker thread and shows its progress in the page; the Stop button asks it to
stop before its next forward pass.
"""
from __future__ import annotations

import contextlib
import html
import queue
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seqlora_core.bank.format import Bank, load_bank
from seqlora_core.bank.lock import BankSession
from seqlora_core.settings import DEFAULT_RESIDUALS, RESIDUAL_MODES, SETTINGS_BY_NAME, TRAINING_SETTINGS, Setting, \
    train_settings
from seqlora_core.errors import InputError, SeqLoRAError
from seqlora_core.app.plot import loss_curve_image
from seqlora_core.app.images import load_images_and_masks
from seqlora_core.bank.export import export_lora
from seqlora_core.method.trainer import train_concept


def _path(f) -> str:
    """gradio 3 passes tempfile wrappers, gradio 4+ plain paths."""
    return f if isinstance(f, str) else getattr(f, "name", str(f))


@dataclass
class TabSession:
    """What the tab works on: the host's model and the bank file in use.

    ``host_factory`` is called on every use and must return the host for the model loaded *now*
    (A1111 builds a fresh one over ``shared.sd_model``, so a checkpoint switch is followed; the
    standalone app caches its one model itself).
    """
    host_factory: Callable[[], object]
    bank_path: Path
    resolution: int = 512
    export_dir: Path = field(default_factory=lambda: Path("out") / "exports")
    embeddings_dir: Path | None = None  # exported embeddings; None: next to the LoRA, <stem>_embeddings/
    sample: Callable | None = None  # (bank, prompt, ids, strengths, size, steps) -> PIL image
    # whether ``sample`` also takes regions=, residuals=, auto_regions= (``sampling.generate``'s): the
    # standalone app's does, and A1111's (``a1111.regional``); a host without them hides the fields
    regional: bool = False
    sample_steps: int = 20  # default sampling steps of samples and previews
    job: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # host's GPU lock / job
    should_stop: Callable[[], bool] | None = None  # host's own interrupt flag
    on_progress: Callable[[int, int, float], None] | None = None  # host's own progress display
    stop_requested: threading.Event = field(default_factory=threading.Event)  # the tab's Stop button
    bank_root: Path | None = None  # typed bank paths must lie in this folder; None: any path

    def user_path(self, text: str) -> Path:
        """A bank path typed into the page. The page is a web page: with ``bank_root`` set (the
        standalone app unless started with --allow-any-path) anyone who can reach it may only open
        or merge banks inside that folder, never any file the server can read."""
        path = Path(text.strip()).expanduser()
        if self.bank_root is None:
            return path
        root, resolved = self.bank_root.resolve(), path.resolve()
        if resolved != root and root not in resolved.parents:
            raise InputError(f"{text.strip()[:120]} is outside the bank folder {root}; start the app with "
                             "--allow-any-path to open banks anywhere.")
        return path

    def host(self):
        return self.host_factory()

    def stopping(self) -> bool:
        return self.stop_requested.is_set() or bool(self.should_stop is not None and self.should_stop())

    def bank(self) -> Bank | None:
        return load_bank(self.bank_path) if self.bank_path.exists() else None

    def adopt_upload(self, upload: str) -> Path:
        """An uploaded bank is copied next to the current bank, and the copy becomes the bank in use:
        later trainings must not write into the upload's temporary folder."""
        source = Path(upload)
        load_bank(source)  # validate before adopting it
        target = self.bank_path.parent / source.name
        if target.exists() and target.read_bytes() != source.read_bytes():
            raise InputError(f"{target} already exists and differs from the upload; rename the upload "
                             "or open the existing bank by its path.")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.upload")
            shutil.copyfile(source, tmp)
            tmp.replace(target)
        self.bank_path = target
        return target


def progress_html(token: str, step: int, total: int, loss: float) -> str:
    pct = 100 * step / max(total, 1)
    return (f"<div class='seqlora-progress'>training {html.escape(token)}: step {step} / {total}, loss {loss:.4f}"
            f"<div style='background:#ddd;height:8px;border-radius:4px'><div class='seqlora-progress-bar' "
            f"style='background:#48a;height:8px;border-radius:4px;width:{pct:.1f}%'></div></div></div>")


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


def _error(exc: Exception | str) -> str:
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

    def train(self, files, token, init_word, sample_steps, *setting_values):
        """A generator: the page gets the loss curve live while a worker thread trains."""
        status = ""
        session = self.session
        session.stop_requested.clear()
        try:
            if not files:
                raise InputError("Upload at least one reference image.")
            settings = train_settings(dict(zip(SETTINGS_BY_NAME, setting_values)))
            session.resolution = settings.resolution
            # a PNG with a transparent background trains on its subject only (its alpha is its mask)
            pixels, masks = load_images_and_masks([_path(f) for f in files], settings.resolution)
            session.bank()  # a damaged bank is reported before anything starts
        except SeqLoRAError as exc:
            yield _error(exc), None, None
            return
        events: queue.Queue = queue.Queue()
        losses: list[float] = []

        def progress(step, total, loss):
            events.put(("step", step, total, loss))
            if self.session.on_progress is not None:
                self.session.on_progress(step, total, loss)

        bank_path = session.bank_path  # where this training's bank is saved, whatever is opened meanwhile

        def work():
            try:
                # the bank is read under its lock, which is held until the result is written
                with BankSession(bank_path, purpose="training in the SeqLoRA tab") as locked, session.job():
                    host = session.host()  # inside the job: the model cannot change under the training
                    with getattr(host, "training", contextlib.nullcontext)():
                        result = train_concept(host, locked.bank, pixels, token, init_word, settings,
                                               progress=progress, should_stop=session.stopping, masks=masks)
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
                    yield progress_html(token, step, total, loss), loss_curve_image(losses), None
            elif kind == "error":
                yield _error(payload[0]), (loss_curve_image(losses) if losses else None), None
                return
            else:
                result = payload[0]
                sample = None
                if session.sample is not None:
                    try:
                        sample = np.asarray(session.sample(result.bank, f"a photo of {result.concept.token}",
                                                           [result.concept.id], {}, settings.resolution,
                                                           max(1, int(sample_steps or 1))))
                    except Exception as exc:  # the concept is trained and saved; only its sample failed
                        status = _error(f"trained {result.concept.token} (bank saved), but the sample failed: {exc}")
                status = status or (f"<span class='seqlora-ok'>trained {html.escape(result.concept.token)} in "
                                    f"{result.seconds:.0f} s, final loss {result.concept.final_loss:.4f}; "
                                    f"bank {html.escape(bank_path.name)} now holds "
                                    f"{len(result.bank.concepts)} concept(s)</span>")
                yield status, loss_curve_image(losses), sample
                return

    def forecast(self, files, token, init_word, *setting_values):
        """The Forecast button: one pass of the uploaded images over the open bank, no training step
        (``method.forecast``; words from ``app.interference_report``); the bank file is not touched."""
        from seqlora_core.app.interference_report import forecast_text
        from seqlora_core.method.forecast import forecast_training
        from seqlora_core.method.trainer import new_bank

        session = self.session
        try:
            if not files:
                raise InputError("Upload at least one reference image.")
            settings = train_settings(dict(zip(SETTINGS_BY_NAME, setting_values)))
            # masks weight the loss, not the activations the forecast reads
            pixels, _ = load_images_and_masks([_path(f) for f in files], settings.resolution)
            bank = session.bank()
            with session.job():  # the host's GPU lock: the model cannot change under the pass
                host = session.host()
                bank = bank if bank is not None else new_bank(host, settings.eps)
                with getattr(host, "training", contextlib.nullcontext)():  # A1111: its merged LoRAs out
                    fc = forecast_training(host, bank, pixels, token, init_word, settings)
            shown = token if token.startswith("<") else f"<{token}>"
            return (f"<pre class='seqlora-forecast' style='white-space:pre-wrap'>"
                    f"{html.escape(forecast_text(fc, shown, bank))}</pre>")
        except SeqLoRAError as exc:
            return _error(exc)

    def stop(self):
        self.session.stop_requested.set()
        return "<span class='seqlora-stopping'>stopping before the next pass…</span>"

    def open_bank(self, path_text, upload):
        try:
            if upload is not None:
                self.session.adopt_upload(_path(upload))
            elif path_text:
                self.session.bank_path = self.session.user_path(path_text)
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
            if upload is not None:
                other = Path(_path(upload))
            elif (path_text or "").strip():
                other = self.session.user_path(path_text)
            else:
                raise InputError("Upload a bank or give its path to merge it in.")
            path = self.session.bank_path
            result = merge_files(path, [path, other], bool(rebase))
            notes = [f"rebased {html.escape(i)} (relative residual change {c:.3f})" for i, c in result.rebased]
            notes += [f"lease {html.escape(i)} returned" for i in result.returned]
            msg = (f"<span class='seqlora-ok'>merged: {len(result.bank.concepts)} concept(s)"
                   f"{'; ' + '; '.join(notes) if notes else ''}</span>")
        except SeqLoRAError as exc:
            msg = _error(exc)
        return (msg, *self.refresh())

    def import_lora(self, upload, path_text, token, trigger, strength):
        """Bring a LoRA file (uploaded or by path) into the open bank as an orthogonal concept
        (``seqlora_core.app.import_lora``); the page shows what the import gave up."""
        from seqlora_core.app.import_lora import import_lora, report_lines
        from seqlora_core.bank.lora_file import read_lora_file
        from seqlora_core.method.trainer import new_bank

        session = self.session
        try:
            if upload is not None:
                source = Path(_path(upload))
            elif (path_text or "").strip():
                source = session.user_path(path_text)
            else:
                raise InputError("Upload a LoRA file or give its path to import it.")
            lora = read_lora_file(source)  # a file that is not a LoRA is refused before the model is used
            with BankSession(session.bank_path, purpose="importing in the SeqLoRA tab") as locked, session.job():
                host = session.host()
                with getattr(host, "training", contextlib.nullcontext)():  # A1111: its merged LoRAs out
                    result = import_lora(host, locked.bank if locked.bank is not None else new_bank(host), lora,
                                         token or "", (trigger or "").strip() or None, float(strength or 1.0))
                locked.commit(result.bank, what=f"the bank with {result.concept.token}")
            msg = "<span class='seqlora-ok'>" + "<br>".join(html.escape(l) for l in report_lines(result, False)) + "</span>"
        except SeqLoRAError as exc:
            msg = _error(exc)
        return (msg, *self.refresh())

    def lease_out(self, name, count, rank_value):
        """Lease room for ``count`` concepts to someone; the lease file is offered for download."""
        import re
        import time

        from seqlora_core.bank.lease_file import lease_to_file

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

    def compose(self, ids, strengths_text, prompt, size, sample_steps, regions_text="", residuals=DEFAULT_RESIDUALS,
                auto_regions=False):
        try:
            bank = self.session.bank()
            if bank is None or not ids:
                raise InputError("Choose at least one concept.")
            strengths = bank.parse_selection(strengths_text)[1] if (strengths_text or "").strip() else {}
            if self.session.sample is None:
                raise InputError("This host has no preview sampler; export the LoRA instead.")
            if not size or int(size) < 64 or int(size) % 8:
                raise InputError("The preview size must be a multiple of 8, at least 64.")
            if not sample_steps or int(sample_steps) < 1:
                raise InputError("The preview needs at least one sampling step.")
            regional = regional_options(regions_text, residuals, auto_regions)
            if regional and not self.session.regional:
                raise InputError("This host's preview has no regional composition; leave the regions empty.")
            image = self.session.sample(bank, prompt, list(ids), strengths, int(size), int(sample_steps), **regional)
            return "", np.asarray(image)
        except SeqLoRAError as exc:
            return _error(exc), None

    def export(self, ids):
        try:
            bank = self.session.bank()
            if bank is None or not ids:
                raise InputError("Choose at least one concept to export.")
            out = self.session.export_dir / f"seqlora_{'_'.join(ids)}.safetensors"
            lora, embeddings = export_lora(bank, list(ids), out, self.session.embeddings_dir)
            return f"<span class='seqlora-ok'>exported {html.escape(lora.name)} and {len(embeddings)} embedding(s)</span>", \
                [str(lora)] + [str(e) for e in embeddings]
        except SeqLoRAError as exc:
            return _error(exc), None


def regional_options(regions_text: str, residuals: str, auto_regions: bool) -> dict:
    """The Compose page's regional fields as ``generate``'s keyword arguments ({} when there are
    no regions and no automatic regions): one ``x0,y0,x1,y1:prompt`` box per line, in pixels of
    the preview, as the command line's ``--region``."""
    from seqlora_core.sampling.confined import check_mode
    from seqlora_core.sampling.regions import parse_region

    regions = [parse_region(line.strip()) for line in (regions_text or "").splitlines() if line.strip()]
    if not regions and not auto_regions:
        return {}
    return {"regions": regions, "residuals": check_mode(residuals or DEFAULT_RESIDUALS), "auto_regions": bool(auto_regions)}


def build_tab(session: TabSession):
    """The tab as a gr.Blocks (caller launches it or hands it to its host): layout and wiring."""
    import gradio as gr

    actions = TabActions(session)
    with gr.Blocks(analytics_enabled=False, title="SeqLoRA") as tab:
        gr.Markdown("## SeqLoRA — teach concepts one after another, compose any of them")
        with gr.Tab("Train"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(label="Reference images (a PNG's transparent background is left out of training)", file_count="multiple", elem_id="seqlora_images")
                    token = gr.Textbox(label="Token", value="<my-concept>", elem_id="seqlora_token")
                    init_word = gr.Textbox(label="Init word", value="object", elem_id="seqlora_init_word")
                    setting_widgets = setting_inputs(gr, session.resolution)
                    preview_steps = gr.Number(label="Sampling steps (sample, previews)", value=session.sample_steps,
                                              precision=0, elem_id="seqlora_preview_steps")
                    with gr.Row():
                        train_btn = gr.Button("Train", variant="primary", elem_id="seqlora_train")
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="seqlora_stop")
                        forecast_btn = gr.Button("Forecast", elem_id="seqlora_forecast")
                with gr.Column():
                    train_status = gr.HTML(elem_id="seqlora_train_status")
                    forecast_text = gr.HTML(elem_id="seqlora_forecast_text")
                    curve = gr.Image(label="Loss", interactive=False)
                    sample = gr.Image(label="Sample", interactive=False, elem_id="seqlora_sample")
        with gr.Tab("Bank"):
            bank_status = gr.HTML(f"bank: {html.escape(str(session.bank_path))}", elem_id="seqlora_bank_status")
            with gr.Row():
                bank_path = gr.Textbox(label="Open bank (path)", value=str(session.bank_path),
                                       elem_id="seqlora_bank_path")
                upload = gr.File(label="…or upload a bank (copied next to the current bank)", file_count="single",
                                 elem_id="seqlora_bank_upload")
                open_btn = gr.Button("Open", elem_id="seqlora_open")
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
                import_upload = gr.File(label="Import a LoRA file (kohya, diffusers or peft .safetensors)",
                                        file_count="single", elem_id="seqlora_import_upload")
                import_path = gr.Textbox(label="…or its path", elem_id="seqlora_import_path")
                import_token = gr.Textbox(label="Token", value="<my-lora>", elem_id="seqlora_import_token")
                import_trigger = gr.Textbox(label="Trigger words (empty: the file's top tag)", elem_id="seqlora_import_trigger")
                import_strength = gr.Number(label="Strength", value=1.0, elem_id="seqlora_import_strength")
                import_btn = gr.Button("Import LoRA", elem_id="seqlora_import")
            with gr.Row():
                interference_btn = gr.Button("Interference", elem_id="seqlora_interference")
            with gr.Row():
                interference_map = gr.Image(label="Interference", interactive=False)
                interference_text = gr.HTML(elem_id="seqlora_interference_text")
        with gr.Tab("Compose"):
            compose_ids = gr.CheckboxGroup(label="Concepts", choices=[], elem_id="seqlora_compose_ids")
            strengths = gr.Textbox(label="Strengths (id:0.8, …; default 1)", value="")
            prompt = gr.Textbox(label="Prompt", value="a photo of <my-concept>", elem_id="seqlora_prompt")
            preview_size = gr.Number(label="Preview size (px)", value=session.resolution, precision=0,
                                     elem_id="seqlora_preview_size")
            with gr.Row(visible=session.regional):  # hidden for a host whose preview has no regions
                regions = gr.Textbox(label="Regions (one per line: x0,y0,x1,y1:prompt, in pixels of the preview)",
                                     lines=3, value="", elem_id="seqlora_regions")
                residuals = gr.Radio(label="Residuals in regions (confined: each region only the concepts it names)",
                                     choices=list(RESIDUAL_MODES), value=DEFAULT_RESIDUALS, elem_id="seqlora_residuals")
                auto_regions = gr.Checkbox(label="Automatic regions (from the concept tokens' attention; no boxes)",
                                           value=False, elem_id="seqlora_auto_regions")
            with gr.Row():
                preview_btn = gr.Button("Generate preview", elem_id="seqlora_preview_btn")
                export_btn = gr.Button("Export LoRA", elem_id="seqlora_export")
            compose_status = gr.HTML(elem_id="seqlora_compose_status")
            preview = gr.Image(label="Preview", interactive=False, elem_id="seqlora_preview")
            exported = gr.File(label="Exported files", file_count="multiple", interactive=False)

        listing = [concepts, capacity, remove_id, compose_ids]
        train_btn.click(actions.train, [files, token, init_word, preview_steps, *setting_widgets],
                        [train_status, curve, sample]).then(actions.refresh, None, listing)
        # queue=False: a Stop click is answered at once, beside the training still streaming
        stop_btn.click(actions.stop, None, [train_status], queue=False)
        forecast_btn.click(actions.forecast, [files, token, init_word, *setting_widgets], [forecast_text])
        open_btn.click(actions.open_bank, [bank_path, upload], [bank_status, *listing])
        remove_btn.click(actions.remove, [remove_id], [bank_status, *listing])
        refresh_btn.click(actions.refresh, None, listing)
        merge_btn.click(actions.merge_in, [merge_upload, merge_path, merge_rebase], [bank_status, *listing])
        lease_btn.click(actions.lease_out, [lease_name, lease_count, lease_rank], [bank_status, lease_file, *listing])
        import_btn.click(actions.import_lora, [import_upload, import_path, import_token, import_trigger, import_strength],
                         [bank_status, *listing])
        interference_btn.click(actions.show_interference, None, [interference_text, interference_map])
        preview_btn.click(actions.compose, [compose_ids, strengths, prompt, preview_size, preview_steps, regions,
                                            residuals, auto_regions], [compose_status, preview])
        export_btn.click(actions.export, [compose_ids], [compose_status, exported])
        tab.load(actions.refresh, None, listing)
    return tab
