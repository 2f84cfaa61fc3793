"""The Llama family's size formulas (torch-free): parameters, model FLOPs, and the memory terms.

Model FLOPs per token::

    flops_per_token = 6 * N_matmul + 12 * n_layers * hidden * seq_len

``N_matmul`` counts the parameters that take part in a matrix multiply: every projection of every
block plus the output head (``hidden * vocab``; counted even when tied, because the head is a matmul).
The input embedding is a lookup and the norms are elementwise, so neither is counted. The factor 6 is
forward (2) + backward (4) per parameter and token; ``12 * L * h * s`` is the attention score and
value matmuls (QK^T and AV, forward + backward) with no discount for the causal mask, as in PaLM
(Chowdhery et al. 2022, appendix B) and Megatron-LM. Activation recomputation is *not* counted, so
MFU stays comparable across checkpointing settings (that is what makes it "model" FLOPs).

Activations per block follow Korthikanti et al. 2022 adapted to a SwiGLU block with fused (SDPA)
attention, so no ``seq x seq`` score matrix is stored.

``shape`` is anything with the model fields (``fm_train.config.ModelConfig`` or ``LlamaArgs``);
``cfg`` is the whole ``FmConfig``.
"""

from __future__ import annotations

import math
from typing import Any


def _kv_width(shape: Any) -> int:
    return shape.n_kv_heads * (shape.hidden // shape.n_heads)


def block_matmul_params(shape: Any) -> int:
    """Parameters of one block's projections (q, k, v, o, gate, up, down)."""
    h, kv = shape.hidden, _kv_width(shape)
    return 2 * h * h + 2 * h * kv + 3 * h * shape.ffn_hidden


def parameter_count(shape: Any) -> int:
    """Exact number of trainable parameters (tied embeddings counted once), without building the model."""
    h, kv = shape.hidden, _kv_width(shape)
    bias = (2 * h + 2 * kv) if shape.qkv_bias else 0
    block = block_matmul_params(shape) + bias + 2 * h  # projections + biases + two RMSNorm weights
    embed = shape.padded_vocab_size * h
    head = 0 if shape.tie_embeddings else shape.padded_vocab_size * h
    return shape.n_layers * block + h + embed + head


def matmul_params(shape: Any) -> int:
    """Parameters that take part in a matmul (blocks' projections and the output head)."""
    return shape.n_layers * block_matmul_params(shape) + shape.hidden * shape.padded_vocab_size


def flops_per_token(shape: Any, seq_len: int) -> float:
    """Model FLOPs for one trained token (forward + backward) at sequence length ``seq_len``."""
    return 6.0 * matmul_params(shape) + 12.0 * shape.n_layers * shape.hidden * seq_len


def stage_params(cfg: Any) -> int:
    """Parameters held by the largest pipeline stage, before tensor-parallel splitting."""
    m, pp = cfg.model, cfg.parallel.pp
    total = parameter_count(m)
    if pp == 1:
        return total
    embed = m.padded_vocab_size * m.hidden
    head = embed  # tied: the last stage holds a copy of the embedding; untied: its own head
    per_block = (total - embed - (0 if m.tie_embeddings else head) - m.hidden) // m.n_layers
    most_blocks = math.ceil(m.n_layers / pp)
    return max(embed + most_blocks * per_block, head + m.hidden + most_blocks * per_block)


def activation_bytes_per_layer(cfg: Any) -> float:
    """Bytes one block keeps for backward, per micro-batch, without recomputation."""
    m, tp = cfg.model, cfg.parallel.tp
    s, b, h, f = cfg.data.seq_len, cfg.train.micro_batch, m.hidden, m.ffn_hidden
    kv = _kv_width(m)
    elt = 4 if cfg.precision == "fp32" else 2
    # Both norms' inputs and outputs: whole on every tp rank, or split with the sequence inside tp. With the
    # split each region's gathered input is kept as this rank's chunk and gathered again in backward; when
    # blocks are recomputed that is off, and the recomputed block keeps it whole.
    p = cfg.parallel
    if p.tp_sequence_parallel and tp > 1:
        replicated = 6 * h / tp if not p.activation_checkpointing else 4 * h / tp + 2 * h
    else:
        replicated = 4 * h
    # q/k/v, attention out + o_proj input, gate/up/product (SwiGLU recomputes silu(gate) in backward;
    # the norms keep their input and output only: bench/bench_kernels.py block measures these terms)
    sharded = (h + 2 * kv) + 2 * h + 3 * f
    return s * b * (replicated + sharded / tp) * elt


def config_errors(cfg: Any) -> list[str]:
    """The decoder's own rules on a whole config: RoPE rotates pairs, so a head needs an even width."""
    m = cfg.model
    if m.hidden % m.n_heads == 0 and (m.hidden // m.n_heads) % 2 != 0:
        return [f"model.hidden / model.n_heads = {m.hidden // m.n_heads} is odd; RoPE needs an even head size"]
    return []
