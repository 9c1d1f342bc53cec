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
        "note": "Teach SD-1.5 a concept from one photo, save it in models/seqlora/my_concepts.safetensors and render it.\n\n"
                "Runs as it is: pick your SD-1.5 checkpoint in Load Checkpoint and press Run (the photo, "
                "seqlora_chelsea.jpg, was copied into ComfyUI/input when the pack loaded).\n"
                "Time: on a GPU Train Concept trains 200 minibatches at 512 px. On a CPU its quick_on_cpu makes it a "
                "quick first run (64 px, 4 minibatches: a few minutes; the concept is barely learned) and the "
                "384 px render takes minutes more. Change: the photo, the token and init word; on a GPU, 512 in "
                "Empty Latent Image.\nNext: train_next_concept adds another concept to the same file.",
        "groups": [("1. Model and photo", ["1", "2"]), ("2. Train and save the concept", ["3", "4", "13", "12", "14"]),
                   ("3. Compose and render", ["5", "6", "7", "8", "9", "10", "11"])],
        # (group, top, nodes) left to right: the checkpoint's long links (to Compose, to VAE Decode) run
        # above every node between; Train's bank link to Compose above the column of its outputs
        "columns": [(0, 340, ["1", "2"]), (1, 520, ["3"]), (1, 600, ["4", "13", "12", "14"]),
                    (2, 460, ["5"]), (2, 560, ["6", "7", "8"]), (2, 460, ["9"]), (2, 340, ["10"]), (2, 340, ["11"])]},
    "train_next_concept": {
        "note": "Add the next concept to a bank you already have: load it, train on a folder of photos, save over "
                "the same file (overwrite). Every earlier concept stays exactly as it was.\n\n"
                "Runs as it is after train_compose (which made my_concepts): pick the same checkpoint and press Run. "
                "The photos are ComfyUI/input/seqlora_coffee/, copied there when the pack loaded; on a CPU the "
                "training is a quick first run (see train_compose).\nChange: the photo folder (put yours in "
                "ComfyUI/input/<name>/), the token and init word. PNGs with a transparent background train on "
                "the subject only (the folder's mask).",
        "groups": [("1. Model, bank and photos", ["1", "2", "3"]), ("2. Train the next concept and save", ["4", "5", "6", "7", "8"])],
        "columns": [(0, 340, ["1", "3"]), (0, 700, ["2"]), (1, 460, ["4"]), (1, 460, ["5", "6", "7", "8"])]},
    "regional_sketch_keypose": {
        "note": "Two concepts of my_concepts.safetensors (made by train_compose, then train_next_concept) in two "
                "boxes.\n\nRuns as it is: pick the checkpoint and press Run. The sketch and keypose control "
                "(the four purple nodes) is bypassed, because it needs two adapter models: "
                "t2iadapter_sketch_sd15.safetensors and t2iadapter_keypose_sd15.safetensors (TencentARC's "
                "T2I-Adapters, or any SD-1.5 sketch / OpenPose ControlNet) in models/controlnet. With them: pick "
                "them in the two loaders, select the four nodes and press Ctrl+B.\nChange: the boxes and their "
                "prompts (box editor on Regional Concepts), the sketch (seqlora_sketch.png) and the keypoints.",
        "bypass": ["9", "10", "11", "12"],
        "groups": [("1. Model and concepts", ["1", "2", "3"]), ("2. Regions and prompts", ["4", "5", "6"]),
                   ("3. Canvas, sketch and keypose control", ["7", "8", "17", "9", "10", "11", "13", "12"]),
                   ("4. Render", ["14", "15", "16"])],
        # the checkpoint's VAE link and Regional's model link run above every node between; the
        # prompts' links to the sketch adapter below Regional Concepts and above its image inputs
        "columns": [(0, 340, ["1"]), (0, 560, ["2"]), (0, 460, ["3"]), (1, 1100, ["5", "6"]), (1, 460, ["4"]),
                    (2, 540, ["7", "9", "10@1460", "8"]), (2, 1100, ["11", "17@1650"]),
                    (2, 560, ["13", "12@1350"]), (3, 460, ["14"]), (3, 340, ["15"]), (3, 340, ["16"])]},
}
WORKFLOWS = tuple(EXAMPLES)
# Minimum node sizes so that image previews fit inside their node after a run.
# Widths so that no widget's label or value is cut short (issue 23: mask_means, Load Basis Bank's
# bank_name).
MIN_SIZES = {"LoadImage": [320, 400], "SaveImage": [320, 380], "PreviewImage": [320, 380],
             "SeqLoRALoadImageFolder": [340, 420], "SeqLoRABasisBankInfo": [300, 260],
             "SeqLoRARegionalConcepts": [420, 560],  # box editor with its 5 visible rows
             "SeqLoRATrainConcept": [330, 0], "SeqLoRALoadBasisBank": [340, 0], "SeqLoRASaveBasisBank": [300, 0],
             "CheckpointLoaderSimple": [340, 0], "ControlNetLoader": [340, 0]}


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


# Links whose drawn curve (LiteGraph's spline: a cubic Bézier with horizontal tangents, control
# points a quarter of the link's length out) passes through the body of a node other than its two
# ends (issue 23: wires under nodes).
LINK_CROSSINGS_JS = """() => {
    const g = window.app.graph, T = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30, out = [];
    const links = g.links instanceof Map ? [...g.links.values()] : Object.values(g.links || {});
    for (const l of links) {
        if (!l) continue;
        const a = g.getNodeById(l.origin_id), b = g.getNodeById(l.target_id);
        if (!a || !b) continue;
        const p = a.getConnectionPos(false, l.origin_slot), q = b.getConnectionPos(true, l.target_slot);
        const d = 0.25 * Math.hypot(q[0] - p[0], q[1] - p[1]);
        const c1 = [p[0] + d, p[1]], c2 = [q[0] - d, q[1]];
        for (const n of g._nodes) {
            if (n === a || n === b) continue;
            const [x, y, w, h] = [n.pos[0], n.pos[1] - T, n.size[0], n.size[1] + T];
            for (let i = 1; i < 200; i++) {
                const t = i / 200, u = 1 - t;
                const X = u * u * u * p[0] + 3 * u * u * t * c1[0] + 3 * u * t * t * c2[0] + t * t * t * q[0];
                const Y = u * u * u * p[1] + 3 * u * u * t * c1[1] + 3 * u * t * t * c2[1] + t * t * t * q[1];
                if (X > x && X < x + w && Y > y && Y < y + h) {
                    out.push({from: `${a.type}#${a.id}`, to: `${b.type}#${b.id}`, under: `${n.type}#${n.id}`,
                              node: n.id, low: Math.max(p[1], q[1])});
                    break;
                }
            }
        }
    }
    return out;
}"""


def link_crossings(page) -> list[dict]:
    """Links drawn across a node's body: {from, to, under} per link and node (empty when tidy)."""
    return page.evaluate(LINK_CROSSINGS_JS)


def load_api_workflow(page, api_workflow: dict, name: str = "seqlora_example", groups=None,
                      columns=None) -> list[dict]:
    """Load an API workflow into the frontend and lay it out: groups left to right, inside each group
    one column per graph depth (or the example's own ``columns``: (group index, top y, node ids)
    left to right), nodes at least MIN_SIZES; the gap between two columns wide enough that the
    links between them do not bulge into a column (LiteGraph draws a link as a spline whose ends
    stick out sideways by a quarter of its length); returns the groups' bounding boxes."""
    groups = groups or [("", list(api_workflow))]
    if columns is None:
        columns = [(gi, 340, [i for i in column if i in ids]) for gi, (_, ids) in enumerate(groups)
                   for column in layout(api_workflow) if any(i in ids for i in column)]
    plan = [{"group": gi, "top": top, "ids": list(ids)} for gi, top, ids in columns]
    titles = [title for title, _ in groups]
    return page.evaluate("""async ([wf, name, plan, titles, minSizes]) => {
        await window.app.loadApiJson(wf, name);
        await new Promise((r) => setTimeout(r, 1500));  // the nodes' panels (js/seqlora.js) in place first
        const TITLE = 30, GAP = 40, PAD = 20, TOP = 260, GROUP_GAP = 60;
        const g = window.app.graph;
        const columns = plan.map((c) => {
            const nodes = [];
            let y = c.top;
            for (const entry of c.ids) {  // "id", or "id@y": at least that far down
                const [id, at] = entry.split("@");
                const node = g.getNodeById(Number(id));
                if (!node) continue;
                const size = node.computeSize(), min = minSizes[node.type] || [0, 0];
                node.setSize([Math.max(node.size[0], size[0], min[0]), Math.max(node.size[1], size[1], min[1])]);
                y = Math.max(y, Number(at || 0));
                node.pos = [0, y];
                y += node.size[1] + TITLE + GAP;
                nodes.push(node);
            }
            const width = Math.max(0, ...nodes.map((n) => n.size[0]));
            nodes.forEach((n) => n.setSize([width, n.size[1]]));  // a column of one width: links leave from its edge
            return {group: c.group, nodes, width};
        });
        const columnOf = new Map();
        columns.forEach((c, i) => c.nodes.forEach((n) => columnOf.set(n.id, i)));
        const links = (g.links instanceof Map ? [...g.links.values()] : Object.values(g.links || {})).filter(Boolean);
        const spans = [];
        let x = 40 + PAD;
        columns.forEach((c, i) => {
            if (i > 0) {
                let gap = columns[i - 1].group === c.group ? GAP : 2 * PAD + GROUP_GAP;
                for (const l of links) {
                    if (columnOf.get(l.origin_id) !== i - 1 || columnOf.get(l.target_id) !== i) continue;
                    const p = g.getNodeById(l.origin_id).getConnectionPos(false, l.origin_slot);
                    const q = g.getNodeById(l.target_id).getConnectionPos(true, l.target_slot);
                    gap = Math.max(gap, Math.abs(q[1] - p[1]) / 1.6 + 10);
                }
                x += gap;
            }
            c.nodes.forEach((n) => { n.pos = [x, n.pos[1]]; });
            const s = spans[c.group] || (spans[c.group] = [x - PAD, x]);
            s[1] = x + c.width + PAD;
            x += c.width;
        });
        const boxes = titles.map((title, gi) => {
            const members = columns.filter((c) => c.group === gi).flatMap((c) => c.nodes);
            const bottom = Math.max(TOP + 40, ...members.map((n) => n.pos[1] + n.size[1] + PAD));
            return {title, bounding: [spans[gi][0], TOP, spans[gi][1] - spans[gi][0], bottom - TOP]};
        });
        g.setDirtyCanvas(true, true);
        return boxes;
    }""", [api_workflow, name, plan, titles, MIN_SIZES])


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


def frame_workflow(page, width: int = 1800) -> None:
    """Fit the whole loaded workflow (nodes and groups) into the view, minimap hidden, nodes drawn in
    full at any zoom (the frontend draws bare boxes below 8 px text by default, which a screenshot
    of a wide workflow would show)."""
    page.evaluate("""async () => {
        try { await window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false); } catch (e) {}
        try { await window.app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 0); } catch (e) {}
        const g = window.app.graph, T = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
        const rects = g._nodes.map(n => [n.pos[0], n.pos[1] - T, n.size[0], n.size[1] + T])
            .concat(g._groups.map(gr => [...(gr._bounding || gr.bounding)]));
        const x0 = Math.min(...rects.map(r => r[0])), y0 = Math.min(...rects.map(r => r[1]));
        const x1 = Math.max(...rects.map(r => r[0] + r[2])), y1 = Math.max(...rects.map(r => r[1] + r[3]));
        const canvas = window.app.canvas, el = canvas.canvas, margin = 20;
        const scale = Math.min(1, (el.clientWidth - 2 * margin) / (x1 - x0), (el.clientHeight - 2 * margin) / (y1 - y0));
        canvas.ds.scale = scale;
        canvas.ds.offset = [(el.clientWidth / scale - (x1 - x0)) / 2 - x0, (el.clientHeight / scale - (y1 - y0)) / 2 - y0];
        canvas.setDirty(true, true);
    }""")
    page.wait_for_timeout(1000)


def export_ui_workflows(url: str, folder: Path = ROOT / "workflows") -> None:
    with frontend_page(url) as page:
        for name, example in EXAMPLES.items():
            api = json.loads((ROOT / "workflows" / f"{name}_api.json").read_text())
            boxes = load_api_workflow(page, api, name, example["groups"], example.get("columns"))
            crossed = link_crossings(page)
            if crossed:
                print(f"{name}: links still drawn across nodes: {crossed}")
            page.evaluate("(ids) => ids.forEach((id) => { window.app.graph.getNodeById(Number(id)).mode = 4; })",
                          example.get("bypass", []))  # 4: bypass (the node passes its inputs through)
            ui = json.loads(page.evaluate("() => JSON.stringify(window.app.graph.serialize())"))
            ui = add_groups_and_note(ui, boxes, example["note"])
            (folder / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
            print(f"wrote {folder / name}.json")


if __name__ == "__main__":  # URL [FOLDER]
    export_ui_workflows(sys.argv[1], *[Path(a) for a in sys.argv[2:3]])
