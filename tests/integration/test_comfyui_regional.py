"""Regional composition inside ComfyUI: exact isolation in Comfy's own attention, and the example
workflow (two concepts in two boxes, sketch and keypose T2I-Adapters) in a real ComfyUI."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import torch

from .helpers import CKPT_NAME, ROOT, load_pack, pack_module, run_workflow


def test_region_isolation_in_comfy_cross_attention(comfy_importable):
    from comfy.ldm.modules.attention import CrossAttention

    from seqlora_core.sampling.regions import Region, region_masks

    load_pack()
    regional = importlib.import_module("seqlora_pack.nodes.regional")
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=64, context_dim=32, heads=2, dim_head=16).eval()
    with torch.no_grad():  # Comfy's ops skip weight initialisation
        for param in attn.parameters():
            param.normal_(0, 0.1)
    x = torch.randn(2, 64, 64)  # batch: [uncond, cond], 8×8 latent grid
    ctx = torch.randn(2, 77, 32)
    masks = region_masks([Region("a", box=(0, 0, 16, 64)), Region("b", box=(48, 0, 64, 64))], 64, 64)
    c1, c2, c2b = (torch.randn(1, 77, 32) for _ in range(3))
    options = {"cond_or_uncond": [1, 0], "original_shape": [2, 4, 8, 8]}
    with torch.no_grad():
        out_a = regional.make_forward(attn, masks, torch.cat([c1, c2]))(x, context=ctx, transformer_options=options)
        out_b = regional.make_forward(attn, masks, torch.cat([c1, c2b]))(x, context=ctx, transformer_options=options)
        plain = attn(x, context=ctx)
    a, b, p = (t.reshape(2, 8, 8, -1) for t in (out_a, out_b, plain))
    assert torch.equal(a[1, :, :2], b[1, :, :2])  # region 1 untouched by region 2's prompt
    assert not torch.allclose(a[1, :, 6:], b[1, :, 6:])
    assert torch.equal(a[1, :, 2:6], p[1, :, 2:6])  # outside the regions the global prompt rules
    assert torch.equal(a[0], p[0])  # the unconditional row is not regional


def _adapter_file(path, in_channels):
    from diffusers import T2IAdapter
    from safetensors.torch import save_file

    torch.manual_seed(in_channels)
    adapter = T2IAdapter(in_channels=in_channels, channels=[320, 640, 1280, 1280], num_res_blocks=2,
                         downscale_factor=8, adapter_type="full_adapter")
    save_file({k: v.contiguous().half() for k, v in adapter.state_dict().items()}, str(path))


def test_regional_example_workflow(comfy_server, comfy_path, checkpoint, photos, tmp_path):
    from PIL import Image

    bank_name = f"pytest_regional_{os.getpid()}.safetensors"
    bank = comfy_path / "models" / "seqlora" / bank_name
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for token in ("<chelsea>", "<coffee>"):
        proc = subprocess.run([sys.executable, "-m", "seqlora_core", "train", "--bank", str(bank), "--base", str(checkpoint),
                               "--images", str(photos[token]), "--token", token, "--steps", "1", "--bilevel-iters", "1",
                               "--resolution", "64", "--device", "cpu"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-2000:]
    controlnet = comfy_path / "models" / "controlnet"
    controlnet.mkdir(parents=True, exist_ok=True)
    sketch_file, keypose_file = controlnet / "pytest_sketch.safetensors", controlnet / "pytest_keypose.safetensors"
    _adapter_file(sketch_file, 1)
    _adapter_file(keypose_file, 3)
    sketch = np.full((64, 64, 3), 255, np.uint8)
    sketch[30:34, 8:56] = 0
    Image.fromarray(sketch).save(comfy_path / "input" / "pytest_sketch.png")

    wf = json.loads((ROOT / "workflows" / "regional_sketch_keypose_api.json").read_text())
    wf["1"]["inputs"]["ckpt_name"] = CKPT_NAME
    wf["2"]["inputs"]["bank_name"] = bank_name
    regions = json.loads(wf["4"]["inputs"]["regions"])
    regions.update(width=64, height=64)
    for r in regions["regions"]:
        r["box"] = [v / 8 for v in r["box"]]
    wf["4"]["inputs"]["regions"] = json.dumps(regions)
    wf["7"]["inputs"]["image"] = "pytest_sketch.png"
    wf["8"]["inputs"].update(width=64, height=64)
    wf["9"]["inputs"]["control_net_name"] = sketch_file.name
    wf["10"]["inputs"]["control_net_name"] = keypose_file.name
    wf["13"]["inputs"].update(width=64, height=64)
    wf["14"]["inputs"]["steps"] = 2
    try:
        entry = run_workflow(comfy_server, wf)
    finally:
        for f in (bank, sketch_file, keypose_file):
            f.unlink(missing_ok=True)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    image = entry["outputs"]["16"]["images"][0]["filename"]
    assert (comfy_path / "output" / image).stat().st_size > 0
    pose = np.asarray(Image.open(comfy_path / "output" / entry["outputs"]["17"]["images"][0]["filename"]))
    assert pose.reshape(-1, pose.shape[-1])[:, :3].max() > 0  # a skeleton was drawn


def test_confined_residuals_in_comfy_cross_attention(comfy_importable):
    """Confined mode in Comfy's attention: each region's keys and values get only its own
    concepts' factors, so changing the right region's factors leaves the left one bit for bit
    unchanged, on both rows of guidance."""
    from comfy.ldm.modules.attention import CrossAttention

    from seqlora_core.sampling.regions import Region, region_masks

    load_pack()
    regional = importlib.import_module("seqlora_pack.nodes.regional")
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=64, context_dim=32, heads=2, dim_head=16).eval()
    with torch.no_grad():
        for param in attn.parameters():
            param.normal_(0, 0.1)
    x = torch.randn(2, 64, 64)
    ctx = torch.randn(2, 77, 32)
    masks = region_masks([Region("a", box=(0, 0, 32, 64)), Region("b", box=(32, 0, 64, 64))], 64, 64)
    contexts = torch.randn(2, 77, 32)
    pair = lambda: (torch.randn(32, 4), torch.randn(32, 4))  # noqa: E731  (A, B) on to_k / to_v
    left = {"k": pair(), "v": pair()}
    right, right_b = {"k": pair(), "v": pair()}, {"k": pair(), "v": pair()}
    options = {"cond_or_uncond": [1, 0], "original_shape": [2, 4, 8, 8]}
    with torch.no_grad():
        out_a = regional.make_forward(attn, masks, contexts, {0: left, 1: right})(x, context=ctx, transformer_options=options)
        out_b = regional.make_forward(attn, masks, contexts, {0: left, 1: right_b})(x, context=ctx, transformer_options=options)
        plain = regional.make_forward(attn, masks, contexts)(x, context=ctx, transformer_options=options)
    a, b, p = (t.reshape(2, 8, 8, -1) for t in (out_a, out_b, plain))
    assert torch.equal(a[:, :, :4], b[:, :, :4])  # the left region, both rows: untouched by the right's factors
    assert not torch.allclose(a[:, :, 4:], b[:, :, 4:])
    assert not torch.allclose(a[1, :, :4], p[1, :, :4])  # the left region's own concept acts there
