"""ComfyHost enters Comfy's model loader a fixed number of times per training, whatever the
number of minibatches (issue 19 item 3). Every ``load_models_gpu`` runs ``free_memory``, which on
cards of 16 GB or less empties torch's cache or unloads part of a model; through
``CLIP.encode_from_tokens`` and ``VAE.encode`` that used to happen on every pass.

No ComfyUI here: small fakes copy the few lines of Comfy's behaviour that matter, each citing the
upstream function it mirrors (Comfy-Org/ComfyUI, a125cd84); the networks are the tiny SD-1.5
test model's (diffusers UNet, transformers CLIP, AutoencoderKL)."""
from __future__ import annotations

import copy
import enum
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from seqlora_core.method.trainer import train_concept

from conftest import quick_settings


class VRAMState(enum.Enum):  # comfy/model_management.py VRAMState (the members the host reads)
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3


def fake_comfy(monkeypatch, loads: list, host_box: dict) -> types.ModuleType:
    """comfy.model_management with a counting ``load_models_gpu``; ``load_model_gpu`` calls it, as
    upstream does (model_management.py: ``return load_models_gpu([model])``)."""
    mm = types.ModuleType("comfy.model_management")

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        host = host_box.get("host")
        loads.append(SimpleNamespace(models=list(models), memory_required=memory_required,
                                     during_passes=getattr(host, "_passes", None) is not None))

    mm.load_models_gpu = load_models_gpu
    mm.load_model_gpu = lambda model: load_models_gpu([model])
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.VRAMState, mm.vram_state = VRAMState, VRAMState.NORMAL_VRAM
    mm.throw_exception_if_processing_interrupted = lambda: None
    attention = types.ModuleType("comfy.ldm.modules.attention")  # the names comfy_math_attention swaps
    attention.attention_basic = attention.optimized_attention = attention.optimized_attention_masked = None
    clip_model = types.ModuleType("comfy.clip_model")
    clip_model.optimized_attention_for_device = None
    comfy, ldm, modules = (types.ModuleType(n) for n in ("comfy", "comfy.ldm", "comfy.ldm.modules"))
    comfy.model_management, comfy.clip_model, comfy.ldm, ldm.modules, modules.attention = (
        mm, clip_model, ldm, modules, attention)
    for name, module in {"comfy": comfy, "comfy.model_management": mm, "comfy.clip_model": clip_model,
                         "comfy.ldm": ldm, "comfy.ldm.modules": modules,
                         "comfy.ldm.modules.attention": attention}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return mm


class FakeSDTokenizer:
    """comfy/sd1_clip.py SDTokenizer: ``tokenizer`` (the transformers one) and
    ``tokenize_with_weights``, where ``embedding:name`` words become the embedding's vectors
    (looked up by ``_try_get_embedding`` when an ``embedding_directory`` is set); one 77-token
    section, start and end tokens around the pieces, all weights 1."""

    embedding_directory = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _try_get_embedding(self, name):
        return None, ""

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        pieces = [self.tokenizer.bos_token_id]
        for word in text.split():
            if word.startswith("embedding:") and self.embedding_directory is not None:
                emb, _ = self._try_get_embedding(word[len("embedding:"):])
                pieces += list(emb) if emb is not None else []
            else:
                pieces += self.tokenizer(word, add_special_tokens=False).input_ids
        pieces = (pieces + [self.tokenizer.eos_token_id] * 77)[:77]
        return [[(p, 1.0) for p in pieces]]


class FakeSD1Tokenizer:
    def __init__(self, tokenizer):
        self.clip_l = FakeSDTokenizer(tokenizer)

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {"l": self.clip_l.tokenize_with_weights(text)}


class FakeClipL(nn.Module):
    """comfy/sd1_clip.py SDClipModel + ClipTokenWeightEncoder.encode_token_weights, weights 1:
    token ids through the transformer, a vector given in place of an id used as that position's
    input embedding (SDClipModel.process_tokens); output on ``intermediate_device()``."""

    def __init__(self, transformer, mm):
        super().__init__()
        self.transformer, self.mm = transformer, mm

    def encode_token_weights(self, token_weight_pairs):
        section = token_weight_pairs[0]
        ids = torch.tensor([[t if isinstance(t, int) else 0 for t, _ in section]])
        vectors = {i: t for i, (t, _) in enumerate(section) if isinstance(t, torch.Tensor)}

        def put(module, inputs, out):
            for i, v in vectors.items():
                out = torch.cat([out[:, :i], v.to(out.dtype).view(1, 1, -1), out[:, i + 1:]], dim=1)
            return out
        handle = self.transformer.get_input_embeddings().register_forward_hook(put)
        try:
            out = self.transformer(ids)[0]
        finally:
            handle.remove()
        return out.to(self.mm.intermediate_device()), None


class FakeSD1ClipModel(nn.Module):
    """comfy/sd1_clip.py SD1ClipModel: ``clip_l`` and the clip options ``encode_from_tokens`` sets."""

    def __init__(self, transformer, mm):
        super().__init__()
        self.clip_l = FakeClipL(transformer, mm)

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass

    def encode_token_weights(self, token_weight_pairs):
        return self.clip_l.encode_token_weights(token_weight_pairs["l"])


class FakeCLIP:
    """comfy/sd.py CLIP: ``encode_from_tokens`` loads its patcher on every call (``self.load_model()``
    → ``model_management.load_model_gpu``) before ``cond_stage_model.encode_token_weights``."""

    layer_idx = None

    def __init__(self, tiny, mm):
        self.mm = mm
        self.tokenizer = FakeSD1Tokenizer(copy.deepcopy(tiny.tokenizer))
        self.cond_stage_model = FakeSD1ClipModel(tiny.text_encoder, mm)
        self.patcher = SimpleNamespace(name="clip")

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.cond_stage_model.reset_clip_options()
        self.mm.load_model_gpu(self.patcher)
        return self.cond_stage_model.encode_token_weights(tokens)[0]


class FakeVAE:
    """comfy/sd.py VAE.encode: (b, H, W, 3) in [0, 1]; one ``load_models_gpu([self.patcher],
    memory_required=...)`` per call, then batches through ``first_stage_model.encode`` of
    ``process_input`` (x·2 − 1); unscaled latents (the model's ``process_latent_in`` scales)."""

    def __init__(self, tiny, mm):
        self.tiny, self.mm = tiny, mm
        self.patcher = SimpleNamespace(name="vae")

    def encode(self, pixel_samples):
        pixel_samples = pixel_samples.movedim(-1, 1)
        self.mm.load_models_gpu([self.patcher], memory_required=1767 * pixel_samples.shape[2] * pixel_samples.shape[3])
        return self.tiny.vae.encode(pixel_samples * 2 - 1).latent_dist.mean


class FakeUNet(nn.Module):
    """ldm's UNetModel call: ``diffusion_model(x, timesteps=, context=)``."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps=None, context=None):
        return self.unet(x, timesteps, encoder_hidden_states=context).sample


def fake_model(tiny):
    """A ModelPatcher: ``model`` (BaseModel: diffusion_model, model_sampling.sigmas, dtype,
    process_latent_in) and ``load_device``."""
    ac = tiny.alphas_cumprod()
    scale = tiny.vae.config.scaling_factor
    base = SimpleNamespace(diffusion_model=FakeUNet(tiny.unet), manual_cast_dtype=None,
                           model_sampling=SimpleNamespace(sigmas=((1 - ac) / ac).sqrt()),
                           get_dtype=lambda: torch.float32, process_latent_in=lambda z: z * scale)
    return SimpleNamespace(name="unet", model=base, load_device=torch.device("cpu"))


@pytest.fixture
def comfy_setup(monkeypatch, host):
    loads, box = [], {}
    mm = fake_comfy(monkeypatch, loads, box)
    from nodes import comfy_host
    monkeypatch.setattr(comfy_host, "compvis_layers", lambda unet, text: host.linear_layers())
    model, clip, vae = fake_model(host), FakeCLIP(host, mm), FakeVAE(host, mm)
    return comfy_host, model, clip, vae, loads, box


def _train_and_count(comfy_setup, pixels, steps: int):
    comfy_host, model, clip, vae, loads, box = comfy_setup
    loads.clear()
    box["host"] = host = comfy_host.ComfyHost(model, clip, vae)
    with host.training():
        result = train_concept(host, None, pixels, "<loadcount>", "thing",
                               quick_settings(steps=steps, bilevel_iters=2, inner_steps=1, batch_size=2))
    assert len(result.losses) == steps and all(torch.isfinite(torch.tensor(result.losses)))
    return list(loads)


def test_training_loads_the_models_a_fixed_number_of_times(comfy_setup, pixels):
    px = next(iter(pixels.values()))
    short = _train_and_count(comfy_setup, px, steps=1)
    long = _train_and_count(comfy_setup, px, steps=3)
    # the host's load, the dataset's one VAE.encode, the reload before the first pass: 3, not per pass
    assert len(short) == len(long) == 3, [[m.name for m in c.models] for c in long]
    model, clip, vae = comfy_setup[1:4]
    unet_loads = [c for c in long if model in c.models]
    assert len(unet_loads) == 2 and all(clip.patcher in c.models for c in unet_loads)
    assert all(c.memory_required == comfy_setup[0].TRAINING_MEMORY for c in unet_loads)
    assert [c for c in long if vae.patcher in c.models] == [long[1]]  # every image in one encode
    assert not any(c.during_passes for c in long)  # never while the weights are aliased


def test_passes_alias_only_inside_training_and_the_originals_come_back(comfy_setup, pixels):
    """Passes before ``training()`` run without aliases; inside it the first pass swaps inference
    weights for aliases (comfy_host.trainable_weights) and the end of training puts them back."""
    comfy_host, model, clip, vae, loads, box = comfy_setup
    layer = nn.Linear(3, 3)
    with torch.inference_mode():
        weight = torch.ones(3, 3)
    layer._parameters["weight"] = original = nn.Parameter(weight, requires_grad=False)
    host = comfy_host.ComfyHost(model, clip, vae)
    host.unet.add_module("inference_layer", layer)
    try:
        host.ready_for_passes()  # outside training: nothing swapped
        assert layer.weight.is_inference()
        with host.training():
            assert layer.weight.is_inference()  # not before the first pass
            host.ready_for_passes()
            assert not layer.weight.is_inference() and layer.weight.data_ptr() == weight.data_ptr()
            host.encode_images(torch.zeros(1, 3, 64, 64))  # Comfy's loader next: originals back first
            assert layer.weight is original
            host.ready_for_passes()
            assert not layer.weight.is_inference()
        assert layer.weight is original
    finally:
        del host.unet.inference_layer


def test_prompts_are_tokenized_once_and_keep_the_live_vectors(comfy_setup, pixels, monkeypatch):
    """Comfy's Python tokenizer runs once per distinct prompt over a whole training; the cached
    tokens carry each pass's live concept vector (same conditioning, gradient to the vector)."""
    comfy_host, model, clip, vae, loads, box = comfy_setup
    calls = []
    original = FakeSDTokenizer.tokenize_with_weights
    monkeypatch.setattr(FakeSDTokenizer, "tokenize_with_weights",
                        lambda self, text, *a, **k: calls.append(text) or original(self, text, *a, **k))
    host = comfy_host.ComfyHost(model, clip, vae)
    with host.training():
        result = train_concept(host, None, next(iter(pixels.values())), "<tokcount>", "thing",
                               quick_settings(steps=3, bilevel_iters=2, inner_steps=1, batch_size=2))
        assert len(calls) == len(set(calls)) <= 6  # six prompt templates
        d = result.concept.embedding.shape[-1]
        vec = torch.randn(1, d, requires_grad=True)
        prompts = ["a photo of <tokcount>", "<tokcount>"]
        cached = host.encode_text(prompts, {"<tokcount>": vec})
        fresh = comfy_host.ComfyHost(model, clip, vae).encode_text(prompts, {"<tokcount>": vec})
        assert torch.allclose(cached, fresh)
        (grad,) = torch.autograd.grad(cached.sum(), vec)
        assert grad.abs().sum() > 0
        other = host.encode_text(prompts, {"<tokcount>": vec * 2})
        assert not torch.allclose(other, cached)  # the vector of this pass, not the cached one's
