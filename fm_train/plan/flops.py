"""Training FLOPs per token and parameter counts: the one formula behind the planner's FLOPs and the
engine's MFU, the model family's (``ModelFamily.flops_per_token``; Llama's is in
:mod:`fm_train.families.llama_shape`). Activation recomputation is never counted, so MFU stays
comparable across checkpointing settings (that is what makes it "model" FLOPs).
"""

from __future__ import annotations

from typing import Any

from fm_train.families import family_of


def parameter_count(shape: Any) -> int:
    """Exact number of trainable parameters of a ``model`` config (or shape arguments), without building it."""
    return family_of(shape).parameter_count(shape)


def flops_per_token(shape: Any, seq_len: int) -> float:
    """Model FLOPs for one trained token (forward + backward) at sequence length ``seq_len``."""
    return family_of(shape).flops_per_token(shape, seq_len)


def flops_per_step(shape: Any, seq_len: int, tokens_per_step: int) -> float:
    """Model FLOPs of one optimizer step over ``tokens_per_step`` tokens."""
    return flops_per_token(shape, seq_len) * tokens_per_step
