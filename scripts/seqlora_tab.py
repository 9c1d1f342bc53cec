"""AUTOMATIC1111 entry: the "SeqLoRA" tab and the <seqlora:BANK:CONCEPT[:strength]> extra network.

Thin: the tab is ``seqlora_ui.tab.build_tab`` on an A1111 host over ``shared.sd_model``;
training holds A1111's GPU queue lock, shows in its progress state and stops on its Interrupt.
"""
import os
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from modules import call_queue, extra_networks, paths, script_callbacks, shared  # noqa: E402

from a1111.host import A1111Host  # noqa: E402
from a1111.network import bank_dir, make_extra_network  # noqa: E402
from seqlora_ui.tab import TabSession, build_tab  # noqa: E402


def _progress(step, total, loss):
    shared.state.job_count = total
    shared.state.job_no = step
    shared.state.textinfo = f"SeqLoRA: step {step} / {total}, loss {loss:.4f}"


def _job():
    import contextlib

    @contextlib.contextmanager
    def job():
        with call_queue.queue_lock:
            shared.state.begin(job="seqlora-train")
            try:
                yield
            finally:
                shared.state.end()
    return job()


def on_ui_tabs():
    lora_dir = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")
    session = TabSession(host_factory=lambda: A1111Host(shared.sd_model),
                         bank_path=Path(bank_dir()) / "my_concepts.safetensors", resolution=512,
                         export_dir=Path(lora_dir), job=_job, should_stop=lambda: shared.state.interrupted,
                         on_progress=_progress)
    return [(build_tab(session), "SeqLoRA", "seqlora")]


def before_ui():
    extra_networks.register_extra_network(make_extra_network())


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_before_ui(before_ui)
