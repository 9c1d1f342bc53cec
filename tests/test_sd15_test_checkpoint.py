"""The random-weight SD-1.5 test checkpoint must not make A1111 produce NaNs.

A1111's "Original" emphasis divides the prompt's hidden states by their own mean after weighting
(``z * (mean / new_mean)``, modules/sd_emphasis.py). With the final LayerNorm's random-init bias
of 0 that mean is 0 for many prompts (0/0 = NaN: "A tensor with NaNs was produced in Unet" in
the real-A1111 tests). ``give_text_norm_a_bias`` (make_sd15_checkpoint.py) fixes the checkpoint;
this runs A1111's arithmetic on the fixed text encoder.
"""
from __future__ import annotations

import torch

from seqlora_core.hosts.base_models import random_components
from tests.integration.make_sd15_checkpoint import TEXT_NORM_BIAS, give_text_norm_a_bias

PROMPTS = ["", "a photo of <chelsea>", "a photo of chelsea", "a photo of coffee", "a photo of cat"] + \
    [f"photo {i}" for i in range(15)]


def _a1111_original_emphasis(z: torch.Tensor) -> torch.Tensor:
    """modules/sd_emphasis.py EmphasisOriginal.after_transformers with every multiplier 1."""
    original_mean = z.mean()
    z = z * torch.ones(z.shape[:2]).unsqueeze(-1)
    return z * (original_mean / z.mean())


def test_fixed_text_encoder_gives_finite_a1111_conditioning():
    parts = random_components("sd15-random")
    te, tok = parts.text_encoder.eval(), parts.tokenizer
    prefix = "cond_stage_model.transformer.text_model."
    key = TEXT_NORM_BIAS.removeprefix(prefix)
    state = {k: v for k, v in te.state_dict().items() if k.endswith(key)}
    name = next(iter(state))
    assert torch.equal(state[name], torch.zeros_like(state[name])), "random init: the bias the fix replaces"
    fixed = give_text_norm_a_bias({TEXT_NORM_BIAS: state[name].clone()})[TEXT_NORM_BIAS]
    assert torch.equal(fixed, give_text_norm_a_bias({TEXT_NORM_BIAS: state[name].clone()})[TEXT_NORM_BIAS])
    assert 0.05 < fixed.mean().item() < 0.15
    te.load_state_dict({name: fixed}, strict=False)
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            z = te(ids).last_hidden_state
            assert abs(z.mean().item()) > 0.05, prompt
            assert torch.isfinite(_a1111_original_emphasis(z)).all(), prompt
