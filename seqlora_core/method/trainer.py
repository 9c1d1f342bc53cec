"""Training one concept on top of a bank: data, minibatches, the bilevel loop, the new concept.

Reading of K (the paper's "bilevel iterations", not recoverable from its text): training draws
``steps`` minibatches (images, noise, timesteps, prompts fixed within a minibatch so that
L(A, B) is one deterministic function there, as the analysis assumes) and runs K bilevel
iterations (each with T inner steps) on every minibatch. One "step" of the progress bar is one
minibatch, i.e. K iterations.

While a concept trains, every earlier concept of the bank is applied (the model the artist
accumulates), and the new basis is kept in the null space of the earlier ones' bases. The bank
object passed in is never modified: a new Bank is returned, so a failed or interrupted run
changes nothing.

Masks (optional, one per image, 1 = subject): the loss is the mask-weighted squared error,
normalised by the mask's mass, so the background of a photo teaches nothing (as Mix-of-Show
does) and a mask of ones gives the plain MSE.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bank.format import Bank, Concept
from ..settings import CONSTRAINED_METHODS, MEMORY_LEVERS, TrainSettings, train_settings
from .bilevel import BilevelConfig, BilevelSolver
from ..errors import CapacityError, InputError, SeqLoRAError
from ..bank.fingerprint import Fingerprint, base_fingerprint
from ..hosts.protocol import Host
from .activation_stats import ActivationStats
from .attention_slicing import SlicedAttention
from .checkpointing import BlockCheckpointing
from .lora import LoRAHooks
from .projector import BatchedProjection, orthonormal_factors
from .precision import HALF, Fp32Normalisation, LossScale
from .residual_check import check_residual_range
from .targets import select_layers

PROMPT_TEMPLATES = ("a photo of {}", "a close-up photo of {}", "a picture of {}", "a good photo of {}",
                    "a photo of the {}", "{}")


class Interrupted(SeqLoRAError):
    """Training was stopped by the user; nothing was written."""


def memory_levers(memory: str) -> frozenset[str]:
    """The levers a memory setting names: "default" → none, "low+checkpoint" → {low, checkpoint}."""
    levers = frozenset() if memory == "default" else frozenset(memory.split("+"))
    unknown = levers - set(MEMORY_LEVERS)
    if unknown:
        raise InputError(f"Memory must be default or a +-joined set of {', '.join(MEMORY_LEVERS)}, not {memory!r}.")
    return levers


def bilevel_config(settings: TrainSettings) -> BilevelConfig:
    return BilevelConfig(method=settings.method, inner_steps=settings.inner_steps, lr_a=settings.lr_a,
                         lr_b=settings.lr_b, lr_embedding=settings.lr_embedding, optimizer=settings.optimizer,
                         hypergradient=settings.hypergradient, low_memory="low" in memory_levers(settings.memory))


# A run stops when this many minibatches in a row had no finite commit (bilevel.py, D5).
MAX_FAILED_MINIBATCHES = 10


@dataclass
class TrainResult:
    bank: Bank
    concept: Concept
    losses: list[float] = field(default_factory=list)  # one per minibatch (last iteration's loss)
    seconds: float = 0.0
    skipped_steps: int = 0  # commits skipped because their gradients were not finite (fp16 overflow)
    loss_scale: float = 1.0  # the fp16 loss scale at the end (1 in fp32 / bf16)
    # largest over layers of ‖B_final − B_trained‖_F / ‖B_trained‖_F of the last exact projection:
    # ~1e-7 (float32 drift) when training kept B in the free space; larger means training left it
    # (the projection then cut B without refitting A). 0 for unconstrained methods.
    projection_drift: float = 0.0


def new_bank(host: Host, eps: float = 1e-8, fingerprint: Fingerprint | None = None) -> Bank:
    """An empty bank for the host's base (``fingerprint``: the base's, when the caller has it)."""
    fingerprint = fingerprint or base_fingerprint(host.linear_layers())
    return Bank({"architecture": host.architecture(), **fingerprint.base_fields()}, eps)


def encode_latents(host: Host, pixels: Tensor, chunk: int = 4) -> Tensor:
    """(N, 3, R, R) in [-1, 1] → (N, 4, R/8, R/8) float32 latents, a few images at a time; all in
    one call for a host that sizes its own batches (``host.batches_images``: ComfyUI's VAE.encode
    splits by free memory, and each call goes through Comfy's model loader once)."""
    if getattr(host, "batches_images", False):
        chunk = max(len(pixels), 1)
    return torch.cat([host.encode_images(pixels[i:i + chunk]) for i in range(0, len(pixels), chunk)]).float()


def encode_dataset(host: Host, pixels: Tensor) -> Tensor:
    """Latents of the images and their mirror images: (2N, 4, h, w) on the host device."""
    return encode_latents(host, torch.cat([pixels, pixels.flip(-1)]))


def noisy_batch(latents: Tensor, alphas_cumprod: Tensor, idx: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε."""
    ac = alphas_cumprod.to(latents.device)[t].view(-1, 1, 1, 1)
    return ac.sqrt() * latents[idx] + (1 - ac).sqrt() * noise


def masked_mse(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean squared error (float32); with ``weight`` (B, 1, h, w) in [0, 1] the weighted sum over
    the weight's mass (times the channels): a weight of ones is the plain mean, a weight of 0
    gives that latent pixel no gradient."""
    if weight is None:
        return F.mse_loss(pred.float(), target.float())
    weight = weight.float().expand_as(pred)
    return ((pred.float() - target.float()) ** 2 * weight).sum() / weight.sum()


def latent_masks(masks: Tensor, n_images: int, latent_hw: tuple[int, int]) -> Tensor:
    """(N, H, W) masks in [0, 1] (1 = subject) → (2N, 1, h, w) on the latent grid (area average),
    mirrored like ``encode_dataset``'s images; one sentence for a wrong count, range or empty mask."""
    if masks.dim() != 3 or len(masks) != n_images:
        raise InputError(f"Give one mask per image: {n_images} image(s), masks of shape {tuple(masks.shape)}.")
    masks = masks.detach().float().cpu()
    if not torch.isfinite(masks).all() or masks.min() < 0 or masks.max() > 1:
        raise InputError("Masks must hold values between 0 and 1 (1 marks the subject).")
    small = F.adaptive_avg_pool2d(masks[:, None], latent_hw)
    empty = [i + 1 for i, m in enumerate(small) if float(m.sum()) <= 0]
    if empty:
        raise InputError(f"The mask of image {empty[0]} marks nothing to train on (it is empty).")
    return torch.cat([small, small.flip(-1)])


def denoising_loss(host: Host, noisy: Tensor, noise: Tensor, t: Tensor, prompts: list[str],
                   embeddings: dict[str, Tensor], weight: Tensor | None = None) -> Tensor:
    """The ε-prediction loss of SD-1.5 (mean squared error, float32; mask-weighted when
    ``weight`` (B, 1, h, w) is given, see ``masked_mse``)."""
    cond = host.encode_text(prompts, embeddings)
    pred = host.predict_noise(noisy, t.to(host.device), cond)
    return masked_mse(pred, noise, weight)


def twice_differentiable(host: Host, checkpointing: BlockCheckpointing | None = None, slice_queries: int = 0
                         ) -> Callable[[], contextlib.AbstractContextManager]:
    """The context of the one pass differentiated twice: the host's attention kernel with double
    backward, fp32 normalisation when the model is half precision (precision.py), attention in
    slices of ``slice_queries`` queries when > 0 (attention_slicing.py), and, with
    ``checkpointing``, the UNet's blocks checkpointed (checkpointing.py; their recomputations
    re-enter this context without the checkpointing)."""
    def enter() -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(host.differentiable_attention())
        if getattr(host, "dtype", torch.float32) in HALF:
            stack.enter_context(Fp32Normalisation())
        if slice_queries > 0:
            stack.enter_context(SlicedAttention(slice_queries))
        if checkpointing is not None:
            stack.enter_context(checkpointing.active())
        return stack
    return enter


def differentiable_context(host: Host, memory: str) -> tuple[Callable[[], contextlib.AbstractContextManager],
                                                             BlockCheckpointing | None]:
    """The twice-differentiated pass's context for a memory setting, and the block checkpointing
    it uses (None unless asked for; the caller enters it around training and gives it the hooks)."""
    levers = memory_levers(memory)
    slice_queries = SlicedAttention.default_chunk if "slice" in levers else 0  # read at call time (tests shrink it)
    checkpointing = None
    if "checkpoint" in levers:
        blocks = getattr(host, "checkpoint_blocks", None)
        if blocks is None or not blocks():
            raise InputError(f"memory={memory} needs the host's UNet blocks; this host does not expose them.")
        checkpointing = BlockCheckpointing(blocks(), twice_differentiable(host, None, slice_queries))
    return twice_differentiable(host, checkpointing, slice_queries), checkpointing


def failure_message(host: Host, step: int, loss: float, scale: float) -> str:
    """Why training stopped, with the advice that fits: divergence in fp32, overflow in half."""
    dtype = getattr(host, "dtype", torch.float32)
    if dtype in HALF:
        name = str(dtype).removeprefix("torch.")
        return (f"Training stopped at step {step}: the gradients were not finite in {name} for "
                f"{MAX_FAILED_MINIBATCHES} minibatches in a row (loss {loss}, loss scale {scale:g}); "
                "train in fp32 (or bf16), or lower the learning rates. The bank was left as it was.")
    return (f"Training diverged at step {step} (loss {loss}); lower the learning rates. "
            "The bank was left as it was.")


def train_concept(host: Host, bank: Bank | None, pixels: Tensor, token: str, init_word: str,
                  settings: TrainSettings, progress: Callable[[int, int, float], None] | None = None,
                  should_stop: Callable[[], bool] | None = None, author: str | None = None,
                  masks: Tensor | None = None) -> TrainResult:
    """Learn one concept from ``pixels`` ((N, 3, R, R) in [-1, 1]) and return the extended bank.
    ``masks`` (N, R, R) in [0, 1], 1 = subject: only the subject is learned (None: whole images)."""
    start = time.time()
    fingerprint = base_fingerprint(host.linear_layers())
    bank = bank if bank is not None else new_bank(host, settings.eps, fingerprint)
    bank.check_base(host.architecture(), fingerprint)
    ident = bank.check_new_token(token)
    token = f"<{ident}>" if not token.startswith("<") else token
    train_settings(asdict(settings))  # every value in its range (one sentence otherwise)
    cfg = bilevel_config(settings)

    all_layers = host.linear_layers()
    targets = select_layers(all_layers, settings.targets)
    names = list(targets)
    constrained = settings.method in CONSTRAINED_METHODS
    projectors = {n: bank.projector(n, targets[n].in_features) for n in names}
    if constrained:
        bank.check_room(settings.rank)
        for n in names:
            if projectors[n].free_width < settings.rank:
                raise CapacityError(f"Layer {n} is full: {projectors[n].free_width} of its "
                                    f"{targets[n].in_features} input dimensions are free, rank {settings.rank} needs more.")

    gen = torch.Generator().manual_seed(settings.seed)
    dev = host.device
    b0 = []
    for n in names:
        if constrained:
            b0.append(projectors[n].random_orthonormal(settings.rank, gen))
        else:
            b0.append(torch.linalg.qr(torch.randn(targets[n].in_features, settings.rank, generator=gen))[0])
    b0 = [b.to(dev) for b in b0]
    a0 = [torch.zeros(targets[n].out_features, settings.rank, device=dev) for n in names]
    emb0 = host.init_embedding(init_word or "object").to(dev)

    project = BatchedProjection([projectors[n] for n in names]) if constrained else (lambda grads: list(grads))
    context, checkpointing = differentiable_context(host, settings.memory)
    solver = BilevelSolver(a0, b0, [emb0], project, cfg, context, LossScale(getattr(host, "dtype", torch.float32)))

    latents = encode_dataset(host, pixels)
    weights = None if masks is None else latent_masks(masks, len(pixels), tuple(latents.shape[-2:])).to(dev)
    alphas = host.alphas_cumprod()
    hook_layers = {n: all_layers[n] for n in set(names) | set(bank.layer_shapes()) if n in all_layers}
    losses: list[float] = []
    failed_in_a_row = 0
    # hosts whose weights require grad (A1111) freeze them for the run: see hosts.protocol.frozen_parameters
    frozen = getattr(host, "frozen_weights", contextlib.nullcontext)
    stats = ActivationStats(targets if settings.stats_q > 0 else {})
    with frozen(), LoRAHooks(hook_layers) as hooks, stats, checkpointing or contextlib.nullcontext():
        if checkpointing is not None:
            checkpointing.hooks = hooks  # recomputations re-bind the factors their forward saw
        if bank.concepts:
            hooks.set_composed(bank.composed_factors())
        for step in range(settings.steps):
            idx = torch.randint(len(latents), (settings.batch_size,), generator=gen)
            t = torch.randint(len(alphas), (settings.batch_size,), generator=gen).to(dev)  # on the device once per minibatch
            noise = torch.randn((settings.batch_size, *latents.shape[1:]), generator=gen).to(dev)
            noisy = noisy_batch(latents, alphas, idx.to(dev), noise, t)
            picks = torch.randint(len(PROMPT_TEMPLATES), (settings.batch_size,), generator=gen)
            prompts = [PROMPT_TEMPLATES[int(i)].format(token) for i in picks]

            def loss_fn(a, b, embedding):
                # checked before every forward pass (several per bilevel iteration), so a stop
                # request waits for at most one pass, not a whole minibatch
                if should_stop is not None and should_stop():
                    raise Interrupted("Training was interrupted; the bank was left as it was.")
                hooks.bind(dict(zip(names, a)), dict(zip(names, b)))
                loss = denoising_loss(host, noisy, noise, t, prompts, {token: embedding[0]},
                                      None if weights is None else weights[idx.to(dev)])
                stats.armed = False  # the minibatch's later passes see the same inputs
                return loss

            stats.armed = True

            skipped = 0
            for _ in range(settings.bilevel_iters):
                result = solver.iterate(loss_fn)
                skipped += result.skipped > 0
            loss = float(result.loss)  # the one read-back per minibatch, for progress
            failed_in_a_row = failed_in_a_row + 1 if (skipped == settings.bilevel_iters or not math.isfinite(loss)) else 0
            if failed_in_a_row >= MAX_FAILED_MINIBATCHES:
                raise SeqLoRAError(failure_message(host, step + 1, loss, solver.scale))
            losses.append(loss)
            if progress is not None:
                progress(step + 1, settings.steps, loss)

    # one last exact projection against float32 drift (float64), then every concept is frozen
    # with orthonormal B (orthonormal_factors: same A Bᵀ, projector exact whatever B's conditioning)
    b_trained = [b.detach().double() for b in solver.b]
    b_final = [projectors[n].project(b) if constrained else b for n, b in zip(names, b_trained)]
    drift = max((float((f - t).norm() / t.norm()) for f, t in zip(b_final, b_trained) if t.norm() > 0), default=0.0)
    concept_stats = stats.top_eigenpairs(settings.stats_q) if settings.stats_q > 0 else None
    # refused here, before a Concept or Bank exists, so no caller can write it (and before the QR,
    # which has no use for non-finite factors)
    check_residual_range(ident, dict(zip(names, solver.a)), dict(zip(names, b_final)), concept_stats,
                         getattr(host, "dtype", torch.float32))
    frozen_factors = [orthonormal_factors(a, b, projectors[n] if constrained else None)
                      for n, a, b in zip(names, solver.a, b_final)]
    a_out = {n: a for n, (a, _) in zip(names, frozen_factors)}
    b_out = {n: b for n, (_, b) in zip(names, frozen_factors)}
    finite = [v for v in losses if math.isfinite(v)]
    tail = finite[-max(1, len(finite) // 10):]
    concept = Concept(
        id=ident, token=token, init_word=init_word, rank=settings.rank, method=settings.method,
        A=a_out, B=b_out,
        embedding=solver.embedding[0].detach().float().cpu(),
        settings=asdict(settings), final_loss=sum(tail) / len(tail) if tail else None,
        stats=concept_stats,
        author=author, lease=bank.confined_to if constrained else None)
    return TrainResult(bank.with_concept(concept), concept, losses, time.time() - start,
                       solver.skipped_steps, solver.scale, drift)
