"""The A1111 host and the diffusers host see the same training loss on the same checkpoint.

Runs before the server tests (files run in name order) and loads A1111 in a process of its own
that exits before the next model is loaded: never two full-size models at once.
"""
from __future__ import annotations

import gc
import subprocess
from pathlib import Path

import torch

from .conftest import FLAGS

RES = 64


def test_a1111_and_diffusers_hosts_give_the_same_training_loss(a1111_path, a1111_python, a1111_env, checkpoint,
                                                                tmp_path):
    import skimage.data
    from safetensors.torch import load_file, save_file

    from seqlora_core.app.images import load_images
    from seqlora_core.hosts.diffusers_host import DiffusersHost
    from seqlora_core.method.trainer import denoising_loss, noisy_batch

    from PIL import Image

    photo = tmp_path / "chelsea.png"
    Image.fromarray(skimage.data.chelsea()).save(photo)
    gen = torch.Generator().manual_seed(0)
    inputs = {"pixels": load_images([str(photo)], RES).contiguous(),
              "noise": torch.randn(1, 4, RES // 8, RES // 8, generator=gen),
              "t": torch.tensor([500]),
              "embedding": 0.02 * torch.randn(1, 768, generator=gen)}
    save_file(inputs, tmp_path / "inputs.safetensors")
    probe = Path(__file__).with_name("loss_probe.py")
    run = subprocess.run([a1111_python, str(probe), str(tmp_path / "inputs.safetensors"),
                          str(tmp_path / "a1111.safetensors"), *FLAGS, "--ckpt", str(checkpoint)],
                         cwd=a1111_path, env=a1111_env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    theirs = load_file(tmp_path / "a1111.safetensors")
    frozen, restored, hooks_left = theirs["checks"].tolist()
    assert frozen == 1.0 and restored == 1.0, "training() must freeze A1111's model and restore its flags"
    assert hooks_left == 0.0, "encoding must leave no hooks on A1111's text encoder"
    assert torch.equal(theirs["latents"], theirs["latents_again"]), "the encoding must not sample"

    host = DiffusersHost.load(str(checkpoint), "cpu")
    latents = host.encode_images(inputs["pixels"])
    emb = inputs["embedding"].clone().requires_grad_(True)
    noisy = noisy_batch(latents, host.alphas_cumprod(), torch.tensor([0]), inputs["noise"], inputs["t"])
    loss = denoising_loss(host, noisy, inputs["noise"], inputs["t"], ["a photo of <probe>"], {"<probe>": emb})
    grad, = torch.autograd.grad(loss, emb)
    del host
    gc.collect()
    assert torch.allclose(latents, theirs["latents"], rtol=1e-3, atol=1e-4), (latents - theirs["latents"]).abs().max()
    assert abs(loss.item() - theirs["loss"].item()) <= 1e-4 * max(1.0, loss.item()), (loss.item(), theirs["loss"].item())
    assert torch.allclose(grad, theirs["grad"], rtol=1e-2, atol=1e-6 + 1e-2 * grad.abs().max().item())
