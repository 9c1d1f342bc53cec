"""Recomputing the UNet's blocks in the twice-differentiated pass (memory=checkpoint).

The pass whose graph is differentiated twice (``bilevel._twice_differentiable_gradient``) holds,
until the cross-Hessian product is taken after other passes have run, its forward activations
*and* the backward graph that ``create_graph=True`` builds — which keeps most activations alive
again. torch's own checkpoint (``torch.utils.checkpoint``, non-reentrant) only drops the first:
measured on ``tiny`` at 256 px, the held graph stayed at +565 MiB (+559 MiB without it), and it
recomputes once per backward call, so the double backward recomputes later, outside the pass:

* outside its context — the fused attention kernel instead of the math one, no fp32 norms (on a
  GPU the recomputation runs on autograd's thread, where a thread-local mode is not active):
  torch's ``CheckpointError``, which diffusers' own gradient checkpointing raised here;
* with the LoRA factors bound *then*: the inner steps and the pass at A⁺ have re-bound them —
  same shapes, no error, silently wrong second derivatives.

:class:`BlockCheckpointing` recomputes the backward too: each block call is one autograd node
keeping its inputs (and the factors bound at its forward); its backward under ``create_graph``
is again one node keeping (output gradient, inputs), and the double backward recomputes the
block's forward and backward from those, one block at a time. Every recomputation re-enters the
pass's context and passes the captured factors in as inputs. Measured on ``tiny`` at 256 px: held
graph +42 MiB instead of +559 MiB, peak of the pass and its product +412 MiB instead of +821 MiB.
``tests/test_checkpointing.py`` checks the hypergradient, the B step and the A step against the
plain pass (fp64 to 1e-10), including unrelated factors bound between the pass and the product.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

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


def _tensor_slots(args: tuple, kwargs: dict) -> tuple[list, list[Tensor]]:
    """Where the top-level tensors of a call are (("arg", i) / ("kw", name)) and the tensors."""
    slots = [("arg", i) for i, a in enumerate(args) if isinstance(a, Tensor)]
    slots += [("kw", k) for k, v in kwargs.items() if isinstance(v, Tensor)]
    return slots, [args[i] if kind == "arg" else kwargs[i] for kind, i in slots]


def _fill(args: tuple, kwargs: dict, slots: list, tensors: Sequence[Tensor]) -> tuple[tuple, dict]:
    args, kwargs = list(args), dict(kwargs)
    for (kind, i), t in zip(slots, tensors):
        if kind == "arg":
            args[i] = t
        else:
            kwargs[i] = t
    return tuple(args), kwargs


def _leaves(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach().requires_grad_(t.requires_grad) for t in tensors]


def _grads(outputs: Sequence[Tensor], inputs: Sequence[Tensor], grad_outputs: Sequence[Tensor | None],
           create_graph: bool = False) -> list[Tensor | None]:
    """autograd.grad over the inputs that require grad; None for the others and unused ones."""
    wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                              create_graph=create_graph, allow_unused=True) if pairs and wanted else [None] * len(wanted)
    out: list[Tensor | None] = [None] * len(inputs)
    for i, g in zip(wanted, got):
        out[i] = g
    return out


class _BlockVJP(torch.autograd.Function):
    """The block's vector-Jacobian product (∂y/∂inputs)ᵀ·gy as one node that saves only (gy, inputs):
    its forward recomputes the block and its backward; its backward — the double backward —
    recomputes both again with a graph, differentiates through them and lets everything go."""

    @staticmethod
    def forward(ctx, run, gy, *inputs):
        ctx.run = run
        ctx.save_for_backward(gy, *inputs)
        with torch.enable_grad():
            leaves = _leaves(inputs)
            return tuple(_grads([run(*leaves)], leaves, [gy]))

    @staticmethod
    def backward(ctx, *ggrads):
        gy, *inputs = ctx.saved_tensors
        with torch.enable_grad():
            leaves = _leaves(inputs)
            gy_leaf = gy.detach().requires_grad_(True)
            grads = _grads([ctx.run(*leaves)], leaves, [gy_leaf], create_graph=True)
            used = [(g, gg) for g, gg in zip(grads, ggrads) if g is not None and gg is not None and g.requires_grad]
            second = _grads([g for g, _ in used], [gy_leaf, *leaves], [gg for _, gg in used])
        return (None, *second)


class _Block(torch.autograd.Function):
    """y = block(inputs), saving only the inputs; its backward is a :class:`_BlockVJP` node, so a
    backward with ``create_graph=True`` records (gy, inputs) per block instead of the block's
    activations and its backward graph."""

    @staticmethod
    def forward(ctx, run, *inputs):
        ctx.run = run
        ctx.save_for_backward(*inputs)
        return run(*inputs)

    @staticmethod
    def backward(ctx, gy):
        inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a node the double backward can go through
            return (None, *_BlockVJP.apply(ctx.run, gy, *inputs))
        with torch.enable_grad():
            leaves = _leaves(inputs)
            return (None, *_grads([ctx.run(*leaves)], leaves, [gy]))


class BlockCheckpointing:
    """Recompute ``blocks`` in the twice-differentiated pass (while :meth:`active`).

    Each block call becomes one autograd node that keeps the block's tensor inputs and the LoRA
    factors of the layers inside it, nothing else. Its backward is again one node keeping
    (output gradient, inputs); the double backward recomputes the block's forward and backward
    from those, one block at a time. So neither the forward activations nor the backward graph
    that ``create_graph=True`` builds are held while the other passes run — only the blocks'
    boundaries.

    Every recomputation re-enters ``context`` (the pass's attention kernel, fp32 norms, slicing;
    on a GPU it runs on autograd's thread, where a thread-local mode is not active by itself) and
    binds the factors that were bound when the block ran forward, passed in as inputs so that
    gradients reach them. ``hooks`` must be set before the first pass. The blocks' ``forward`` is
    wrapped for the lifetime of the ``with`` block and restored on exit."""

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

    def _wrap(self, block: nn.Module, forward: Callable) -> Callable:
        inside: list[str] | None = None

        def checkpointed(*args, **kwargs):
            nonlocal inside
            if not (self.enabled and torch.is_grad_enabled()) or self.hooks is None:
                return forward(*args, **kwargs)
            if inside is None:
                modules = {id(m) for m in block.modules()}
                inside = [n for n, layer in self.hooks.layers.items() if id(layer) in modules]
            bound = dict(self.hooks.trainable)  # as bound now: later passes re-bind the hooks
            names = [n for n in inside if n in bound]
            factors = [t for n in names for t in bound[n]]
            # dict arguments (ComfyUI's transformer_options) copied: later blocks may write to them
            args = tuple(dict(x) if isinstance(x, dict) else x for x in args)
            kwargs = {k: dict(x) if isinstance(x, dict) else x for k, x in kwargs.items()}
            slots, tensors = _tensor_slots(args, kwargs)
            hooks, context, k = self.hooks, self.context, len(tensors)

            def run(*inputs):
                call_args, call_kwargs = _fill(args, kwargs, slots, inputs[:k])
                previous = hooks.trainable
                hooks.trainable = {**bound, **{n: (inputs[k + 2 * i], inputs[k + 2 * i + 1])
                                               for i, n in enumerate(names)}}
                try:
                    with context():
                        out = forward(*call_args, **call_kwargs)
                finally:
                    hooks.trainable = previous
                if not isinstance(out, Tensor):
                    raise TypeError(f"memory=checkpoint needs blocks that return one tensor; "
                                    f"{type(block).__name__} returned {type(out).__name__}")
                return out

            return _Block.apply(run, *tensors, *factors)
        return checkpointed

    def __enter__(self) -> "BlockCheckpointing":
        for block in self.blocks:
            self._originals.append((block, block.__dict__.get("forward")))  # a host's own patch, if any
            block.forward = self._wrap(block, block.forward)
        return self

    def __exit__(self, *exc) -> None:
        for block, own in reversed(self._originals):
            if own is None:
                del block.forward  # the class's method again
            else:
                block.forward = own
        self._originals = []
