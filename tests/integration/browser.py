"""Headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) on ComfyUI's real frontend.

Also a tool: ``python tests/integration/browser.py URL`` regenerates the UI-format example
workflows (workflows/NAME.json) from the API-format ones (workflows/NAME_api.json), through the
frontend itself, laid out in columns by graph depth.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Each example: its groups (title, node ids of the API file) laid out left to right, and the note
# that says what to change. Regenerate the UI files with `python tests/integration/browser.py URL`.
EXAMPLES = {
    "train_compose": {
        "note": "Teach SD-1.5 a concept from one photo, save it in models/seqlora/my_concepts.safetensors and "
                "render it.\n\nChange: the checkpoint (an SD-1.5), the photo, the token and init word. "
                "Training at 512 px takes a while on CPU; try resolution 256 and fewer steps first.\n"
                "Next: train_next_concept adds another concept to the same file.",
        "groups": [("1. Model and photo", ["1", "2"]), ("2. Train and save the concept", ["3", "4", "13", "12", "14"]),
                   ("3. Compose and render", ["5", "6", "7", "8", "9", "10", "11"])]},
    "train_next_concept": {
        "note": "Add the next concept to a bank you already have: load it, train on a folder of photos, save over "
                "the same file (overwrite). Every earlier concept stays exactly as it was.\n\nChange: the checkpoint "
                "(the one the bank was trained on), the photo folder (put the photos in ComfyUI/input/<name>/), "
                "the token and init word. PNGs with a transparent background train on the subject only (the "
                "folder's mask).",
        "groups": [("1. Model, bank and photos", ["1", "2", "3"]), ("2. Train the next concept and save", ["4", "5", "6", "7", "8"])]},
    "regional_sketch_keypose": {
        "note": "Two concepts of my_concepts.safetensors (made by train_compose and train_next_concept) in two "
                "boxes, under a sketch and a keypose.\n\nChange: the checkpoint, the bank, the boxes and their "
                "prompts (box editor on Regional Concepts), the sketch image and the two adapter models "
                "(T2I-Adapter or ControlNet, in models/controlnet).",
        "groups": [("1. Model and concepts", ["1", "2", "3"]), ("2. Regions and prompts", ["4", "5", "6"]),
                   ("3. Sketch and keypose control", ["7", "8", "9", "10", "11", "12"]),
                   ("4. Render", ["13", "14", "15", "16", "17"])]},
}
WORKFLOWS = tuple(EXAMPLES)
# Minimum node sizes so that image previews fit inside their node after a run.
MIN_SIZES = {"LoadImage": [320, 400], "SaveImage": [320, 380], "PreviewImage": [320, 380],
             "SeqLoRALoadImageFolder": [340, 420], "SeqLoRABasisBankInfo": [300, 260],
             "SeqLoRARegionalConcepts": [420, 560]}  # box editor with its 5 visible rows


def layout(api_workflow: dict) -> list[list[str]]:
    """Columns of node ids: one column per depth in the graph (longest path from a source)."""
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            links = [v[0] for v in api_workflow[node_id]["inputs"].values() if isinstance(v, list) and len(v) == 2]
            depth[node_id] = 1 + max((visit(str(i)) for i in links), default=-1)
        return depth[node_id]

    columns: dict[int, list[str]] = {}
    for node_id in api_workflow:
        columns.setdefault(visit(node_id), []).append(node_id)
    return [sorted(columns[c], key=int) for c in sorted(columns)]


@contextmanager
def frontend_page(url: str):
    """A page on ComfyUI's frontend with the app booted; collects errors in ``page.seqlora_errors``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors: list[dict] = []
        page.on("console", lambda m: errors.append({"kind": "console", "text": m.text,
                                                    "where": m.location.get("url", "")}) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append({"kind": "pageerror", "text": str(e), "where": e.stack or ""}))
        page.seqlora_errors = errors
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_function("window.app && window.app.graph && window.comfyAPI", timeout=120000)
        page.wait_for_timeout(2000)
        try:
            yield page
        finally:
            browser.close()


def load_api_workflow(page, api_workflow: dict, name: str = "seqlora_example", groups=None) -> list[dict]:
    """Load an API workflow into the frontend and lay it out: groups left to right, inside each group
    one column per graph depth, nodes at least MIN_SIZES; returns the groups' bounding boxes."""
    groups = groups or [("", list(api_workflow))]
    depth_columns = layout(api_workflow)
    plan = [{"title": title, "columns": [[i for i in column if i in ids] for column in depth_columns
                                          if any(i in ids for i in column)]} for title, ids in groups]
    return page.evaluate("""async ([wf, name, plan, minSizes]) => {
        await window.app.loadApiJson(wf, name);
        const TITLE = 30, GAP = 40, PAD = 20, TOP = 260;
        const boxes = [];
        let gx = 40;
        for (const group of plan) {
            let x = gx + PAD, bottom = TOP + 40;
            for (const column of group.columns) {
                let y = TOP + 50 + TITLE, widest = 0;
                for (const id of column) {
                    const node = window.app.graph.getNodeById(Number(id));
                    if (!node) continue;
                    const size = node.computeSize(), min = minSizes[node.type] || [0, 0];
                    node.setSize([Math.max(node.size[0], size[0], min[0]), Math.max(node.size[1], size[1], min[1])]);
                    node.pos = [x, y];
                    y += node.size[1] + TITLE + GAP;
                    widest = Math.max(widest, node.size[0]);
                }
                bottom = Math.max(bottom, y - GAP + PAD);
                x += widest + GAP;
            }
            boxes.push({title: group.title, bounding: [gx, TOP, x - GAP + PAD - gx, bottom - TOP]});
            gx = x - GAP + PAD + 60;
        }
        window.app.graph.setDirtyCanvas(true, true);
        return boxes;
    }""", [api_workflow, name, plan, MIN_SIZES])


def add_groups_and_note(ui: dict, boxes: list[dict], note: str) -> dict:
    """Groups around the laid-out stages and a Note node above them, in the saved UI workflow."""
    ui["groups"] = [{"id": i + 1, "title": b["title"], "bounding": b["bounding"], "color": "#3f789e",
                     "font_size": 24, "flags": {}} for i, b in enumerate(boxes)]
    note_id = max(n["id"] for n in ui["nodes"]) + 1
    ui["nodes"].append({"id": note_id, "type": "Note", "pos": [40, 20], "size": [760, 200], "flags": {},
                        "order": len(ui["nodes"]), "mode": 0, "inputs": [], "outputs": [],
                        "properties": {}, "widgets_values": [note], "color": "#432", "bgcolor": "#653"})
    ui["last_node_id"] = max(ui.get("last_node_id", 0), note_id)
    return ui


def node_rectangles(page) -> list[dict]:
    """Every node of the loaded graph as {id, type, rect: [x, y, w, h]} including its title bar."""
    return page.evaluate("""() => window.app.graph._nodes.map(n => {
        const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
        return {id: n.id, type: n.type, rect: [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title]};
    })""")


def overlapping(rects: list[dict]) -> list[tuple]:
    """Pairs of nodes whose rectangles intersect."""
    pairs = []
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["rect"], b["rect"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                pairs.append((f"{a['type']}#{a['id']}", f"{b['type']}#{b['id']}"))
    return pairs


def export_ui_workflows(url: str) -> None:
    with frontend_page(url) as page:
        for name, example in EXAMPLES.items():
            api = json.loads((ROOT / "workflows" / f"{name}_api.json").read_text())
            boxes = load_api_workflow(page, api, name, example["groups"])
            ui = json.loads(page.evaluate("() => JSON.stringify(window.app.graph.serialize())"))
            ui = add_groups_and_note(ui, boxes, example["note"])
            (ROOT / "workflows" / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
            print(f"wrote workflows/{name}.json")


if __name__ == "__main__":
    export_ui_workflows(sys.argv[1])
