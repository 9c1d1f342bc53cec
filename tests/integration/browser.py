"""Headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) on ComfyUI's real frontend.

Also a tool: ``python tests/integration/browser.py URL`` regenerates the UI-format example
workflow (workflows/train_compose.json) from the API-format one, through the frontend itself.
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
# where each node of the example goes on the canvas (x, y), by node id
LAYOUT = {1: (40, 60), 2: (40, 260), 3: (420, 60), 4: (800, 60), 13: (800, 300), 5: (800, 520),
          6: (1180, 60), 7: (1180, 300), 8: (1180, 520), 9: (1560, 60), 10: (1560, 560), 11: (1900, 60),
          12: (420, 760)}


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
    page.evaluate("""async ([wf, name, layout]) => {
        await window.app.loadApiJson(wf, name);
        for (const [id, pos] of Object.entries(layout)) {
            const node = window.app.graph.getNodeById(Number(id));
            if (node) node.pos = pos;
        }
        window.app.graph.setDirtyCanvas(true, true);
    }""", [api_workflow, name, {str(k): list(v) for k, v in LAYOUT.items()}])


def export_ui_workflow(url: str) -> dict:
    api = json.loads((ROOT / "workflows" / "train_compose_api.json").read_text())
    with frontend_page(url) as page:
        load_api_workflow(page, api)
        return json.loads(page.evaluate("() => JSON.stringify(window.app.graph.serialize())"))


if __name__ == "__main__":
    ui = export_ui_workflow(sys.argv[1])
    (ROOT / "workflows" / "train_compose.json").write_text(json.dumps(ui, indent=1) + "\n")
    print("wrote workflows/train_compose.json")
