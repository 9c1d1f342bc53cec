"""Fixtures that drive a real ComfyUI (a checkout of the public Comfy-Org/ComfyUI repository).

Set COMFYUI_PATH to the checkout and run pytest with a Python that has ComfyUI's requirements
(its torch included), e.g.  COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python -m pytest tests/integration
Without COMFYUI_PATH every test here is skipped, saying why.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .helpers import CKPT_NAME, ROOT

COMFY = os.environ.get("COMFYUI_PATH")


def pytest_collection_modifyitems(config, items):
    if COMFY:
        return
    skip = pytest.mark.skip(reason="COMFYUI_PATH is not set: these tests drive a real ComfyUI checkout")
    for item in items:
        if "integration" in str(item.fspath) and "a1111" not in str(item.fspath):  # a1111/: A1111_PATH
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_path() -> Path:
    path = Path(COMFY).expanduser().resolve()
    if not (path / "main.py").exists():
        pytest.fail(f"COMFYUI_PATH={COMFY} is not a ComfyUI checkout (no main.py)")
    return path


@pytest.fixture(scope="session")
def comfy_importable(comfy_path):
    """Import ComfyUI's modules in this process, on the CPU."""
    sys.path.insert(0, str(comfy_path))
    try:
        import comfy.cli_args
    except ImportError as exc:
        pytest.skip(f"this Python cannot import ComfyUI ({exc}); run pytest with ComfyUI's Python")
    comfy.cli_args.args.cpu = True
    return comfy_path


@pytest.fixture(scope="session")
def checkpoint(comfy_importable) -> Path:
    """A random-weight SD-1.5 checkpoint in the original key format, fp16, in models/checkpoints."""
    path = comfy_importable / "models" / "checkpoints" / CKPT_NAME
    if not path.exists():
        sys.path.insert(0, str(Path(__file__).parent))
        from make_sd15_checkpoint import build

        build(str(comfy_importable), str(path), "fp16")
    return path


@pytest.fixture(scope="session")
def photo(comfy_path) -> str:
    import skimage.data
    from PIL import Image

    name = "seqlora_test_chelsea.png"
    Image.fromarray(skimage.data.chelsea()).save(comfy_path / "input" / name)
    return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def comfy_server(comfy_path, checkpoint):
    """ComfyUI on 127.0.0.1 with this repository installed as custom_nodes/SeqLoRA."""
    link = comfy_path / "custom_nodes" / "SeqLoRA"
    made_link = False
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
        made_link = True
    port = _free_port()
    log = open(ROOT / "out" / "comfyui-test.log", "w") if (ROOT / "out").exists() else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)],
                            cwd=comfy_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/system_stats", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None:
                pytest.fail("ComfyUI exited during start-up")
            time.sleep(1)
    else:
        proc.terminate()
        pytest.fail("ComfyUI did not answer within 180 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    if made_link:
        link.unlink()
