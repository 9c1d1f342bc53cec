"""Registry metadata (pyproject.toml) agrees with the code and requirements.txt, and importing
the ComfyUI entry point outside ComfyUI has no side effect."""
import importlib.util
import re
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


def test_licence_is_apache_2_with_a_notice_of_shipped_third_party_data():
    import hashlib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    assert all((ROOT / f).is_file() for f in meta["project"]["license-files"])
    # byte for byte the text published at https://www.apache.org/licenses/LICENSE-2.0.txt
    assert hashlib.md5((ROOT / "LICENSE").read_bytes()).hexdigest() == "3b83ef96387f14655fc854ddc3c6bd57"
    notice = (ROOT / "NOTICE").read_text()
    shipped = [p for p in (ROOT / "seqlora_core" / "hosts" / "data").iterdir()]
    assert shipped and all(f"seqlora_core/hosts/data/{p.name}" in notice for p in shipped)
    assert "seqlora_core/hosts/configs" in notice
    examples = [p for p in (ROOT / "example_inputs").rglob("*") if p.suffix in (".jpg", ".png")]
    assert examples and all(p.name in notice or f"{p.parent.name}/*" in notice for p in examples)


def test_the_example_inputs_are_small_and_copied_without_replacing_anything(tmp_path):
    """Issue 23: the example workflows' inputs ship with the pack and reach ComfyUI's input folder;
    a file of the same name there is the user's and is kept."""
    from nodes.examples import copy_examples, example_files

    files = example_files()
    assert {"seqlora_chelsea.jpg", "seqlora_sketch.png"} <= {p.as_posix() for p in files}
    assert sum(p.parent.name == "seqlora_coffee" for p in files) >= 3
    assert all((ROOT / "example_inputs" / p).stat().st_size < 100_000 for p in files)
    (tmp_path / "seqlora_chelsea.jpg").write_bytes(b"the user's own")
    copied = copy_examples(tmp_path)
    assert (tmp_path / "seqlora_chelsea.jpg").read_bytes() == b"the user's own"
    assert sorted(copied) == sorted(p for p in files if p.as_posix() != "seqlora_chelsea.jpg")
    assert all((tmp_path / p).read_bytes() == (ROOT / "example_inputs" / p).read_bytes() for p in copied)
    assert copy_examples(tmp_path) == []


def test_the_pack_needs_nothing_but_what_comfyui_ships():
    """Inside ComfyUI the pack imports no diffusers/transformers (standalone-only packages)."""
    assert not any(r.split(">")[0].split("=")[0].lower() in ("diffusers", "transformers", "torch")
                   for r in _requirements("requirements.txt"))
    for path in (ROOT / "nodes").glob("*.py"):  # an import statement, not a word in a tooltip ("diffusers format")
        assert not re.search(r"^\s*(import|from)\s+(diffusers|transformers)\b", path.read_text(), re.M), path


def test_importing_the_entry_point_has_no_side_effect():
    spec = importlib.util.spec_from_file_location("seqlora_pack_probe", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    before = set(sys.modules)
    spec.loader.exec_module(module)
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")
    assert callable(module.comfy_entrypoint) and module.WEB_DIRECTORY == "./js"
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] in ("comfy", "comfy_api", "server", "folder_paths")}
