"""AUTOMATIC1111 entry: the "SeqLoRA" tab and the <seqlora:BANK:CONCEPT[:strength]> extra network.

Thin: the tab is ``seqlora_ui.tab.build_tab`` on an A1111 host over the checkpoint loaded *now*
(``shared.sd_model``, looked up on every use); training and previews are A1111 jobs (its queue
lock, its progress API, its Interrupt as well as the tab's Stop); samples and previews come from
A1111's own txt2img, regional ones too (``a1111.regional``, which the ``cfg_denoiser`` callback
registered here keeps informed of the sampler's steps); exported LoRAs go to its Lora folder and
their embeddings to its embeddings folder.
"""
import os
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from modules import extra_networks, paths, script_callbacks, shared  # noqa: E402

from a1111.host import A1111Host  # noqa: E402
from a1111.job import a1111_job, interrupted, report_progress  # noqa: E402
from a1111.network import bank_dir, make_extra_network  # noqa: E402
from a1111.preview import txt2img_preview  # noqa: E402
from a1111.regional import on_cfg_denoiser  # noqa: E402
from seqlora_ui.tab import TabSession, build_tab  # noqa: E402


def on_ui_tabs():
    lora_dir = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")
    session = TabSession(host_factory=lambda: A1111Host(shared.sd_model),
                         bank_path=Path(bank_dir()) / "my_concepts.safetensors", resolution=512,
                         export_dir=Path(lora_dir), embeddings_dir=Path(shared.cmd_opts.embeddings_dir),
                         job=lambda: a1111_job("seqlora-train"), should_stop=interrupted,
                         on_progress=report_progress, regional=True)
    session.sample = lambda bank, prompt, ids, strengths, size, steps, **regional: txt2img_preview(
        bank, session.bank_path, prompt, ids, strengths, size, steps, **regional)
    return [(build_tab(session), "SeqLoRA", "seqlora")]


def before_ui():
    extra_networks.register_extra_network(make_extra_network())


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_before_ui(before_ui)
script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="seqlora-regions")
