"""Names every layer of SeqLoRA agrees on, with no dependencies: the training methods.

A leaf module so that storage (``bank``), the optimiser (``method``) and every front end can
share one list without importing each other.
"""
METHODS = ("seqlora", "alternating", "frozen-basis", "lora")
# Methods whose bases B stay orthogonal to earlier concepts' (``lora`` is the unconstrained baseline).
CONSTRAINED_METHODS = ("seqlora", "alternating", "frozen-basis")
