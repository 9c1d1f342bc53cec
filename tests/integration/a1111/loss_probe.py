"""Run inside A1111's Python, in its checkout: load the checkpoint the way A1111 does, build the
SeqLoRA A1111 host on it and write what the training loss sees for fixed inputs.

    cd A1111_PATH && A1111_PYTHON loss_probe.py INPUTS.safetensors OUT.safetensors [A1111 flags…]

INPUTS holds pixels (1, 3, R, R), noise (1, 4, R/8, R/8), t (1,) and embedding (1, 768); OUT gets
the latents (twice: the encoding must be deterministic), the loss, the embedding's gradient and
checks of what ``training()`` and ``encode_text`` leave behind.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def main(inputs_path: str, out_path: str, flags: list[str]) -> None:
    sys.argv = ["webui.py", *flags]
    sys.path.insert(0, os.getcwd())
    from modules import initialize

    initialize.imports()
    initialize.initialize()
    import torch
    from modules import shared
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, ROOT)
    from a1111.host import A1111Host
    from seqlora_core.method.trainer import denoising_loss, noisy_batch

    model = shared.sd_model
    inputs = load_file(inputs_path)
    host = A1111Host(model)
    flags_before = [p.requires_grad for p in model.parameters()]
    embed = host.text_encoder.get_input_embeddings()
    with host.training():
        frozen = not any(p.requires_grad for p in model.parameters())
        latents = host.encode_images(inputs["pixels"])
        again = host.encode_images(inputs["pixels"])
        emb = inputs["embedding"].clone().requires_grad_(True)
        noisy = noisy_batch(latents, host.alphas_cumprod(), torch.tensor([0]), inputs["noise"], inputs["t"])
        loss = denoising_loss(host, noisy, inputs["noise"], inputs["t"], ["a photo of <probe>"], {"<probe>": emb})
        grad, = torch.autograd.grad(loss, emb)
    restored = [p.requires_grad for p in model.parameters()] == flags_before
    hooks_left = len(embed._forward_pre_hooks) + len(embed._forward_hooks)
    save_file({"latents": latents.contiguous(), "latents_again": again.contiguous(), "loss": loss.detach().reshape(1),
               "grad": grad.contiguous(),
               "checks": torch.tensor([float(frozen), float(restored), float(hooks_left)])}, out_path)
    print(f"probe: loss {loss.item():.6f}")
    os._exit(0)  # A1111's background threads would keep the process alive


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
