"""The null-space projector and the overlap checks, where the method's code and its users import
them from; they live in ``seqlora_core.linalg.projector``, a floor below both ``method/`` and
``bank/`` (ARCHITECTURE.md)."""
from ..linalg.projector import (  # noqa: F401
    BatchedProjection, NullSpaceProjector, block_overlaps, normalised_overlap, orthonormal_factors,
    probably_orthogonal,
)
