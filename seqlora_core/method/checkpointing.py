"""Activation checkpointing of the UNet's blocks that stays correct under the double backward.

The twice-differentiated pass (``bilevel._twice_differentiable_gradient``) keeps its graph until
the cross-Hessian product is taken, after other passes have run. Wrapping blocks in
``torch.utils.checkpoint`` naively breaks in two ways, both because a non-reentrant checkpoint
recomputes a block's forward once *per backward call* (per autograd graph task), and the
double backward is a second call that reaches the forward nodes again:

* the recomputation runs outside the pass's context: the fused attention kernel instead of the
  math one, no fp32 normalisation — a different set of saved tensors, which torch reports as
  ``CheckpointError`` (what diffusers' own gradient checkpointing raised here), and on a CUDA
  device the recomputation runs on autograd's worker thread, where a thread-local torch-function
  mode such as ``precision.Fp32Normalisation`` is not active at all;
* the recomputation reads the LoRA factors bound *now*, and by the time of the product the inner
  steps and the pass at A⁺ have re-bound them: same shapes, so no error, but silently wrong
  second derivatives.

:class:`BlockCheckpointing` gives each checkpointed call a recomputation context (torch's
``context_fn``) that re-enters the pass's own context and re-binds the factors that were bound
when the block ran forward, so every recomputation, whenever and on whichever thread it happens,
sees what the forward saw. ``tests/test_checkpointing.py`` checks the hypergradient, the B step
and the A step against the un-checkpointed computation, including a re-binding in between.

Only the blocks' saved activations are dropped: the first backward (``create_graph=True``)
recomputes them and the backward graph it builds keeps the ones the double backward needs, so
the saving is what the forward alone held (see ``bench/RESULTS.md`` for the measured effect).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .lora import LoRAHooks

# UNet blocks worth a checkpoint: diffusers' transformer and resnet blocks, and the same blocks of
# ldm (ComfyUI, A1111). Each is a leaf of the block structure: no chosen block contains another.
BLOCK_CLASSES = ("BasicTransformerBlock", "ResnetBlock2D", "ResBlock")


def checkpoint_blocks(root: nn.Module, classes: Sequence[str] = BLOCK_CLASSES) -> list[nn.Module]:
    """The outermost modules under ``root`` whose class name is in ``classes``, in model order."""
    chosen: list[nn.Module] = []
    inside: set[int] = set()
    for module in root.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in classes:
            chosen.append(module)
            inside.update(id(m) for m in module.modules())
    return chosen


class _Recompute:
    """Re-entrant context for one checkpointed call's recomputations: the pass's context and the
    factors bound at its forward. Entered once per backward call that recomputes the block."""

    def __init__(self, hooks: LoRAHooks | None, bound: dict, context: Callable[[], contextlib.AbstractContextManager]):
        self.hooks, self.bound, self.context = hooks, bound, context
        self._stack: list[tuple[dict | None, contextlib.AbstractContextManager]] = []

    def __enter__(self) -> None:
        previous = None
        if self.hooks is not None:
            previous, self.hooks.trainable = self.hooks.trainable, self.bound
        ctx = self.context()
        try:
            ctx.__enter__()
        except BaseException:
            if self.hooks is not None:
                self.hooks.trainable = previous
            raise
        self._stack.append((previous, ctx))

    def __exit__(self, *exc) -> None:
        previous, ctx = self._stack.pop()
        try:
            ctx.__exit__(*exc)
        finally:
            if self.hooks is not None:
                self.hooks.trainable = previous


class BlockCheckpointing:
    """Checkpoint ``blocks`` while :meth:`active` (the twice-differentiated pass only).

    ``context`` builds the pass's context (attention kernel with double backward, fp32 norms) for
    the recomputations; ``hooks`` (set before the first pass) are the LoRA hooks whose trainable
    factors are captured at each block's forward and re-bound for its recomputations. The blocks'
    ``forward`` is wrapped for the lifetime of the ``with`` block and restored on exit."""

    def __init__(self, blocks: Iterable[nn.Module], context: Callable[[], contextlib.AbstractContextManager],
                 hooks: LoRAHooks | None = None):
        self.blocks = list(blocks)
        self.context = context
        self.hooks = hooks
        self.enabled = False
        self._originals: list[tuple[nn.Module, Callable | None]] = []

    @contextlib.contextmanager
    def active(self):
        previous, self.enabled = self.enabled, True
        try:
            yield self
        finally:
            self.enabled = previous

    def _wrap(self, forward: Callable) -> Callable:
        def checkpointed(*args, **kwargs):
            if not (self.enabled and torch.is_grad_enabled()):
                return forward(*args, **kwargs)
            bound = dict(self.hooks.trainable) if self.hooks is not None else {}
            recompute = _Recompute(self.hooks, bound, self.context)
            return checkpoint(forward, *args, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), recompute), **kwargs)
        return checkpointed

    def __enter__(self) -> "BlockCheckpointing":
        for block in self.blocks:
            self._originals.append((block, block.__dict__.get("forward")))  # a host's own patch, if any
            block.forward = self._wrap(block.forward)
        return self

    def __exit__(self, *exc) -> None:
        for block, own in reversed(self._originals):
            if own is None:
                del block.forward  # the class's method again
            else:
                block.forward = own
        self._originals = []
