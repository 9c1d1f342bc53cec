"""Every training setting, defined once: name, type, default, range, help and the paper's symbol.

The command line (``app/cli.py``), the ComfyUI node (``nodes/node_defs.py``) and the gradio tab
(``seqlora_ui/tab.py``) are generated from :data:`TRAINING_SETTINGS`, and :class:`TrainSettings`
is built from it, so a new knob is added here once and appears on every surface with the same
name, default and limits. A leaf module (no torch; only ``errors`` imported) so that storage,
the optimiser and every front end can share it without importing each other.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InputError

METHODS = ("seqlora", "alternating", "frozen-basis", "lora")
# A concept brought in from a LoRA file (``app.import_lora``) rather than trained: its basis is
# fitted inside the free space like a trained one's, so it is constrained too.
IMPORTED = "imported"
BANK_METHODS = METHODS + (IMPORTED,)  # what a bank file's concepts may record
# Methods whose bases B stay orthogonal to earlier concepts' (``lora`` is the unconstrained baseline).
CONSTRAINED_METHODS = ("seqlora", "alternating", "frozen-basis", IMPORTED)
# The memory setting: "default" or a "+"-joined set of levers (method/trainer.py, memory_levers)
MEMORY_LEVERS = ("low", "checkpoint", "slice")
# Target presets (``method.targets`` explains them): regular expressions over canonical layer
# names. Here, not in ``method/``, because ``bank.fingerprint`` samples the ``full`` preset's UNet
# layers and ``bank/`` never imports ``method/``.
TEXT_ATTENTION = r"^text_encoder\..*self_attn\.(q|k|v|out)_proj$"
PRESETS: dict[str, list[str]] = {
    "default": [r"^unet\..*attn2\.to_[kv]$", TEXT_ATTENTION],
    "unet-cross": [r"^unet\..*attn2\.to_[kv]$"],
    "full": [r"^unet\..*attn[12]\.(to_q|to_k|to_v|to_out\.0)$", TEXT_ATTENTION],
}
# Regional composition (``sampling.confined``): each prompt with only the concepts it names
# ("confined"), or every concept on every prompt ("global"). The default follows bench/RESULTS.md,
# "Regional composition: confined against global residuals".
RESIDUAL_MODES = ("global", "confined")
DEFAULT_RESIDUALS = "confined"
MEMORY_MODES = ("default", "low", "checkpoint", "slice", "low+checkpoint", "low+slice", "checkpoint+slice",
                "low+checkpoint+slice")


def _number(x: float | None) -> str:
    """A bound or value as a user reads it: whole numbers whole (a seed's 4294967295, not 4.29497e+09)."""
    if x is None:
        return "none"
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


@dataclass(frozen=True)
class Setting:
    """One training knob as every surface shows it."""
    name: str  # TrainSettings field, node input and widget name; the CLI flag is --name-with-dashes
    kind: type  # int, float or str
    default: Any
    label: str
    help: str
    symbol: str = ""  # the paper's symbol (DESIGN.md §3), shown beside the label
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    step: float | None = None  # widget increment (ComfyUI, gradio)
    multiple: int | None = None  # the value must be a multiple of this (resolution: the VAE's factor 8)
    advanced: bool = False  # folded away where the host allows

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def title(self) -> str:
        return f"{self.label} ({self.symbol})" if self.symbol else self.label

    def coerce(self, value: Any) -> Any:
        """``value`` as this setting's type, checked against its choices and range (one sentence)."""
        try:
            if self.kind is int:
                out = int(value) if float(value) == int(float(value)) else None
                if out is None:
                    raise ValueError
            else:
                out = self.kind(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            raise InputError(f"{self.label} must be {'a whole number' if self.kind is int else 'a number' if self.kind is float else 'text'}, "
                             f"not {value!r}.") from None
        if self.choices is not None and out not in self.choices:
            raise InputError(f"{self.label} must be one of {', '.join(self.choices)}, not {out!r}.")
        if isinstance(out, float) and not math.isfinite(out):  # NaN passes every comparison below
            raise InputError(f"{self.label} must be a finite number, not {out}.")
        if (self.min is not None and out < self.min) or (self.max is not None and out > self.max):
            raise InputError(f"{self.label} must be between {_number(self.min)} and {_number(self.max)}, not {_number(out)}.")
        if self.multiple and out % self.multiple:
            raise InputError(f"{self.label} must be a multiple of {self.multiple}, not {_number(out)}.")
        return out


TRAINING_SETTINGS: tuple[Setting, ...] = (
    Setting("method", str, "seqlora", "Method",
            "seqlora: bilevel training of both factors with the cross-Hessian term; alternating: the same "
            "without it (faster); frozen-basis: a random fixed basis (Orthogonal Adaptation); lora: "
            "unconstrained, for comparison only", choices=METHODS),
    Setting("rank", int, 4, "Rank", "columns of A and B per layer; a layer of width m holds m / r concepts",
            symbol="r", min=1, max=64),
    Setting("steps", int, 200, "Steps", "minibatches; each runs K bilevel iterations on fixed images, noise and timesteps",
            min=1, max=100000),
    Setting("bilevel_iters", int, 3, "Bilevel iterations", "bilevel iterations per minibatch", symbol="K", min=1, max=20),
    Setting("inner_steps", int, 2, "Inner steps", "inner A steps kept differentiable in B per iteration",
            symbol="T", min=1, max=10),
    Setting("resolution", int, 512, "Resolution", "training size in pixels (square; 64 on the tiny test model)",
            min=64, max=1024, step=64, multiple=8),
    Setting("lr_a", float, 1e-4, "Learning rate A", "step size of the output factors A", symbol="α",
            min=0.0, max=1.0, step=1e-5),
    Setting("lr_b", float, 1e-4, "Learning rate B", "step size of the projected basis step", symbol="β",
            min=0.0, max=1.0, step=1e-5),
    Setting("lr_embedding", float, 5e-3, "Learning rate embedding", "step size of the concept token's embedding",
            min=0.0, max=1.0, step=1e-4),
    Setting("seed", int, 0, "Seed", "draws of images, noise, timesteps and the initial basis", min=0, max=2**32 - 1),
    Setting("batch_size", int, 1, "Batch size", "images per minibatch", min=1, max=64, advanced=True),
    Setting("optimizer", str, "adam", "Optimizer", "adam, or sgd for the paper's plain gradient steps",
            choices=("adam", "sgd"), advanced=True),
    Setting("hypergradient", str, "paper", "Hypergradient",
            "truncated: the cross-Hessian term of the last inner step (back-propagation through it); "
            "paper: of the first inner step, as published (DESIGN §3); unrolled: back-propagate through all "
            "T inner steps (T twice-differentiated passes)", choices=("truncated", "paper", "unrolled"), advanced=True),
    Setting("targets", str, "default", "Target layers",
            "default | unet-cross (no text encoder) | full | comma-separated regular expressions over layer names", advanced=True),
    Setting("memory", str, "default", "Memory",
            "low: build the twice-differentiated graph only after A⁺ is known, so it is never held while "
            "other passes run (lower peak, one extra forward and backward per iteration; seqlora with the "
            "truncated or paper hypergradient); checkpoint: recompute the UNet blocks' activations of that pass in its "
            "backward instead of keeping them (same gradients, more compute); slice: that pass computes "
            "attention 1024 queries at a time (lower transient peak at 512 px); levers combine with +",
            choices=MEMORY_MODES, advanced=True),
    Setting("eps", float, 1e-8, "Projector ε", "regularisation of the null-space projector (used by new banks only)",
            symbol="ε", min=0.0, max=1e-2, step=1e-9, advanced=True),
    Setting("stats_q", int, 8, "Activation eigenpairs",
            "top eigenpairs of each layer's input second moment stored with the concept (for merge rebases "
            "and interference); 0 stores none", symbol="q", min=0, max=64, advanced=True),
)
SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in TRAINING_SETTINGS}

TrainSettings = dataclasses.make_dataclass(
    "TrainSettings", [(s.name, s.kind, dataclasses.field(default=s.default)) for s in TRAINING_SETTINGS],
    namespace={"__doc__": "The settings of one concept's training (fields: :data:`TRAINING_SETTINGS`).",
               "__module__": __name__})


def train_settings(values: Mapping[str, Any]) -> TrainSettings:
    """Settings from any surface's values: missing or None → default; each checked (one sentence)."""
    unknown = set(values) - set(SETTINGS_BY_NAME)
    if unknown:
        raise InputError(f"Unknown training setting(s): {', '.join(sorted(unknown))}.")
    return TrainSettings(**{s.name: s.default if values.get(s.name) is None else s.coerce(values[s.name])
                            for s in TRAINING_SETTINGS})
