"""Registry metadata (pyproject.toml) agrees with the code and requirements.txt, and importing
the ComfyUI entry point outside ComfyUI has no side effect."""
import importlib.util
import sys
import tomllib
from pathlib import Path

import seqlora_core

ROOT = Path(__file__).resolve().parents[1]


def _requirements(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_pyproject_matches_the_code_and_requirements():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["version"] == seqlora_core.__version__
    assert meta["project"]["dependencies"] == _requirements("requirements.txt")
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and (ROOT / comfy["Icon"]).exists()
    assert "web" not in comfy  # WEB_DIRECTORY serves js/; both would load the extension twice


def test_the_pack_needs_nothing_but_what_comfyui_ships():
    """Inside ComfyUI the pack imports no diffusers/transformers (standalone-only packages)."""
    assert not any(r.split(">")[0].split("=")[0].lower() in ("diffusers", "transformers", "torch")
                   for r in _requirements("requirements.txt"))
    for path in (ROOT / "nodes").glob("*.py"):
        text = path.read_text()
        assert "diffusers" not in text and "import transformers" not in text, path


def test_importing_the_entry_point_has_no_side_effect():
    spec = importlib.util.spec_from_file_location("seqlora_pack_probe", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    before = set(sys.modules)
    spec.loader.exec_module(module)
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")
    assert callable(module.comfy_entrypoint) and module.WEB_DIRECTORY == "./js"
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] in ("comfy", "comfy_api", "server", "folder_paths")}
