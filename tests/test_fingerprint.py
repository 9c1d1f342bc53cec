"""The base check recognises one checkpoint loaded at any precision and refuses another base."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from seqlora_core.bank.fingerprint import base_fingerprint, same_base
from seqlora_core.bank.format import Bank
from seqlora_core.errors import BankError


def _layers(host, transform):
    return {name: SimpleNamespace(weight=transform(layer.weight.detach()))
            for name, layer in host.linear_layers().items()}


def _record(fingerprint) -> dict:
    return {"architecture": "sd15-tiny", **fingerprint.base_fields()}


def test_one_checkpoint_at_every_precision_is_one_base(host):
    fp32 = base_fingerprint(_layers(host, lambda w: w.float()))
    fp16 = base_fingerprint(_layers(host, lambda w: w.half()))
    bf16 = base_fingerprint(_layers(host, lambda w: w.bfloat16()))
    assert fp32 == fp16  # the digest itself is rounded to fp16
    assert fp32 != bf16  # bf16 rounds more coarsely: the digest alone would refuse it
    for made, loaded in [(fp32, bf16), (bf16, fp32), (bf16, fp16)]:
        assert same_base(_record(made), loaded)
        Bank(_record(made)).check_base("sd15-tiny", loaded)  # no refusal


@pytest.mark.parametrize("relative_change", [0.01, 0.05])
def test_another_base_is_refused_even_with_a_sketch(host, relative_change):
    gen = torch.Generator().manual_seed(1)
    ours = base_fingerprint(_layers(host, lambda w: w.float()))
    tuned = base_fingerprint(_layers(host, lambda w: w.float() * (1 + relative_change * torch.randn(
        w.shape, generator=gen))))
    assert not same_base(_record(ours), tuned)
    with pytest.raises(BankError, match="another base model"):
        Bank(_record(ours)).check_base("sd15-tiny", tuned)


def test_banks_without_a_sketch_match_by_digest_only(host):
    fp32 = base_fingerprint(_layers(host, lambda w: w.float()))
    bf16 = base_fingerprint(_layers(host, lambda w: w.bfloat16()))
    old = {"architecture": "sd15-tiny", "fingerprint": str(fp32)}  # written before the sketch
    assert same_base(old, fp32) and not same_base(old, bf16)
    assert same_base({"architecture": "sd15-tiny"}, bf16)  # no fingerprint at all: any base
    assert not same_base({**_record(fp32), "sketch": "garbage"}, bf16)
