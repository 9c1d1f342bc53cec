"""The bank panel and live training curve in ComfyUI's real frontend, in headless Chromium."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .browser import CHROMIUM, EXAMPLES, frontend_page, link_crossings, node_rectangles, overlapping
from .helpers import CKPT_NAME, ROOT

QUICK = {"SeqLoRATrainConcept": {"steps": 2, "bilevel_iters": 1, "resolution": 64, "sample_steps": 1},
         "EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2}}


def frame_group(page, title: str) -> None:
    """Move the canvas so the group ``title`` fills the view (the minimap hidden), in a page tall
    enough for it at full scale (below 0.6 the canvas draws nodes without their text)."""
    page.set_viewport_size({"width": 1400, "height": 1750})
    page.wait_for_timeout(500)
    page.evaluate("""async (title) => {
        try { await window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false); } catch (e) {}
        const group = window.app.graph._groups.find(g => g.title === title);
        const [x, y, w, h] = group._bounding ? [...group._bounding] : [...group.bounding];
        const canvas = window.app.canvas, el = canvas.canvas, margin = 30;
        const width = el.clientWidth, height = el.clientHeight;
        const scale = Math.min(1, (width - 2 * margin) / w, (height - 2 * margin) / h);
        canvas.ds.scale = scale;
        canvas.ds.offset = [(width / scale - w) / 2 - x, (height / scale - h) / 2 - y];
        canvas.setDirty(true, true);
    }""", title)
    page.wait_for_timeout(1000)


def test_panel_renders_and_follows_training(comfy_server, comfy_path, photo):
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed in this Python")
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    ui = json.loads((ROOT / "workflows" / "train_compose.json").read_text())
    for stale in (comfy_path / "models" / "seqlora").glob("pytest_frontend*.safetensors"):
        stale.unlink()  # left by an interrupted run: Save would (rightly) refuse to replace it
    with frontend_page(comfy_server) as page:
        names = page.evaluate("() => window.app.extensions.map(e => e.name)")
        assert "SeqLoRA.BankPanel" in names
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", ui)
        assert page.locator(".seqlora-panel").count() == 3  # train, save, info
        assert page.locator(".seqlora-status").first.text_content() == "not trained yet"
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
            .filter(e => e.textContent.includes("<chelsea>")).length >= 3""", timeout=1500000)
        status = page.locator(".seqlora-status").first.text_content()
        assert "step 2 / 2" in status
        # Train Concept's forecast (on by default): before training, then the measured row and column
        report = page.locator(".seqlora-report").first.text_content()
        assert "forecast for <chelsea>" in report and "measured after training" in report
        bars = page.locator(".seqlora-capacity").count()
        assert bars >= 3
        page.wait_for_timeout(1500)  # the image nodes show their results
        assert not overlapping(node_rectangles(page))  # after a run too (the loss curve once covered Info)
        (ROOT / "out").mkdir(exist_ok=True)
        page.screenshot(path=str(ROOT / "out" / "comfyui-seqlora-panel.png"))
        if os.environ.get("SEQLORA_DOCS_SCREENSHOTS", "") not in ("", "0"):  # refresh the README's picture
            frame_group(page, "2. Train and save the concept")
            page.screenshot(path=str(ROOT / "docs" / "comfyui-panel.png"))
        # what the server sends when Cancel stops a training (operations.is_cancel → seqlora.stopped)
        train_id = page.evaluate("() => window.app.graph._nodes.find(n => n.type === 'SeqLoRATrainConcept').id")
        page.evaluate("""(id) => window.comfyAPI.api.api.dispatchCustomEvent('seqlora.stopped',
                         {node: String(id), step: 1, total: 2, state: 'cancelled'})""", train_id)
        assert page.locator(".seqlora-status").first.text_content().startswith("cancelled at step 1 / 2")
        ours = [e for e in page.seqlora_errors
                if "seqlora" in (e["text"] + e["where"]).lower()]
        assert not ours, ours
    saved = comfy_path / "models" / "seqlora" / "pytest_frontend.safetensors"
    assert saved.exists()
    saved.unlink()


def test_example_workflows_open_tidy(comfy_server):
    """Every UI example loads in the real frontend with no two nodes overlapping, no link drawn
    across a node's body (issue 23), in groups, with a note saying what to change; the regional
    example's adapter nodes are bypassed (it runs without the adapter models) and its note says
    which models they need."""
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed in this Python")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with frontend_page(comfy_server) as page:
        for name in EXAMPLES:
            ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", ui)
            page.wait_for_timeout(500)
            rects = node_rectangles(page)
            api = json.loads((ROOT / "workflows" / f"{name}_api.json").read_text())
            assert {str(r["id"]) for r in rects} >= set(api), name  # every node of the API file is there
            assert not overlapping(rects), (name, overlapping(rects))
            assert not link_crossings(page), (name, link_crossings(page))
            bypassed = {n["id"] for n in ui["nodes"] if n.get("mode") == 4}
            assert bypassed == {int(i) for i in EXAMPLES[name].get("bypass", [])}, name
            assert any(r["type"] == "Note" for r in rects), name
            assert len(ui["groups"]) >= 2, name
    note = next(n for n in json.loads((ROOT / "workflows" / "regional_sketch_keypose.json").read_text())["nodes"]
                if n["type"] == "Note")["widgets_values"][0]
    assert "t2iadapter_sketch_sd15.safetensors" in note and "t2iadapter_keypose_sd15.safetensors" in note


def test_box_editor_draws_moves_resizes_and_picks(comfy_server, comfy_path, stream_bank):
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed in this Python")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    picker_bank = comfy_path / "models" / "seqlora" / "pytest_picker.safetensors"
    stream_bank.save(picker_bank)  # its tokens feed the concept picker
    ui = json.loads((ROOT / "workflows" / "regional_sketch_keypose.json").read_text())
    for node in ui["nodes"]:  # the Load Basis Bank that the Regional node's CLIP comes from
        if node["type"] == "SeqLoRALoadBasisBank":
            node["widgets_values"][0] = picker_bank.name
    regions_of = "() => JSON.parse(window.app.graph.getNodeById(4).widgets.find(w => w.name === 'regions').value).regions"
    try:
        with frontend_page(comfy_server) as page:
            assert "SeqLoRA.BoxEditor" in page.evaluate("() => window.app.extensions.map(e => e.name)")
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", ui)
            page.evaluate("""() => { const n = window.app.graph.getNodeById(4), c = window.app.canvas;
                                     c.ds.offset = [-n.pos[0] + 300, -n.pos[1] + 100]; c.ds.scale = 1; c.setDirty(true, true); }""")
            page.wait_for_timeout(800)
            assert page.locator(".seqlora-box-row").count() == 2
            assert page.evaluate("() => window.app.graph.getNodeById(4).widgets.find(w => w.name === 'regions').hidden")
            box = page.locator(".seqlora-box-editor canvas").bounding_box()
            at = lambda fx, fy: (box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)  # noqa: E731

            def drag(start, end, shift=False):
                if shift:
                    page.keyboard.down("Shift")
                page.mouse.move(*start)
                page.mouse.down()
                page.mouse.move(*end, steps=5)
                page.mouse.up()
                if shift:
                    page.keyboard.up("Shift")

            drag(at(0.2, 0.6), at(0.45, 0.9), shift=True)  # the two boxes cover the canvas: Shift draws
            regions = page.evaluate(regions_of)
            assert len(regions) == 3
            x0, y0, x1, y1 = regions[2]["box"]
            assert 0 <= x0 < x1 <= 512 and 256 < y0 < y1 <= 512
            drag(at(((x0 + x1) / 2) / 512, ((y0 + y1) / 2) / 512), at(((x0 + x1) / 2 + 100) / 512, ((y0 + y1) / 2 - 50) / 512))
            moved = page.evaluate(regions_of)[2]["box"]
            assert abs(moved[0] - (x0 + 100)) <= 3 and abs(moved[1] - (y0 - 50)) <= 3  # moved, same size
            assert abs((moved[2] - moved[0]) - (x1 - x0)) <= 1 and len(page.evaluate(regions_of)) == 3
            drag(at(moved[2] / 512, moved[3] / 512), at((moved[2] + 40) / 512, min(511, moved[3] + 30) / 512))
            resized = page.evaluate(regions_of)[2]["box"]
            assert resized[:2] == moved[:2] and resized[2] > moved[2] + 30  # the corner moved, the opposite one stayed
            tokens = [c.token for c in stream_bank.concepts]
            row = page.locator(".seqlora-box-row").nth(2)
            row.locator("select").focus()
            page.wait_for_function("() => document.querySelectorAll('.seqlora-box-row')[2]?.querySelector('select')"
                                   f".options.length === {len(tokens) + 1}")
            page.locator(".seqlora-box-row").nth(2).locator("select").select_option(tokens[0])
            page.locator(".seqlora-box-row").nth(2).locator("select").select_option(tokens[1])
            assert page.evaluate(regions_of)[2]["prompt"] == f"a photo of {tokens[1]}"  # replaced, not appended
            page.locator(".seqlora-box-row").nth(0).locator("button").click()
            assert [r["prompt"] for r in page.evaluate(regions_of)][0] == "a photo of <coffee>"
            assert not overlapping(node_rectangles(page))
            (ROOT / "out").mkdir(exist_ok=True)
            page.screenshot(path=str(ROOT / "out" / "comfyui-seqlora-box-editor.png"))
            ours = [e for e in page.seqlora_errors if "seqlora" in (e["text"] + e["where"]).lower()]
            assert not ours, ours
    finally:
        picker_bank.unlink(missing_ok=True)


def test_image_folder_node_uploads_several_photos(comfy_server, comfy_path, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed in this Python")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    import os
    import time

    import numpy as np
    from PIL import Image

    files = []
    for i, shape in enumerate([(40, 60, 3), (90, 30, 3)]):
        files.append(tmp_path / f"photo{i}.png")
        Image.fromarray(np.full(shape, 60 * i, np.uint8)).save(files[-1])
    folder = f"pytest_upload_{os.getpid()}"
    target = comfy_path / "input" / folder
    ui = json.loads((ROOT / "workflows" / "train_next_concept.json").read_text())
    try:
        with frontend_page(comfy_server) as page:
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", ui)
            page.evaluate("""(folder) => { const n = window.app.graph._nodes.find(n => n.type === 'SeqLoRALoadImageFolder');
                                           n.widgets.find(w => w.name === 'folder').value = folder; }""", folder)
            with page.expect_file_chooser() as chooser:
                page.evaluate("""() => window.app.graph._nodes.find(n => n.type === 'SeqLoRALoadImageFolder')
                                     .widgets.find(w => w.name === 'upload photos…').callback()""")
            chooser.value.set_files([str(f) for f in files])
            deadline = time.time() + 60
            while time.time() < deadline and len(list(target.glob("*.png"))) < 2:
                time.sleep(0.5)
            assert sorted(p.name for p in target.glob("*.png")) == ["photo0.png", "photo1.png"]
            page.wait_for_function("""(folder) => window.app.graph._nodes.find(n => n.type === 'SeqLoRALoadImageFolder')
                                      .widgets.find(w => w.name === 'folder').options.values.includes(folder)""",
                                   arg=folder, timeout=30000)
            ui_saved = json.loads(page.evaluate("() => JSON.stringify(window.app.graph.serialize())"))
            node = next(n for n in ui_saved["nodes"] if n["type"] == "SeqLoRALoadImageFolder")
            assert node["widgets_values"] == [folder, 512, "crop"]  # the button is not saved
    finally:
        for f in target.glob("*"):
            f.unlink()
        if target.exists():
            target.rmdir()


def test_info_panel_draws_the_interference_heat_map(comfy_server, comfy_path, stream_bank):
    """Basis Bank Info on a three-concept bank: the heat map (worst pair drawn red), the worst layers
    named as the core names them, and the node's `interference` output."""
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed in this Python")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from seqlora_core.app.interference_report import worst_layers_json
    from seqlora_core.method.interference import bank_interference

    bank_file = comfy_path / "models" / "seqlora" / "pytest_interference.safetensors"
    stream_bank.save(bank_file)  # before the page loads: the bank_name list holds it
    try:
        with frontend_page(comfy_server) as page:
            page.evaluate("""async (name) => {
                const g = window.app.graph;
                g.clear();
                const load = window.LiteGraph.createNode("SeqLoRALoadBasisBank");
                load.pos = [40, 60];
                g.add(load);
                const info = window.LiteGraph.createNode("SeqLoRABasisBankInfo");
                info.pos = [420, 60];
                g.add(info);
                info.setSize([380, 620]); // room for the whole panel (it scrolls in a smaller node)
                load.widgets.find(w => w.name === "bank_name").value = name;
                load.connect(0, info, 0);
                await window.app.queuePrompt(0, 1);
            }""", bank_file.name)
            page.wait_for_function("() => document.querySelectorAll('canvas.seqlora-interference').length >= 1",
                                   timeout=120000)
            red = page.evaluate("""() => {
                const c = document.querySelector('canvas.seqlora-interference');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] === 255 && d[i + 1] < 40 && d[i + 2] < 40) n++;
                return n;
            }""")
            assert red > 20  # the worst pair's cell
            shown = page.locator(".seqlora-worst-layer").all_text_contents()
            expected = worst_layers_json(bank_interference(stream_bank))
            assert [s.split(":")[0] for s in shown] == [w["layer"] for w in expected]
            node_id = page.evaluate("() => window.app.graph._nodes.find(n => n.type === 'SeqLoRABasisBankInfo').id")
            history = page.evaluate("async () => (await fetch('/history?max_items=1')).json()")
            outputs = next(iter(history.values()))["outputs"][str(node_id)]
            assert outputs["seqlora_bank"][0]["interference"]["tokens"] == [c.token for c in stream_bank.concepts]
            page.wait_for_timeout(500)
            (ROOT / "out").mkdir(exist_ok=True)
            page.screenshot(path=str(ROOT / "out" / "comfyui-seqlora-interference.png"))
            ours = [e for e in page.seqlora_errors if "seqlora" in (e["text"] + e["where"]).lower()]
            assert not ours, ours
    finally:
        bank_file.unlink(missing_ok=True)
