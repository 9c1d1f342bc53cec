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


def _cross_attention():
    """A small Comfy CrossAttention (query 64 wide, context 32, two heads) with seeded weights
    (Comfy's ops skip weight initialisation)."""
    from comfy.ldm.modules.attention import CrossAttention

    torch.manual_seed(0)
    attn = CrossAttention(query_dim=64, context_dim=32, heads=2, dim_head=16).eval()
    with torch.no_grad():
        for param in attn.parameters():
            param.normal_(0, 0.1)
    return attn


def test_region_isolation_in_comfy_cross_attention(comfy_importable):
    from seqlora_core.sampling.regions import Region, region_masks

    load_pack()
    regional = importlib.import_module("seqlora_pack.nodes.regional")
    attn = _cross_attention()
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
    from seqlora_core.sampling.regions import Region, region_masks

    load_pack()
    regional = importlib.import_module("seqlora_pack.nodes.regional")
    attn = _cross_attention()
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


def test_attention_maps_in_comfy_cross_attention_read_what_it_attends(comfy_importable):
    """Find Concept Regions' attn2 patch: Comfy's own attention output, unchanged, and on the
    conditional row the softmax attention to the concept's token positions, averaged over heads,
    added to its map on the latent grid (checked against the attention computed by hand)."""
    load_pack()
    auto = importlib.import_module("seqlora_pack.nodes.auto_regions")
    attn = _cross_attention()
    x = torch.randn(2, 64, 64)  # batch: [uncond, cond], 8×8 latent grid
    ctx = torch.randn(2, 77, 32)
    maps = {"c": torch.zeros(8, 8)}
    options = {"cond_or_uncond": [1, 0], "original_shape": [2, 4, 8, 8]}
    with torch.no_grad():
        out = auto.recording_forward(attn, maps, {"c": [4, 5]}, (8, 8))(x, context=ctx, transformer_options=options)
        plain = attn(x, context=ctx)
        q = attn.to_q(x[1]).view(64, 2, 16).transpose(0, 1)  # (heads, n, d), the conditional row
        k = attn.to_k(ctx[1]).view(77, 2, 16).transpose(0, 1)
        probs = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1)  # (heads, n, 77)
        expected = probs[..., [4, 5]].sum(-1).mean(0).reshape(8, 8)
    assert torch.allclose(out, plain, atol=1e-6)
    assert torch.allclose(maps["c"], expected, atol=1e-5), (maps["c"] - expected).abs().max()


def _two_concept_bank(model, clip):
    """A bank for this checkpoint with two concepts, <left> and <right>: random factors on the
    default targets (orthogonal bases), random token vectors; no training needed to find regions."""
    from seqlora_core.bank.format import Concept
    from seqlora_core.method.targets import select_layers
    from seqlora_core.method.trainer import new_bank

    operations = pack_module("nodes.operations")

    class _Host:  # what new_bank reads of a host
        def architecture(self):
            return "sd15"

        def linear_layers(self):
            return operations.unpatched_unet_layers(model)

    bank = new_bank(_Host())
    layers = operations.model_layers(model, clip)
    gen = torch.Generator().manual_seed(0)
    for ident in ("left", "right"):
        a, b = {}, {}
        for name, layer in select_layers(layers, "default").items():
            b[name] = bank.projector(name, layer.in_features).random_orthonormal(4, gen)
            a[name] = 0.05 * torch.randn(layer.out_features, 4, generator=gen)
        bank = bank.with_concept(Concept(ident, f"<{ident}>", "person", 4, "seqlora", a, b,
                                         torch.randn(1, 768, generator=gen)))
    return bank


def test_find_concept_regions_in_comfyui_gives_regions_or_one_sentence(comfy_importable, checkpoint):
    """The node on a real SD-1.5 checkpoint (random weights) with two concepts: either one region
    per concept with disjoint masks, which Regional Concepts takes (confined), or the one-sentence
    refusal — never a traceback. A prompt naming no concept is refused by name."""
    import comfy.sample
    import comfy.sd

    from seqlora_core.errors import InputError

    load_pack()
    node_defs = importlib.import_module("seqlora_pack.nodes.node_defs")
    with torch.inference_mode():
        model, clip = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=True)[:2]
    bank = _two_concept_bank(model, clip)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    find = node_defs.FindConceptRegions.execute
    try:
        regions, masks = find(model, clip, bank, "a photo of <left> and <right>", "", latent, 0, 4, 7.5, "euler",
                              "normal").result
    except InputError as exc:
        message = str(exc)
        print(f"Find Concept Regions refused: {message}")
        assert "\n" not in message and ("draw a box" in message or "no place of its own" in message), message
    else:
        print(f"Find Concept Regions: masks of {[int(m.sum()) for m in masks]} pixels")
        assert [r.concepts for r in regions] == [["left"], ["right"]]
        assert masks.shape == (2, 64, 64) and not (masks[0] * masks[1]).any() and masks.sum() > 0
        regional = node_defs.RegionalConcepts.execute(model, clip, '{"width": 64, "height": 64, "regions": []}',
                                                      bank=bank, residuals="confined", found_regions=regions).result[0]
        with torch.inference_mode():
            cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo"), return_pooled=True)
            noise = comfy.sample.prepare_noise(latent["samples"], 0)
            out = comfy.sample.sample(regional, noise, 2, 7.5, "euler", "normal", [[cond, {"pooled_output": pooled}]],
                                      [[cond, {"pooled_output": pooled}]], latent["samples"], seed=0, disable_pbar=True)
        assert torch.isfinite(out).all()
    try:
        find(model, clip, bank, "a photo of a cat", "", latent, 0, 4, 7.5, "euler", "normal")
        raise AssertionError("a prompt naming no concept was not refused")
    except InputError as exc:
        assert "names concepts" in str(exc)


def test_find_concept_regions_runs_in_a_queued_workflow(comfy_server, comfy_path, checkpoint):
    """Find Concept Regions wired as a user wires it: Load Basis Bank → Find Concept Regions →
    Regional Concepts (found_regions, confined) → KSampler → Save Image, and its masks into the
    stock MaskPreview; ComfyUI passes the regions between the nodes and shows one mask per concept."""
    import comfy.sd

    load_pack()
    with torch.inference_mode():
        model, clip = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=True)[:2]
    bank_name = f"pytest_auto_regions_{os.getpid()}.safetensors"
    bank_file = comfy_path / "models" / "seqlora" / bank_name
    bank_file.parent.mkdir(parents=True, exist_ok=True)
    _two_concept_bank(model, clip).save(bank_file)
    checkpoint_out = {"model": ["1", 0], "clip": ["1", 1]}
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
        "2": {"class_type": "SeqLoRALoadBasisBank", "inputs": {"bank_name": bank_name, "model": ["1", 0]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "SeqLoRAFindConceptRegions", "inputs": {
            **checkpoint_out, "bank": ["2", 0], "prompt": "a photo of <left> and <right>", "negative": "",
            "latent": ["3", 0], "seed": 0, "steps": 4, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal"}},
        "5": {"class_type": "SeqLoRARegionalConcepts", "inputs": {
            **checkpoint_out, "regions": '{"width": 64, "height": 64, "regions": []}', "bank": ["2", 0],
            "residuals": "confined", "found_regions": ["4", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of two people", "clip": ["1", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["3", 0], "seed": 0,
            "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "seqlora_auto_regions"}},
        "11": {"class_type": "MaskPreview", "inputs": {"mask": ["4", 1]}},
    }
    try:
        entry = run_workflow(comfy_server, wf)
    finally:
        bank_file.unlink(missing_ok=True)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert len(entry["outputs"]["11"]["images"]) == 2  # one mask per concept
    image = entry["outputs"]["10"]["images"][0]["filename"]
    assert (comfy_path / "output" / image).stat().st_size > 0
