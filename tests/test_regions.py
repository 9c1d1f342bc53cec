"""Regional cross-attention, keypose drawing and sketch / keypose control on tiny."""
import json

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, T2IAdapter
from diffusers.models.attention_processor import AttnProcessor2_0

from seqlora_core.sampling.control import Control, control_image, unet_control_kwargs
from seqlora_core.errors import InputError
from seqlora_core.sampling.keypose import COLORS, draw_keypose
from seqlora_core.sampling.regions import (Region, RegionalAttnProcessor, RegionalState, box_mask, layer_weights,
                                  parse_region, region_masks)


def test_parse_region_and_masks():
    r = parse_region("0,0,32,64:a photo of <chelsea>")
    assert r.box == (0, 0, 32, 64) and r.prompt == "a photo of <chelsea>"
    for bad in ("0,0,32:x", "0,0,32,64", "10,0,5,8:x", "a,b,c,d:x"):
        with pytest.raises(InputError):
            parse_region(bad)
    m = box_mask((0, 0, 32, 64), 64, 64)
    assert m[:, :32].eq(1).all() and m[:, 32:].eq(0).all()
    soft = box_mask((16, 16, 48, 48), 64, 64, feather=8)
    assert 0 < soft[32, 14] < 1 and soft[32, 32] == 1 and soft[0, 0] == 0


def test_overlapping_regions_are_renormalised():
    masks = region_masks([Region("a", box=(0, 0, 48, 64)), Region("b", box=(16, 0, 64, 64))], 64, 64)
    w = layer_weights(masks, (8, 8))
    assert torch.allclose(w.sum(0).clamp(max=1), w.sum(0))  # never more than 1
    assert torch.allclose(w[:, 3], torch.tensor([0.5, 0.5]))  # overlap column shared equally


@pytest.fixture(scope="module")
def attn2(host):
    return host.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2


def _run(attn, hidden, ctx, state=None):
    processor = RegionalAttnProcessor(state) if state is not None else AttnProcessor2_0()
    with torch.no_grad():
        return processor(attn, hidden, ctx)


def test_region_isolation_is_exact(host, attn2):
    g = torch.Generator().manual_seed(0)
    d = host.text_encoder.config.hidden_size
    hidden = torch.randn(1, 64, attn2.to_q.in_features, generator=g)  # an 8×8 latent grid
    glob, c1, c2, c2b = (torch.randn(1, 77, d, generator=g) for _ in range(4))
    # region 1: left quarter; region 2: right quarter; the middle belongs to no region
    regions = [Region("r1", box=(0, 0, 16, 64)), Region("r2", box=(48, 0, 64, 64))]
    masks = region_masks(regions, 64, 64)

    def state(second):
        return RegionalState(masks=masks, contexts=torch.cat([c1, second]), latent_hw=(8, 8))

    out_a = _run(attn2, hidden, glob, state(c2)).reshape(8, 8, -1)
    out_b = _run(attn2, hidden, glob, state(c2b)).reshape(8, 8, -1)
    plain = _run(attn2, hidden, glob).reshape(8, 8, -1)
    assert torch.equal(out_a[:, :2], out_b[:, :2])  # region 1 untouched, bit for bit
    assert not torch.allclose(out_a[:, 6:], out_b[:, 6:])  # region 2 follows its prompt
    assert torch.equal(out_a[:, 2:6], plain[:, 2:6])  # outside all regions: the global prompt rules
    assert not torch.allclose(out_a[:, :2], plain[:, :2])


def test_unconditional_rows_stay_global(host, attn2):
    g = torch.Generator().manual_seed(1)
    d = host.text_encoder.config.hidden_size
    hidden = torch.randn(2, 64, attn2.to_q.in_features, generator=g)
    ctx = torch.randn(2, 77, d, generator=g)
    st = RegionalState(masks=region_masks([Region("r", box=(0, 0, 64, 64))], 64, 64),
                       contexts=torch.randn(1, 77, d, generator=g), rows=torch.tensor([False, True]), latent_hw=(8, 8))
    out = _run(attn2, hidden, ctx, st)
    plain = _run(attn2, hidden, ctx)
    assert torch.equal(out[0], plain[0]) and not torch.allclose(out[1], plain[1])


def test_keypose_drawing():
    data = {"canvas_width": 100, "canvas_height": 100,
            "people": [{"pose_keypoints_2d": [50, 20, 1, 50, 40, 1, 30, 40, 1] + [0, 0, 0] * 15}]}
    img = draw_keypose(data, 100, 100)
    assert img.shape == (100, 100, 3)
    assert tuple(img[20, 50]) == COLORS[0] and tuple(img[40, 30]) == COLORS[2]
    assert img[90, 90].sum() == 0  # background stays black
    assert img[30, 50].sum() > 0  # the neck limb between joints 1 and 2
    fractions = {"people": [{"pose_keypoints_2d": [0.5, 0.2, 1, 0.5, 0.4, 1]}]}
    assert tuple(draw_keypose(fractions, 100, 100)[20, 50]) == COLORS[0]


def _adapter(in_channels):
    torch.manual_seed(in_channels)
    return T2IAdapter(in_channels=in_channels, channels=[32, 64, 64, 64], num_res_blocks=2, downscale_factor=8,
                      adapter_type="full_adapter").eval()


def _eps(host, controls):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 77, host.text_encoder.config.hidden_size, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        return host.predict_noise(x, t, cond, **unet_control_kwargs(controls, x, t, cond))


def test_output_depends_on_sketch_and_keypose(host):
    sketch, keypose = _adapter(1), _adapter(3)
    blank = np.zeros((64, 64, 3), np.uint8)
    lines = blank.copy()
    lines[20:24, :] = 255
    pose_a = draw_keypose({"people": [{"pose_keypoints_2d": [0.5, 0.2, 1, 0.5, 0.5, 1, 0.3, 0.5, 1]}]}, 64, 64)
    pose_b = draw_keypose({"people": [{"pose_keypoints_2d": [0.2, 0.2, 1, 0.2, 0.6, 1, 0.7, 0.6, 1]}]}, 64, 64)
    base = _eps(host, [Control(sketch, control_image(blank, sketch)), Control(keypose, control_image(pose_a, keypose))])
    other_sketch = _eps(host, [Control(sketch, control_image(lines, sketch)), Control(keypose, control_image(pose_a, keypose))])
    other_pose = _eps(host, [Control(sketch, control_image(blank, sketch)), Control(keypose, control_image(pose_b, keypose))])
    assert control_image(blank, sketch).shape[1] == 1 and control_image(pose_a, keypose).shape[1] == 3
    assert (base - other_sketch).abs().max() > 1e-4
    assert (base - other_pose).abs().max() > 1e-4


def test_controlnet_keypose_changes_the_prediction(host):
    torch.manual_seed(0)
    net = ControlNetModel.from_unet(host.unet).eval()
    with torch.no_grad():  # ControlNet starts with zero convolutions; give them random weights
        for m in list(net.controlnet_down_blocks) + [net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            m.weight.normal_(0, 0.02)
    pose_a = draw_keypose({"people": [{"pose_keypoints_2d": [0.5, 0.2, 1, 0.5, 0.5, 1]}]}, 64, 64)
    pose_b = draw_keypose({"people": [{"pose_keypoints_2d": [0.2, 0.7, 1, 0.8, 0.7, 1]}]}, 64, 64)
    a = _eps(host, [Control(net, control_image(pose_a, net))])
    b = _eps(host, [Control(net, control_image(pose_b, net))])
    assert (a - b).abs().max() > 1e-5


def test_cli_generate_with_regions_sketch_and_keypose(tmp_path, stream_bank, host):
    from test_cli import cli

    bank = tmp_path / "bank.safetensors"
    stream_bank.save(bank)
    _adapter(1).save_pretrained(tmp_path / "sketch_adapter")
    _adapter(3).save_pretrained(tmp_path / "keypose_adapter")
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(tmp_path / "sketch.png")
    (tmp_path / "pose.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": [0.5, 0.2, 1, 0.5, 0.5, 1]}]}))
    t0, t1 = stream_bank.concepts[0].token, stream_bank.concepts[1].token
    out = tmp_path / "regional.png"
    cli("generate", "--bank", bank, "--base", "tiny", "--prompt", "two things on a table", "--steps", "2",
        "--region", f"0,0,32,64:a photo of {t0}", "--region", f"32,0,64,64:a photo of {t1}",
        "--sketch", tmp_path / "sketch.png", "--keypose", tmp_path / "pose.json",
        "--adapter", tmp_path / "sketch_adapter", "--adapter", tmp_path / "keypose_adapter", "--out", out)
    assert out.read_bytes()[:4] == b"\x89PNG"
    bad = cli("generate", "--bank", bank, "--base", "tiny", "--prompt", "x", "--region", "0,0,64:x", "--out", out,
              check=False)
    assert bad.returncode == 2 and "x0,y0,x1,y1:prompt" in bad.stderr
