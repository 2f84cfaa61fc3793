"""Training FLOPs of a step: the one formula behind the planner's FLOPs and the engine's MFU is the
model family's (``FamilySpec.sizes.flops_per_token``; Llama's in :mod:`fm_train.families.llama.shape`).
Activation recomputation is never counted, so MFU stays comparable across checkpointing settings
(that is what makes it "model" FLOPs).
"""

from __future__ import annotations

from typing import Any

from fm_train.families.spec import FamilySpec


def flops_per_step(family: FamilySpec, shape: Any, seq_len: int, tokens_per_step: int) -> float:
    """Model FLOPs of one optimizer step over ``tokens_per_step`` tokens of a ``family`` model of ``shape``."""
    return family.sizes.flops_per_token(shape, seq_len) * tokens_per_step
