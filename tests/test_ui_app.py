"""The standalone SeqLoRA tab in headless Chromium: upload photos, train on tiny, see the concept
in the bank list, export a LoRA. Needs gradio, Playwright and Debian's chromium (make test
installs the first two; .ci/run installs chromium)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ui_server(tmp_path):
    pytest.importorskip("gradio", reason="gradio is not installed")
    port = _port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), SEQLORA_CACHE=str(ROOT / ".cache"))
    bank = tmp_path / "bank.safetensors"
    log = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "seqlora_ui", "--base", "tiny", "--port", str(port),
                             "--bank", str(bank), "--device", "cpu"], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("the UI exited during start-up")
            time.sleep(1)
    yield url, bank
    proc.terminate()
    proc.wait(timeout=30)


def _tab(page, name):
    """Tab buttons: role=tab in current gradio, plain buttons in gradio 3.41."""
    tabs = page.get_by_role("tab", name=name)
    if tabs.count():
        return tabs.first
    return page.locator("button").filter(has_text=re.compile(rf"^\s*{name}\s*$")).first


def _field(page, elem_id):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def test_upload_train_list_export(ui_server, photos):
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    url, bank = ui_server
    files = [str(p) for folder in list(photos.values())[:1] for p in sorted(folder.iterdir())]
    assert len(files) == 3
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        with page.expect_response(lambda r: "/upload" in r.url, timeout=60000) as uploaded:
            page.locator("#seqlora_images input[type=file]").set_input_files(files)
        assert uploaded.value.ok
        page.wait_for_function(r"() => [...document.querySelectorAll('#seqlora_images')]"
                               r".some(e => e.textContent.replace(/\s+/g, '').includes('2.png'))", timeout=60000)  # uploads finished
        page.wait_for_timeout(2000)
        _field(page, "seqlora_token").fill("<chelsea>")
        _field(page, "seqlora_init_word").fill("cat")
        for elem_id, value in (("seqlora_steps", "2"), ("seqlora_bilevel_iters", "1"), ("seqlora_lr_a", "0.003"),
                               ("seqlora_lr_b", "0.003")):
            _field(page, elem_id).fill(value)
            _field(page, elem_id).press("Tab")
        page.locator("#seqlora_train").click()
        page.locator("#seqlora_train_status .seqlora-ok, #seqlora_train_status .seqlora-error").wait_for(timeout=300000)
        status = page.locator("#seqlora_train_status").first.text_content()
        assert "trained <chelsea>" in status, status + (bank.parent / "ui.log").read_text()[-3000:]
        assert bank.exists()
        _tab(page, "Bank").click()
        page.wait_for_function("() => [...document.querySelectorAll('#seqlora_concepts')].some(e => e.textContent.includes('<chelsea>'))",
                               timeout=30000)
        assert "1 concept(s)" in page.locator("#seqlora_capacity").first.text_content()
        (ROOT / "out").mkdir(exist_ok=True)
        page.screenshot(path=str(ROOT / "out" / "ui-bank.png"), full_page=True)
        _tab(page, "Compose").click()
        assert page.locator("#seqlora_compose_ids input[type=checkbox]").first.is_checked()  # all chosen by default
        page.locator("#seqlora_export").click()
        page.locator("#seqlora_compose_status .seqlora-ok, #seqlora_compose_status .seqlora-error").wait_for(timeout=60000)
        assert "exported seqlora_chelsea.safetensors" in page.locator("#seqlora_compose_status").first.text_content()
        assert (bank.parent / "exports" / "seqlora_chelsea.safetensors").exists()
        _tab(page, "Train").click()
        # Forecast: the same photos as a next concept, against the bank just saved; nothing is trained
        before = bank.read_bytes()
        _field(page, "seqlora_token").fill("<coffee>")
        _field(page, "seqlora_token").press("Tab")
        page.locator("#seqlora_forecast").click()
        page.locator("#seqlora_forecast_text .seqlora-forecast, #seqlora_forecast_text .seqlora-error").wait_for(timeout=120000)
        forecast = page.locator("#seqlora_forecast_text").first.text_content()
        assert "forecast for <coffee>" in forecast and "chelsea" in forecast and "%" in forecast, forecast
        assert bank.read_bytes() == before
        page.screenshot(path=str(ROOT / "out" / "ui-train.png"), full_page=True)
        browser.close()
    assert not errors, errors
