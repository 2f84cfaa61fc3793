"""Training FLOPs per token, the one formula behind the planner's FLOPs and the engine's MFU.

    flops_per_token = 6 * N_matmul + 12 * n_layers * hidden * seq_len

``N_matmul`` counts the parameters that take part in a matrix multiply: every projection of every
block plus the output head (``hidden * vocab``; counted even when tied, because the head is a matmul).
The input embedding is a lookup and the norms are elementwise, so neither is counted. The factor 6 is
forward (2) + backward (4) per parameter and token; ``12 * L * h * s`` is the attention score and
value matmuls (QK^T and AV, forward + backward) with no discount for the causal mask, as in PaLM
(Chowdhery et al. 2022, appendix B) and Megatron-LM. Activation recomputation is *not* counted, so
MFU stays comparable across checkpointing settings (that is what makes it "model" FLOPs).
"""

from __future__ import annotations

from typing import Protocol


class ModelShape(Protocol):
    """What the formulas need of a model: ``fm_train.config.ModelConfig`` and ``LlamaArgs`` both fit."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    vocab_size: int
    padded_vocab_size: int  # embedding and head rows (the padding is computed too)
    tie_embeddings: bool
    qkv_bias: bool


def parameter_count(shape: ModelShape) -> int:
    """Exact number of trainable parameters (tied embeddings counted once), without building the model."""
    h, f = shape.hidden, shape.ffn_hidden
    kv = shape.n_kv_heads * (h // shape.n_heads)
    attn = 2 * h * h + 2 * h * kv + ((2 * h + 2 * kv) if shape.qkv_bias else 0)
    block = attn + 3 * h * f + 2 * h  # projections + two RMSNorm weights
    embed = shape.padded_vocab_size * h
    head = 0 if shape.tie_embeddings else shape.padded_vocab_size * h
    return shape.n_layers * block + h + embed + head


def matmul_params(shape: ModelShape) -> int:
    """Parameters that take part in a matmul (blocks' projections and the output head)."""
    h, f, kv = shape.hidden, shape.ffn_hidden, shape.n_kv_heads * (shape.hidden // shape.n_heads)
    per_block = 2 * h * h + 2 * h * kv + 3 * h * f
    return shape.n_layers * per_block + h * shape.padded_vocab_size


def flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Model FLOPs for one trained token (forward + backward) at sequence length ``seq_len``."""
    return 6.0 * matmul_params(shape) + 12.0 * shape.n_layers * shape.hidden * seq_len


def flops_per_step(shape: ModelShape, seq_len: int, tokens_per_step: int) -> float:
    """Model FLOPs of one optimizer step over ``tokens_per_step`` tokens."""
    return flops_per_token(shape, seq_len) * tokens_per_step
