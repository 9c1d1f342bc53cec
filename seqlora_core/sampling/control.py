"""Sketch and keypose control for the standalone path: local T2I-Adapter / ControlNet models.

A control model is a local diffusers folder (``config.json`` + weights); its class is read from
the config, so ``--adapter PATH`` takes either kind. Every control conditions the whole image at
weight 1.0 (as in Mix-of-Show's regionally controllable sampling); T2I-Adapter states are summed
(what diffusers' MultiAdapter does) and so are ControlNet residuals.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError


@dataclass
class Control:
    model: torch.nn.Module  # diffusers T2IAdapter or ControlNetModel
    image: Tensor  # (1, C, H, W) in [0, 1], C = the model's input channels
    weight: float = 1.0

    @property
    def is_adapter(self) -> bool:
        return type(self.model).__name__ == "T2IAdapter"


def load_control_model(path: str | Path, device, dtype) -> torch.nn.Module:
    from diffusers import ControlNetModel, T2IAdapter

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise InputError(f"Control model {path} is not a diffusers folder (no config.json).")
    kind = json.loads(cfg_file.read_text()).get("_class_name")
    cls = {"T2IAdapter": T2IAdapter, "ControlNetModel": ControlNetModel}.get(kind)
    if cls is None:
        raise InputError(f"Control model {path} is a {kind}, not a T2IAdapter or ControlNetModel.")
    return cls.from_pretrained(path, local_files_only=True).to(device, dtype).eval().requires_grad_(False)


def control_image(rgb: np.ndarray, model: torch.nn.Module) -> Tensor:
    """(H, W, 3) uint8 → (1, C, H, W) in [0, 1] with C the model's input channels (1 = grey)."""
    cfg = model.config
    channels = cfg.get("in_channels") if type(model).__name__ == "T2IAdapter" else cfg.get("conditioning_channels", 3)
    x = torch.from_numpy(np.array(rgb, dtype=np.float32, copy=True)).permute(2, 0, 1)[None] / 255.0
    if channels == 1:
        x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return x


def unet_control_kwargs(controls: list[Control], sample: Tensor, t: Tensor, cond: Tensor) -> dict:
    """Extra keyword arguments for one diffusers UNet call with all controls applied."""
    if not controls:
        return {}
    b = sample.shape[0]
    kwargs: dict = {}
    adapter_state = None
    down, mid = None, None
    for c in controls:
        image = c.image.to(sample.device, sample.dtype).expand(b, -1, -1, -1)
        if c.is_adapter:
            state = [s * c.weight for s in c.model(image)]
            adapter_state = state if adapter_state is None else [a + s for a, s in zip(adapter_state, state)]
        else:
            d, m = c.model(sample, t, encoder_hidden_states=cond, controlnet_cond=image, return_dict=False)
            d = [x * c.weight for x in d]
            m = m * c.weight
            down = d if down is None else [a + x for a, x in zip(down, d)]
            mid = m if mid is None else mid + m
    if adapter_state is not None:
        kwargs["down_intrablock_additional_residuals"] = adapter_state
    if down is not None:
        kwargs["down_block_additional_residuals"] = down
        kwargs["mid_block_additional_residual"] = mid
    return kwargs
