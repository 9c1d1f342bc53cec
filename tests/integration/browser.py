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
WORKFLOWS = ("train_compose", "regional_sketch_keypose")


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


def load_api_workflow(page, api_workflow: dict, name: str = "seqlora_example") -> None:
    page.evaluate("""async ([wf, name, columns]) => {
        await window.app.loadApiJson(wf, name);
        let x = 40;
        for (const column of columns) {
            let y = 60, widest = 0;
            for (const id of column) {
                const node = window.app.graph.getNodeById(Number(id));
                if (!node) continue;
                const size = node.computeSize();
                node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
                node.pos = [x, y];
                y += node.size[1] + 70;
                widest = Math.max(widest, node.size[0]);
            }
            x += widest + 60;
        }
        window.app.graph.setDirtyCanvas(true, true);
    }""", [api_workflow, name, layout(api_workflow)])


def export_ui_workflows(url: str) -> None:
    with frontend_page(url) as page:
        for name in WORKFLOWS:
            api = json.loads((ROOT / "workflows" / f"{name}_api.json").read_text())
            load_api_workflow(page, api, name)
            ui = json.loads(page.evaluate("() => JSON.stringify(window.app.graph.serialize())"))
            (ROOT / "workflows" / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
            print(f"wrote workflows/{name}.json")


if __name__ == "__main__":
    export_ui_workflows(sys.argv[1])
