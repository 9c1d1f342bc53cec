"""Fixtures that drive a real AUTOMATIC1111 (v1.10.1) with this repository installed as an extension.

Set A1111_PATH to an A1111 checkout prepared by ``tests/integration/build_a1111.sh`` (its Python:
A1111_PYTHON, default ``$A1111_PATH/venv/bin/python``) and run pytest with the project's Python:

    A1111_PATH=/work/hosts/a1111 A1111_PYTHON=/work/hosts/a1111-venv/bin/python \
        .venv/bin/python -m pytest tests/integration/a1111

Without A1111_PATH every test here is skipped, saying why. The extension is copied (tracked and
unignored files, as a clone would have them) to ``extensions/seqlora-under-test`` and its
install.py run through A1111's own installer runner; A1111 is started on 127.0.0.1 with
``--api --use-cpu all --no-half``. Only one A1111 runs at a time (6-10 GB resident).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
A1111 = os.environ.get("A1111_PATH")
CKPT = "seqlora-sd15-random.safetensors"
EXT_NAME = "seqlora-under-test"
FLAGS = ["--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-version-check", "--no-download-sd-model",
         "--use-cpu", "all", "--no-half", "--no-hashing"]


HERE = str(Path(__file__).resolve().parent)


def pytest_collection_modifyitems(config, items):
    """Called with every collected item of the run: touch only the ones in this folder."""
    if not A1111:
        skip = pytest.mark.skip(reason="A1111_PATH is not set: these tests drive a real AUTOMATIC1111 checkout")
        for item in items:
            if str(item.fspath).startswith(HERE):
                item.add_marker(skip)
    # the loss comparison loads A1111 in a process of its own: before the server starts, so that
    # two full-size models are never in memory at once
    items.sort(key=lambda item: "test_a1111_host_loss" not in item.nodeid)


@pytest.fixture(scope="session")
def a1111_path() -> Path:
    path = Path(A1111).expanduser().resolve()
    if not (path / "launch.py").exists() or not (path / "modules" / "extra_networks.py").exists():
        pytest.fail(f"A1111_PATH={A1111} is not an AUTOMATIC1111 checkout")
    return path


@pytest.fixture(scope="session")
def a1111_python(a1111_path) -> str:
    python = os.environ.get("A1111_PYTHON") or str(a1111_path / "venv" / "bin" / "python")
    if not Path(python).exists():
        pytest.fail(f"no A1111 Python at {python}; set A1111_PYTHON (see tests/integration/build_a1111.sh)")
    return python


@pytest.fixture(scope="session")
def a1111_env(a1111_path) -> dict:
    """A1111's environment: offline, with the local CLIP config/tokenizer cache."""
    from tests.integration.hf_clip_cache import write_cache

    home = Path(os.environ.get("HF_HOME") or a1111_path / "seqlora-hf-home")
    write_cache(home)
    return dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.fixture(scope="session")
def checkpoint(a1111_path) -> Path:
    from tests.integration.make_sd15_checkpoint import fix_text_norm, text_norm_is_degenerate

    path = a1111_path / "models" / "Stable-diffusion" / CKPT
    if not path.exists():
        pytest.fail(f"no {path}: build it with tests/integration/build_a1111.sh (make_sd15_checkpoint.py)")
    if text_norm_is_degenerate(str(path)):  # written before the fix: A1111 turns a third of prompts into NaN
        fix_text_norm(str(path))
    return path


@pytest.fixture(scope="session")
def extension(a1111_path, a1111_python, a1111_env) -> Path:
    """This repository as A1111 would get it from a clone, installed with A1111's installer runner."""
    target = a1111_path / "extensions" / EXT_NAME
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    code = ("import sys; sys.argv = ['launch.py', '--skip-prepare-environment']\n"
            "from modules import launch_utils\n"
            f"launch_utils.run_extension_installer({str(target)!r})\n")
    subprocess.run([a1111_python, "-c", code], cwd=a1111_path, env=a1111_env, check=True)
    return target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class A1111Server:
    """A running A1111 and the few API calls the tests need."""

    def __init__(self, url: str, path: Path, log: Path):
        self.url, self.path, self.log = url, path, log

    def get(self, route: str):
        return json.load(urllib.request.urlopen(self.url + route, timeout=600))

    def post(self, route: str, body: dict, timeout: float = 1800):
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            return json.load(urllib.request.urlopen(req, timeout=timeout))
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"A1111 answered {exc.code} to {route}: {exc.read().decode()[:2000]}") from None

    def txt2img(self, prompt: str, size: int = 64, steps: int = 3, seed: int = 1):
        """(H, W, 3) uint8 array and the infotext of one image."""
        import base64
        import io

        import numpy as np
        from PIL import Image

        r = self.post("/sdapi/v1/txt2img", {"prompt": prompt, "negative_prompt": "", "steps": steps, "width": size,
                                            "height": size, "sampler_name": "Euler", "seed": seed, "cfg_scale": 7})
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r["images"][0]))).convert("RGB"))
        return image, json.loads(r["info"])["infotexts"][0]

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


@pytest.fixture(scope="session")
def a1111(a1111_path, a1111_python, a1111_env, checkpoint, extension, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("a1111") / "a1111.log"
    handle = open(log, "w")
    # --ckpt: start on the test checkpoint whatever an earlier run switched to (A1111 remembers it)
    proc = subprocess.Popen([a1111_python, "launch.py", *FLAGS, "--ckpt", str(checkpoint), "--api", "--port", str(port)],
                            cwd=a1111_path, env=a1111_env, stdout=handle, stderr=subprocess.STDOUT)
    server = A1111Server(f"http://127.0.0.1:{port}", a1111_path, log)
    deadline = time.time() + 900
    try:
        while True:
            try:
                models = server.get("/sdapi/v1/sd-models")
                options = server.get("/sdapi/v1/options")  # answers once the model is loaded
                if models and options.get("sd_model_checkpoint"):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if proc.poll() is not None:
                pytest.fail("A1111 exited during start-up:\n" + server.log_tail())
            if time.time() > deadline:
                pytest.fail("A1111 did not load its model within 15 minutes:\n" + server.log_tail())
            time.sleep(3)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        handle.close()
