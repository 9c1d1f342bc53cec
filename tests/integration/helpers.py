"""Helpers for the ComfyUI integration tests (kept out of conftest so tests can import them)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CKPT_NAME = "seqlora_test_sd15_random.safetensors"


def load_pack():
    """This repository imported as the package ComfyUI sees ("seqlora_pack"); ComfyUI owns the
    top-level name ``nodes``, so our ``nodes`` package is only reachable through the pack."""
    if "seqlora_pack" not in sys.modules:
        spec = importlib.util.spec_from_file_location("seqlora_pack", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["seqlora_pack"] = module
        spec.loader.exec_module(module)
    return sys.modules["seqlora_pack"]


def pack_module(name: str):
    """A submodule of the pack, e.g. ``pack_module("nodes.operations")`` (importing the pack itself
    imports nothing else: ComfyUI gets the nodes from ``comfy_entrypoint()``)."""
    load_pack()
    return importlib.import_module(f"seqlora_pack.{name}")


def run_workflow(url: str, workflow: dict, timeout: float = 900) -> dict:
    """POST to /prompt and wait for the history entry; returns it."""
    req = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": workflow}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        prompt_id = json.load(urllib.request.urlopen(req))["prompt_id"]
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"ComfyUI refused the workflow: {exc.read().decode()[:2000]}") from None
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = json.load(urllib.request.urlopen(f"{url}/history/{prompt_id}"))
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(1)
    raise AssertionError("workflow did not finish in time")
