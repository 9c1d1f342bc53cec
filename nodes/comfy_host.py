"""The core's host protocol on ComfyUI's own objects: MODEL (ModelPatcher), CLIP and VAE.

Thin by design: layer names come from ``seqlora_core.hosts.naming``, the algorithm from
``seqlora_core.method.trainer``. What is Comfy-specific lives here:

* ComfyUI runs nodes under ``torch.inference_mode``; weights loaded there are inference tensors,
  which autograd refuses to save. ``trainable_weights`` swaps them for ordinary tensors that
  *alias the same storage* (no copy: cloning every weight of UNet and CLIP, as before, held
  their whole size a second time — ≈ 2 GB in fp16 on a GPU) from the first pass of a run of
  passes to its end (the next ``encode_images`` or the end of ``training()``) and puts the
  originals back, so the host's model is left as it was. Training never writes to a
  weight, so sharing the storage is safe.
* Loading: ``comfy.model_management.load_models_gpu`` as every Comfy sampler does, but once per
  run of passes, not once per pass. ``CLIP.encode_from_tokens`` and ``VAE.encode`` each enter
  Comfy's loader (comfy/sd.py), whose ``free_memory`` empties torch's cache or unloads part of a
  model when memory is short — on cards of 16 GB or less nearly every pass, with the UNet's
  weights aliased for autograd (below) and a graph alive. So: UNet and text encoder are loaded
  together with ``memory_required`` of Comfy's own trainer (comfy_extras/nodes_train.py: every
  other model on the device is unloaded, the training has the rest; a model of ours already
  loaded is unloaded and loaded again too, once per load); the text encoder is then
  called without ``encode_from_tokens``'s own load; the dataset's images are encoded in one
  ``VAE.encode`` call (it sizes its batches itself), before the passes, with the weights not
  aliased, and the next pass loads UNet and text encoder again, once. In Comfy's normal and
  high-VRAM states the whole model is loaded (``force_full_load``: the training passes run every
  layer many times), while ``--lowvram`` / ``--novram`` are respected (Comfy keeps part or all of
  the weights in CPU memory and casts each layer's weight to the GPU when it runs; the
  twice-differentiated pass then keeps those per-call copies until its product is taken).
* Conditioning stays on the compute device: Comfy's CLIP returns its output on
  ``intermediate_device()`` (the CPU unless ``--gpu-only``); training encodes the prompts on every
  pass, so ``conditioning_on_device`` points that at the compute device while training runs
  instead of copying each pass's conditioning to the CPU and back.
* Comfy picks its attention kernel at import time; the differentiable pass swaps in
  ``attention_basic`` (plain matmul/softmax, with double backward) and torch's math SDPA kernel.
* Concept tokens are fed through :class:`nodes.concept_tokenizer.ConceptTokenizer`; each prompt is
  tokenized once per training and each pass's live vectors put into the cached tokens (``_tokens``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from seqlora_core.hosts.protocol import math_attention
from seqlora_core.hosts.naming import compvis_layers
from seqlora_core.hosts.token_injection import mean_piece_embedding

from .concept_tokenizer import ConceptTokenizer


def autograd_alias(t: Tensor) -> Tensor:
    """An ordinary (non-inference) tensor on ``t``'s storage: no copy, and autograd may save it."""
    with torch.inference_mode(False):
        return torch.empty(0, dtype=t.dtype, device=t.device).set_(
            t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


@contextlib.contextmanager
def trainable_weights(*modules: nn.Module):
    """Replace inference-mode parameters and buffers by ordinary aliases of the same storage
    (:func:`autograd_alias`); restore the originals after."""
    swapped = []
    try:
        for root in modules:
            for module in root.modules():
                for table in (module._parameters, module._buffers):
                    for name, t in list(table.items()):
                        if t is not None and t.is_inference():
                            alias = autograd_alias(t)
                            table[name] = nn.Parameter(alias, requires_grad=False) \
                                if isinstance(t, nn.Parameter) else alias
                            swapped.append((table, name, t))
        yield
    finally:
        for table, name, original in reversed(swapped):
            table[name] = original


@contextlib.contextmanager
def conditioning_on_device(device: torch.device):
    """Comfy's text encoders move their output to ``intermediate_device()``; while training, that
    is the compute device, so each pass's conditioning does not round-trip through the CPU."""
    import comfy.model_management as mm

    saved = mm.intermediate_device
    mm.intermediate_device = lambda: device
    try:
        yield
    finally:
        mm.intermediate_device = saved


def full_load_allowed() -> bool:
    """False under ``--lowvram`` / ``--novram`` (Comfy's LOW_VRAM / NO_VRAM states): let Comfy
    stream the weights instead of forcing all of them onto the GPU."""
    import comfy.model_management as mm

    return mm.vram_state not in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM)


@contextlib.contextmanager
def comfy_math_attention():
    """Comfy's UNet attention on attention_basic and torch SDPA on its math kernel."""
    import comfy.clip_model as clip_model
    import comfy.ldm.modules.attention as attention

    saved = attention.optimized_attention, attention.optimized_attention_masked, clip_model.optimized_attention_for_device
    attention.optimized_attention = attention.attention_basic
    attention.optimized_attention_masked = attention.attention_basic
    # the text encoder picks its kernel per call; on GPUs that is SDPA with Comfy's own kernel priority
    clip_model.optimized_attention_for_device = lambda *args, **kwargs: attention.attention_basic
    try:
        with math_attention():
            yield
    finally:
        (attention.optimized_attention, attention.optimized_attention_masked,
         clip_model.optimized_attention_for_device) = saved


@contextlib.contextmanager
def autograd_safe_layer_norms(root: nn.Module):
    """Comfy's CLIP layers add residuals in place (``x += attn(ln(x))``), which overwrites the
    input LayerNorm saved for backward. Feeding each LayerNorm a copy keeps the saved tensor
    intact; outside training nothing is hooked."""
    handles = [m.register_forward_pre_hook(lambda mod, args: (args[0].clone(), *args[1:]))
               for m in root.modules() if isinstance(m, nn.LayerNorm)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def interruptible(unet: nn.Module, text: nn.Module):
    """ComfyUI's Cancel inside a pass: every UNet block and text-encoder layer checks the interrupt
    flag before it runs (one step of several passes took 31 s at 64 px on CPU; waiting for the
    step's end made Cancel look dead). Raises Comfy's own interrupt exception; nothing stays hooked."""
    import comfy.model_management as mm

    def check(module, args):
        mm.throw_exception_if_processing_interrupted()

    blocks = [*getattr(unet, "input_blocks", []), getattr(unet, "middle_block", None), *getattr(unet, "output_blocks", [])]
    blocks += [m for m in text.modules() if type(m).__name__ == "CLIPLayer"]
    handles = [b.register_forward_pre_hook(check) for b in blocks if b is not None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _row_index(row: Tensor) -> int:
    """x for a row view ``base[x]`` of a 2-D tensor (ValueError for anything else)."""
    base = row._base
    if base is None or base.dim() != 2 or row.dim() != 1:
        raise ValueError("not a row of a stand-in")
    return (row.storage_offset() - base.storage_offset()) // base.stride(0)


def _with_rows(tokens, vector_for):
    """``tokens`` (Comfy's nested dict / list / tuple of (token, weight, …)) with every tensor
    replaced by ``vector_for(tensor)``; everything else kept."""
    if isinstance(tokens, Tensor):
        return vector_for(tokens)
    if isinstance(tokens, dict):
        return {k: _with_rows(v, vector_for) for k, v in tokens.items()}
    if isinstance(tokens, (list, tuple)):
        return type(tokens)(_with_rows(v, vector_for) for v in tokens)
    return tokens


def is_sd15(model) -> bool:
    import comfy.supported_models

    return isinstance(model.model.model_config, comfy.supported_models.SD15)


# comfy_extras/nodes_train.py (TrainLoraNode) loads the model it trains with
# load_models_gpu([mp], memory_required=1e20, ...): every other model on the device is unloaded
TRAINING_MEMORY = 1e20


class ComfyHost:
    """Host protocol over a loaded SD-1.5 ModelPatcher, CLIP and VAE (on Comfy's device)."""

    batches_images = True  # VAE.encode splits any batch by free memory: the trainer calls it once

    def __init__(self, model, clip, vae):
        self.model, self.clip, self.vae = model, clip, vae
        self.unet = model.model.diffusion_model
        self.text = clip.cond_stage_model
        self.device = model.load_device
        # the compute dtype, as Comfy's own _apply_model picks it: fp8-stored weights compute in
        # manual_cast_dtype, and feeding the UNet fp8 inputs would break
        self.dtype = getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()
        self._layers = compvis_layers(self.unet, self.text)
        self._in_training = False
        self._passes: contextlib.ExitStack | None = None  # open while passes may run (weights aliased)
        self._token_cache: dict = {}  # (prompt, concept tokens) → tokens with stand-ins (see _tokens)
        self._load()  # the layers' weights as the passes will see them (fingerprints read them)

    def _load(self) -> None:
        """The one load of UNet and text encoder for a run of passes (see the module's docstring)."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.model, self.clip.patcher], memory_required=TRAINING_MEMORY,
                           force_full_load=full_load_allowed())
        self._loaded = True

    def ready_for_passes(self) -> None:
        """Before the first pass: UNet and text encoder loaded (again only if Comfy's loader ran
        since, for the VAE) and, inside ``training()``, their weights aliased for autograd and
        hooked. Every pass calls it; only the first of a run does anything, so no pass enters
        Comfy's loader."""
        if self._passes is not None:
            return
        if not self._loaded:
            self._load()
        with contextlib.ExitStack() as stack:  # undone at once if any part fails
            if self._in_training:
                stack.enter_context(trainable_weights(self.unet, self.text))
                stack.enter_context(autograd_safe_layer_norms(self.text))
                stack.enter_context(interruptible(self.unet, self.text))
            self._passes = stack.pop_all()

    def end_passes(self) -> None:
        """Put the original weights back before anything enters Comfy's loader, which may move them
        (an aliased weight would be moved while its original stayed, and come back stale)."""
        if self._passes is not None:
            stack, self._passes = self._passes, None
            stack.close()

    @contextlib.contextmanager
    def _training_session(self):
        self.end_passes()  # passes run before training() had no aliases: the first one inside makes them
        self._in_training = True
        try:
            yield
        finally:
            self.end_passes()
            self._in_training = False

    def _encode_tokens(self, tokens) -> Tensor:
        """``CLIP.encode_from_tokens`` (comfy/sd.py) without its ``self.load_model()``: the text
        encoder was loaded with the UNet for the whole run of passes."""
        clip = self.clip
        clip.cond_stage_model.reset_clip_options()
        if clip.layer_idx is not None:
            clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})
        return clip.cond_stage_model.encode_token_weights(tokens)[0]

    # -- protocol ----------------------------------------------------------------------------
    def architecture(self) -> str:
        return "sd15"

    def linear_layers(self) -> dict[str, nn.Linear]:
        return self._layers

    def _input_embeddings(self) -> nn.Module:
        return self.text.clip_l.transformer.get_input_embeddings()

    def init_embedding(self, word: str) -> Tensor:
        sd_tok = self.clip.tokenizer.clip_l if hasattr(self.clip.tokenizer, "clip_l") else self.clip.tokenizer
        return mean_piece_embedding(self._input_embeddings().weight, sd_tok.tokenizer(word)["input_ids"][1:-1])

    def encode_text(self, prompts: list[str], embeddings: dict[str, Tensor]) -> Tensor:
        self.ready_for_passes()
        conds = [self._encode_tokens(self._tokens(p, embeddings)) for p in prompts]
        return torch.cat([c[:, :77] for c in conds]).to(self.device)

    def _tokens(self, prompt: str, embeddings: dict[str, Tensor]):
        """``tokenize_with_weights`` of ``prompt`` with the live concept vectors in place, Comfy's
        Python tokenizer run once per (prompt, concept tokens): the prompt is tokenized with
        stand-in tensors, whose rows (``embed[x]``, sd1_clip.SDTokenizer.tokenize_with_weights)
        are swapped for the live vectors' rows on every pass. A tokenizer that places vectors
        some other way is simply called every pass."""
        key = (prompt, frozenset(embeddings))
        if key not in self._token_cache:
            stand_ins = {t: torch.zeros(e.shape) for t, e in embeddings.items()}
            tokens = ConceptTokenizer(self.clip.tokenizer, stand_ins).tokenize_with_weights(prompt)
            self._token_cache[key] = (tokens, {id(v): t for t, v in stand_ins.items()}, stand_ins)
        tokens, token_of, _ = self._token_cache[key]
        try:
            return _with_rows(tokens, lambda row: embeddings[token_of[id(row._base)]][_row_index(row)])
        except (KeyError, ValueError, IndexError):
            return ConceptTokenizer(self.clip.tokenizer, embeddings).tokenize_with_weights(prompt)

    def encode_images(self, pixels: Tensor) -> Tensor:
        """One ``VAE.encode`` (one pass through Comfy's loader) for any number of images, with the
        weights not aliased; the next pass loads UNet and text encoder again."""
        self.end_passes()
        self._loaded = False
        with torch.no_grad():
            images = ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).contiguous()  # (b, H, W, 3)
            latents = self.vae.encode(images)
            return self.model.model.process_latent_in(latents).to(self.device)

    def alphas_cumprod(self) -> Tensor:
        sigmas = self.model.model.model_sampling.sigmas.float().cpu()
        return 1.0 / (sigmas ** 2 + 1.0)

    def predict_noise(self, noisy: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        self.ready_for_passes()
        return self.unet(noisy.to(self.device, self.dtype), timesteps=timesteps.to(self.device).float(),
                         context=cond.to(self.device, self.dtype))

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The UNet blocks memory=checkpoint recomputes (ldm's BasicTransformerBlock, ResBlock)."""
        from seqlora_core.method.checkpointing import checkpoint_blocks
        return checkpoint_blocks(self.unet)

    def differentiable_attention(self) -> contextlib.AbstractContextManager:
        return comfy_math_attention()

    def training(self) -> contextlib.AbstractContextManager:
        """Everything a training run needs around it: grad on and, from its first pass on, ordinary
        (non-inference) weights (``ready_for_passes``); the originals are back when it ends."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(conditioning_on_device(self.device))
        stack.enter_context(self._training_session())
        return stack
