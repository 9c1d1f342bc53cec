"""Sampling with a bank: global composition (``generate``), regional cross-attention (``regions``),
sketch / keypose control (``control``, ``keypose``)."""
