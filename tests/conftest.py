"""Shared fixtures: the tiny SD-1.5-architecture host, photos from scikit-image, a small bank."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("SEQLORA_CACHE", str(Path(__file__).resolve().parent.parent / ".cache"))

from seqlora_core.app.demo import write_photos  # noqa: E402
from seqlora_core.hosts.diffusers_host import DiffusersHost  # noqa: E402
from seqlora_core.app.images import load_images  # noqa: E402
from seqlora_core.method.trainer import TrainSettings, train_concept  # noqa: E402

RES = 64


def quick_settings(method: str = "seqlora", **kw) -> TrainSettings:
    base = dict(method=method, steps=2, bilevel_iters=2, inner_steps=2, resolution=RES,
                lr_a=3e-3, lr_b=3e-3, lr_embedding=1e-2)
    base.update(kw)
    return TrainSettings(**base)


@pytest.fixture
def float64_by_default():
    """Exactness checks run in float64; restored afterwards so other tests keep float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def host() -> DiffusersHost:
    torch.manual_seed(0)
    return DiffusersHost.load("tiny", "cpu")


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict[str, Path]:
    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def pixels(photos) -> dict[str, torch.Tensor]:
    return {token: load_images([folder], RES) for token, folder in photos.items()}


@pytest.fixture(scope="session")
def stream_bank(host, pixels):
    """Three concepts trained one after another, with three different constrained methods."""
    bank = None
    for (token, px), method in zip(list(pixels.items())[:3], ("seqlora", "alternating", "frozen-basis")):
        bank = train_concept(host, bank, px, token, "thing", quick_settings(method)).bank
    return bank
