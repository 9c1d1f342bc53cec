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


def test_box_editor_draws_and_edits_regions(comfy_server, comfy_path, stream_bank):
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed in this Python")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    picker_bank = comfy_path / "models" / "seqlora" / "pytest_picker.safetensors"
    stream_bank.save(picker_bank)  # its tokens feed the concept picker
    ui = json.loads((ROOT / "workflows" / "regional_sketch_keypose.json").read_text())
    regions_of = "() => JSON.parse(window.app.graph.getNodeById(4).widgets.find(w => w.name === 'regions').value).regions"
    try:
        with frontend_page(comfy_server) as page:
            assert "SeqLoRA.BoxEditor" in page.evaluate("() => window.app.extensions.map(e => e.name)")
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", ui)
            page.evaluate("""() => { const n = window.app.graph.getNodeById(4), c = window.app.canvas;
                                     c.ds.offset = [-n.pos[0] + 300, -n.pos[1] + 100]; c.setDirty(true, true); }""")
            page.wait_for_timeout(800)
            assert page.locator(".seqlora-box-row").count() == 2
            box = page.locator(".seqlora-box-editor canvas").bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.6)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.9, steps=5)
            page.mouse.up()
            regions = page.evaluate(regions_of)
            assert len(regions) == 3
            x0, y0, x1, y1 = regions[2]["box"]
            assert 0 <= x0 < x1 <= 512 and 256 < y0 < y1 <= 512
            token = stream_bank.concepts[0].token
            page.wait_for_function("() => document.querySelectorAll('.seqlora-box-row')[2]?.querySelector('select')"
                                   ".options.length > 1")
            page.locator(".seqlora-box-row").nth(2).locator("select").select_option(token)
            assert token in page.evaluate(regions_of)[2]["prompt"]
            page.locator(".seqlora-box-row").nth(0).locator("button").click()
            assert [r["prompt"] for r in page.evaluate(regions_of)][0] == "a photo of <coffee>"
            (ROOT / "out").mkdir(exist_ok=True)
            page.screenshot(path=str(ROOT / "out" / "comfyui-seqlora-box-editor.png"))
            ours = [e for e in page.seqlora_errors if "seqlora" in (e["text"] + e["where"]).lower()]
            assert not ours, ours
    finally:
        picker_bank.unlink(missing_ok=True)
