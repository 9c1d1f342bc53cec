"""The pack's main use in a ComfyUI that stays open: concepts added one after another to one bank
file, sampling in between, bad input refused before the queue runs, the entry point."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

from .helpers import CKPT_NAME, ROOT, pack_module, run_workflow

# every training setting as the example workflow has it, made quick
QUICK = {**{k: v for k, v in json.loads((ROOT / "workflows" / "train_compose_api.json").read_text())["3"]["inputs"].items()
            if not isinstance(v, list) and k not in ("token", "init_word")},
         "steps": 1, "bilevel_iters": 1, "inner_steps": 1, "resolution": 64, "sample_steps": 0}


def _train_graph(photo: str, token: str, bank_name: str, load: bool, sample: bool = False) -> dict:
    """[Load bank →] Train → Save (overwrite) [→ KSampler on the trained model → Preview]."""
    wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
          "2": {"class_type": "LoadImage", "inputs": {"image": photo}},
          "3": {"class_type": "SeqLoRATrainConcept",
                "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "token": token,
                           "init_word": "cat", **QUICK}},
          "4": {"class_type": "SeqLoRASaveBasisBank", "inputs": {"bank": ["3", 0], "bank_name": bank_name,
                                                                 "overwrite": True}}}
    if load:
        wf["5"] = {"class_type": "SeqLoRALoadBasisBank", "inputs": {"bank_name": f"{bank_name}.safetensors",
                                                                   "model": ["1", 0]}}
        wf["3"]["inputs"]["bank"] = ["5", 0]
    if sample:
        wf["3"]["inputs"]["sample_steps"] = 1
        wf.update({
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": f"a photo of {token.upper()}", "clip": ["3", 2]}},
            "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "8": {"class_type": "KSampler", "inputs": {"model": ["3", 1], "positive": ["6", 0], "negative": ["6", 0],
                                                       "latent_image": ["7", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
            "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
            "11": {"class_type": "PreviewImage", "inputs": {"images": ["3", 4]}}})
    return wf


def _error(entry: dict) -> str:
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:2000]
    return [m for m in entry["status"]["messages"] if m[0] == "execution_error"][0][1]["exception_message"]


def test_concepts_added_one_after_another_to_one_file_are_all_kept(comfy_server, comfy_path, photo):
    """Load b → Train → Save b (overwrite), three times with sampling in between: the file ends with
    every concept (a cached Load once dropped the middle one), the sampled (patched) model does not
    make the bank look foreign, and a save that would drop a concept on disk goes to a pending file."""
    from seqlora_core.bank.format import load_bank

    name = f"pytest_session_{os.getpid()}"
    path = comfy_path / "models" / "seqlora" / f"{name}.safetensors"
    try:
        first = run_workflow(comfy_server, _train_graph(photo, "<chelsea>", name, load=False, sample=True))
        assert first["status"]["status_str"] == "success", json.dumps(first["status"])[:3000]
        assert first["outputs"]["11"]["images"], "the training node's sample image"
        for token in ("<coffee>", "<rocket>"):
            entry = run_workflow(comfy_server, _train_graph(photo, token, name, load=True, sample=True))
            assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
            assert entry["outputs"]["4"]["text"][0].startswith(f"saved {name}.safetensors")
        assert [c.token for c in load_bank(path).concepts] == ["<chelsea>", "<coffee>", "<rocket>"]

        before = path.read_bytes()
        lost = run_workflow(comfy_server, _train_graph(photo, "<stray>", name, load=False))
        message = _error(lost)
        assert "was left as it is" in message and ".pending-" in message  # the trained bank is kept apart
        assert path.read_bytes() == before
        pending = sorted(path.parent.glob(f"{name}.pending-*.safetensors"))
        assert [c.token for c in load_bank(pending[-1]).concepts] == ["<stray>"]
        for p in pending:
            p.unlink()

        # removing a concept on purpose and saving over the file is not a loss
        wf = {"1": {"class_type": "SeqLoRALoadBasisBank", "inputs": {"bank_name": path.name}},
              "2": {"class_type": "SeqLoRARemoveConcept", "inputs": {"bank": ["1", 0], "concept": "<coffee>"}},
              "3": {"class_type": "SeqLoRASaveBasisBank", "inputs": {"bank": ["2", 0], "bank_name": name,
                                                                     "overwrite": True}},
              "4": {"class_type": "SeqLoRAExportLoRA", "inputs": {"bank": ["1", 0], "concepts": "chelsea,rocket",
                                                                  "lora_name": name, "overwrite": True}}}
        entry = run_workflow(comfy_server, wf)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
        assert [c.token for c in load_bank(path).concepts] == ["<chelsea>", "<rocket>"]
        assert f"embedding:{name}/chelsea" in entry["outputs"]["4"]["text"][0]
        assert (comfy_path / "models" / "loras" / f"{name}.safetensors").stat().st_size > 0
        assert (comfy_path / "models" / "embeddings" / name / "rocket.safetensors").exists()
    finally:
        path.unlink(missing_ok=True)
        (comfy_path / "models" / "loras" / f"{name}.safetensors").unlink(missing_ok=True)
        for f in (comfy_path / "models" / "embeddings" / name).glob("*.safetensors"):
            f.unlink()
        if (comfy_path / "models" / "embeddings" / name).exists():
            (comfy_path / "models" / "embeddings" / name).rmdir()


def _queue(url: str, workflow: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": workflow}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        return 200, json.load(urllib.request.urlopen(req))
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


def test_bad_input_is_refused_before_the_queue_runs(comfy_server, photo):
    wf = _train_graph(photo, "my concept", "pytest_never_written", load=False)
    wf["4"]["inputs"]["bank_name"] = "../escape"
    wf["20"] = {"class_type": "SeqLoRADrawKeypose", "inputs": {"keypoints": "{not json", "width": 64, "height": 64}}
    wf["21"] = {"class_type": "PreviewImage", "inputs": {"images": ["20", 0]}}
    code, body = _queue(comfy_server, wf)
    assert code == 400
    details = {node: " ".join(e["details"] for e in err["errors"]) for node, err in body["node_errors"].items()}
    assert "Token 'my concept' must look like <name>" in details["3"]
    assert "Bank name '../escape' may only use" in details["4"]
    assert "Keypoints must be OpenPose JSON" in details["20"]


def test_the_pack_imports_without_a_server_and_registers_on_load(comfy_importable):
    """Importing the pack touches nothing (no server, no folder); the entry point hands over the
    nodes, registering models/seqlora on the way (here no server runs, so no route)."""
    code = (
        "import asyncio, importlib.util, sys; sys.path.insert(0, sys.argv[1])\n"
        "import comfy.cli_args; comfy.cli_args.args.cpu = True\n"
        "import folder_paths\n"
        "spec = importlib.util.spec_from_file_location('seqlora_pack', sys.argv[2] + '/__init__.py',\n"
        "                                              submodule_search_locations=[sys.argv[2]])\n"
        "pack = importlib.util.module_from_spec(spec); sys.modules['seqlora_pack'] = pack\n"
        "spec.loader.exec_module(pack)\n"
        "assert 'seqlora' not in folder_paths.folder_names_and_paths, 'import registered the folder'\n"
        "assert not hasattr(pack, 'NODE_CLASS_MAPPINGS')\n"
        "ext = asyncio.run(pack.comfy_entrypoint())\n"
        "nodes = asyncio.run(ext.get_node_list())\n"
        "assert 'seqlora' in folder_paths.folder_names_and_paths\n"
        "print(sorted(n.GET_SCHEMA().node_id for n in nodes))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(comfy_importable), str(ROOT)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = json.loads(proc.stdout.strip().splitlines()[-1].replace("'", '"'))
    assert {"SeqLoRATrainConcept", "SeqLoRALoadBasisBank", "SeqLoRASaveBasisBank", "SeqLoRARemoveConcept",
            "SeqLoRAExportLoRA"} <= set(ids)


def test_sending_without_a_server_logs_once(comfy_importable, caplog):
    events = pack_module("nodes.server_events")
    with caplog.at_level("WARNING", logger="seqlora"):
        assert events.send("seqlora.pytest", {}) is False
        assert events.send("seqlora.pytest", {}) is False
    assert len([r for r in caplog.records if "seqlora.pytest" in r.getMessage()]) == 1


def test_requirements_change_nothing_in_a_comfyui_venv(comfy_importable, tmp_path):
    """requirements.txt installs nothing ComfyUI's venv already has (pip's dry-run report is empty)."""
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet", "--report",
                           str(report), "-r", str(ROOT / "requirements.txt")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(report.read_text())["install"] == []
