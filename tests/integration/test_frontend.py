"""The bank panel and live training curve in ComfyUI's real frontend, in headless Chromium."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .browser import CHROMIUM, frontend_page
from .helpers import CKPT_NAME, ROOT

QUICK = {"SeqLoRATrainConcept": {"steps": 2, "bilevel_iterations": 1, "resolution": 64},
         "EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2}}


def test_panel_renders_and_follows_training(comfy_server, comfy_path, photo):
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed in this Python")
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    ui = json.loads((ROOT / "workflows" / "train_compose.json").read_text())
    with frontend_page(comfy_server) as page:
        names = page.evaluate("() => window.app.extensions.map(e => e.name)")
        assert "SeqLoRA.BankPanel" in names
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", ui)
        assert page.locator(".seqlora-panel").count() == 3  # train, save, info
        settings = {**QUICK, "CheckpointLoaderSimple": {"ckpt_name": CKPT_NAME}, "LoadImage": {"image": photo},
                    "SeqLoRASaveBasisBank": {"bank_name": "pytest_frontend", "overwrite": True}}
        page.evaluate("""(settings) => {
            for (const node of window.app.graph._nodes) {
                for (const [name, value] of Object.entries(settings[node.type] || {})) {
                    const w = node.widgets.find(w => w.name === name);
                    if (!w) throw new Error(`no widget ${name} on ${node.type}`);
                    w.value = value;
                }
            }
        }""", settings)
        page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        page.wait_for_function("""() => [...document.querySelectorAll('.seqlora-bank')]
            .filter(e => e.textContent.includes('<chelsea>')).length >= 3""", timeout=600000)
        status = page.locator(".seqlora-status").first.text_content()
        assert "step 2 / 2" in status
        bars = page.locator(".seqlora-capacity").count()
        assert bars >= 3
        (ROOT / "out").mkdir(exist_ok=True)
        page.screenshot(path=str(ROOT / "out" / "comfyui-seqlora-panel.png"))
        ours = [e for e in page.seqlora_errors
                if "seqlora" in (e["text"] + e["where"]).lower()]
        assert not ours, ours
    saved = comfy_path / "models" / "seqlora" / "pytest_frontend.safetensors"
    assert saved.exists()
    saved.unlink()
