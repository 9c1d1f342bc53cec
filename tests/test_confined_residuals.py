"""Region-confined residuals (issue 20): each context sees only its own concepts, exactly."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from seqlora_core.bank.format import Concept
from seqlora_core.errors import InputError
from seqlora_core.method.targets import select_layers
from seqlora_core.method.trainer import new_bank
from seqlora_core.sampling.confined import check_mode, context_concepts, named_concepts
from seqlora_core.sampling.generate import generate
from seqlora_core.sampling.regions import Region

RES = 64
LEFT, RIGHT = (0, 0, RES // 2, RES), (RES // 2, 0, RES, RES)


def _concept(host, bank, ident: str, targets: str, seed: int, scale: float = 0.5) -> Concept:
    gen = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    for name, layer in select_layers(host.linear_layers(), targets).items():
        b[name] = bank.projector(name, layer.in_features).random_orthonormal(4, gen)
        a[name] = scale * torch.randn(layer.out_features, 4, generator=gen)
    d = host.init_embedding("cat").shape[1]
    return Concept(ident, f"<{ident}>", "cat", 4, "seqlora", a, b, torch.randn(1, d, generator=gen))


def _bank(host, targets: str):
    bank = new_bank(host)
    for ident, seed in (("left", 1), ("right", 2)):
        bank = bank.with_concept(_concept(host, bank, ident, targets, seed))
    return bank


def _with_right_changed(bank):
    right = bank.get("right")
    changed = replace(right, A={n: 3 * a for n, a in right.A.items()}, hash="")
    return replace(bank, concepts=[bank.get("left"), changed])


def _capture(host, bank, module_name: str, residuals: str):
    """The output of one module, residuals included, during a one-step generation with a region
    per concept (a hook registered after the residual hooks: those run in registration order)."""
    module = dict(host.unet.named_modules())[module_name]
    seen = []
    original = module.register_forward_hook

    def hooks_then_capture(hook, *args, **kwargs):  # every hook generate() adds, then ours again at the end
        handle = original(hook, *args, **kwargs)
        capture[0].remove()
        capture[0] = original(lambda m, i, o: seen.append(o.detach().clone()))
        return handle

    capture = [original(lambda m, i, o: seen.append(o.detach().clone()))]
    module.register_forward_hook = hooks_then_capture
    try:
        generate(host, bank, "two things on a table", steps=1, resolution=RES, seed=0, residuals=residuals,
                 regions=[Region("a photo of <left>", box=LEFT), Region("a photo of <right>", box=RIGHT)])
    finally:
        capture[0].remove()
        del module.register_forward_hook
    return seen[0]  # (2, N, c): the unconditional row, then the conditional one


def _left_positions(tokens: int) -> torch.Tensor:
    side = int(tokens ** 0.5)
    return (torch.arange(tokens) % side) < side // 2


def _first(host, suffix: str) -> str:
    return next(n for n, _ in host.unet.named_modules() if n.endswith(suffix))


@pytest.mark.parametrize("targets, suffix", [("default", "attn2"), ("full", "attn1.to_q")])
def test_changing_one_concept_leaves_every_other_region_bit_for_bit_unchanged(host, targets, suffix):
    bank = _bank(host, targets)
    name = _first(host, suffix)
    before = _capture(host, bank, name, "confined")
    after = _capture(host, _with_right_changed(bank), name, "confined")
    left = _left_positions(before.shape[1])
    assert torch.equal(before[1][left], after[1][left])  # the left region: untouched by <right>
    assert torch.equal(before[0][left], after[0][left])  # the unconditional row too: it is regional
    assert not torch.allclose(before[1][~left], after[1][~left])  # the right region follows its concept
    # without confinement the same change reaches the left region
    g_before = _capture(host, bank, name, "global")
    g_after = _capture(host, _with_right_changed(bank), name, "global")
    assert not torch.allclose(g_before[1][left], g_after[1][left])


def test_a_region_naming_no_concept_draws_the_base(host):
    bank = _bank(host, "default")
    base = generate(host, new_bank(host), "a red circle", steps=2, resolution=RES, seed=0,
                    regions=[Region("a red circle", box=LEFT)])
    confined = generate(host, bank, "a red circle", steps=2, resolution=RES, seed=0, residuals="confined",
                        regions=[Region("a red circle", box=LEFT)])
    assert np.array_equal(np.asarray(base), np.asarray(confined))


def test_which_concepts_each_context_names(host):
    bank = _bank(host, "default")
    assert named_concepts(bank, "A photo of <LEFT> and a mug", None) == ["left"]
    sets = context_concepts(bank, "a scene", [Region("<left> and <right>", box=LEFT),
                                              Region("anything", box=RIGHT, concepts=["right"])], None)
    assert sets == {"global": [], 0: ["left", "right"], 1: ["right"]}
    assert context_concepts(bank, "<right>", [], ["left"]) == {"global": []}  # only the chosen ones
    with pytest.raises(InputError):
        check_mode("local")


def test_automatic_regions_separate_two_maps_and_refuse_what_cannot_be_told_apart():
    from seqlora_core.sampling.auto_regions import masks_from_maps

    xs = torch.linspace(0, 1, 8).expand(8, 8)
    masks = masks_from_maps({"a": 1 - xs, "b": xs})
    assert masks["a"][:, :3].all() and not masks["a"][:, 5:].any()
    assert masks["b"][:, 5:].all() and not (masks["a"] * masks["b"]).any()
    with pytest.raises(InputError, match="same place"):
        masks_from_maps({"a": xs, "b": xs * 2})
    spot = torch.zeros(8, 8)
    spot[0, 7] = 1  # b wins one position of 64: under the 2 % a region needs
    with pytest.raises(InputError, match="no place of its own"):
        masks_from_maps({"a": 1 - xs, "b": spot})


def test_drawn_regions_are_cut_out_of_found_ones_at_the_scale_they_were_drawn():
    """A box drawn in pixels over the left third takes that third from the found regions, and only
    it (the found masks live on the latent grid, 8 × smaller)."""
    from seqlora_core.sampling.auto_regions import found_regions

    xs = torch.linspace(0, 1, 8).expand(8, 8)
    drawn = [Region("a red square", box=(0, 0, 24, 64))]  # pixels: latent columns 0-2 of 8
    regions = found_regions({"a": 1 - xs, "b": xs}, "a photo of <a> and <b>", {"a": "<a>", "b": "<b>"}, drawn, (64, 64))
    assert [r.concepts for r in regions] == [["a"], ["b"]]
    assert all(r.prompt == "a photo of <a> and <b>" for r in regions)
    a, b = (r.mask for r in regions)
    assert not a[:, :3].any() and a[:, 3].all()  # the drawn columns cut out, the found ones kept
    assert b[:, 5:].all() and not (a * b).any()  # the other concept's region untouched


def test_automatic_regions_find_the_tokens_and_need_named_concepts(host):
    from seqlora_core.sampling.auto_regions import token_positions

    bank = _bank(host, "default")
    emb = bank.embeddings(None)
    pos = token_positions(host, "a photo of <left> and <right>", {"left": "<left>", "right": "<right>"}, emb)
    assert pos == {"left": [4], "right": [6]}  # after the start token: a photo of <left> and <right>
    with pytest.raises(InputError, match="names concepts"):
        generate(host, bank, "a photo of a cat", steps=2, resolution=RES, auto_regions=True)
    calls = []
    handle = host.unet.register_forward_hook(lambda *a: calls.append(1))
    try:  # tokens past the 77-token window: refused before any denoising step is spent
        with pytest.raises(InputError, match="first 75 tokens"):
            generate(host, bank, "a " * 90 + "photo of <left> and <right>", steps=2, resolution=RES, auto_regions=True)
    finally:
        handle.remove()
    assert not calls


def test_automatic_regions_run_end_to_end_or_refuse_in_one_sentence(host, tmp_path):
    from seqlora_core.app.cli import main

    bank = _bank(host, "default")
    bank.save(tmp_path / "b.safetensors")
    code = main(["generate", "--bank", str(tmp_path / "b.safetensors"), "--base", "tiny", "--device", "cpu",
                 "--prompt", "a photo of <left> and <right>", "--auto-regions", "--steps", "4",
                 "--out", str(tmp_path / "auto.png")])
    # random weights: the maps may not separate, which must be one clear refusal, never a traceback
    assert code == 0 and (tmp_path / "auto.png").exists() or code == 2


def test_the_tabs_compose_page_takes_regions_in_the_standalone_app_and_refuses_them_where_it_cannot(host, tmp_path):
    """The tab's Compose page: boxes (one per line), the residuals mode and automatic regions go to
    ``generate`` in the standalone app and draw the same picture as the command line's path; a
    malformed line is one sentence; a host whose preview has no regions (A1111's txt2img) refuses
    them and is called exactly as before when none are given."""
    from seqlora_ui.standalone import diffusers_sample
    from seqlora_ui.tab import TabActions, TabSession

    bank = _bank(host, "default")
    path = tmp_path / "b.safetensors"
    bank.save(path)
    calls, sample = [], diffusers_sample(lambda: host)

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return sample(*args, **kwargs)

    def actions(regional: bool) -> TabActions:
        return TabActions(TabSession(host_factory=lambda: host, bank_path=path, resolution=RES, sample=recording,
                                     regional=regional))

    boxes = f"0,0,{RES // 2},{RES}:a photo of <left>\n{RES // 2},0,{RES},{RES}:a photo of <right>"
    status, image = actions(True).compose(["left", "right"], "", "a photo", RES, 2, boxes, "confined", False)
    assert status == "" and image.shape == (RES, RES, 3)
    assert [r.box for r in calls[-1]["regions"]] == [LEFT, RIGHT] and calls[-1]["residuals"] == "confined"
    direct = generate(host, bank, "a photo", ["left", "right"], {}, steps=2, resolution=RES,
                      regions=[Region("a photo of <left>", box=LEFT), Region("a photo of <right>", box=RIGHT)],
                      residuals="confined")
    assert np.array_equal(np.asarray(direct), image)
    status, image = actions(True).compose(["left"], "", "a photo", RES, 2, "0,0,32:a cat", "confined", False)
    assert "x0,y0,x1,y1:prompt" in status and image is None
    status, image = actions(True).compose(["left"], "", "a photo of <left>", RES, 2, "", "confined", False)
    assert status == "" and calls[-1] == {}  # no regions: the host's sampler is called as before
    status, image = actions(False).compose(["left", "right"], "", "a photo", RES, 2, boxes, "confined", False)
    assert "no regional composition" in status and image is None
    status, image = actions(False).compose(["left", "right"], "", "a photo of <left> and <right>", RES, 2, "",
                                           "confined", True)
    assert "no regional composition" in status and image is None
