"""The MoE family's size formulas (torch-free): total and active parameters, model FLOPs, memory terms.

Model FLOPs per token count the *active* parameters, those one token's forward and backward multiply
with: attention, the router, the k chosen experts of every routed block (the dense MLP in the first
``dense_layers``) and the output head::

    flops_per_token = 6 * N_active_matmul + 12 * n_layers * (n_heads * head_dim) * seq_len

as the Llama family's formula (PaLM appendix B) with the experts a token does not reach left out;
that is the MFU numerator every MoE system reports (Megatron-Core, torchtitan). ``shape`` is a
``ModelConfig`` (routing under ``shape.moe``) or the module's ``MoEArgs`` (routing fields on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    experts: int
    top_k: int
    expert_ffn: int
    dense_layers: int
    vocab_rows: int
    tied: bool


def _shape(shape: Any) -> _Shape:
    """The fields the formulas read, from a ``ModelConfig`` or a ``MoEArgs``."""
    moe = getattr(shape, "moe", None)
    if moe is not None:  # a ModelConfig
        experts, top_k, dense = moe.experts, moe.top_k, moe.dense_layers
        expert_ffn = moe.expert_ffn_hidden or shape.ffn_hidden
        head_dim = shape.head_dim or shape.hidden // shape.n_heads
    else:  # MoEArgs
        experts, top_k, dense, expert_ffn = shape.experts, shape.top_k, shape.dense_layers, shape.expert_ffn_hidden
        head_dim = shape.head_dim
    return _Shape(shape.n_layers, shape.hidden, shape.n_heads, shape.n_kv_heads, head_dim, shape.ffn_hidden,
                  experts, top_k, expert_ffn, min(dense, shape.n_layers), shape.padded_vocab_size,
                  shape.tie_embeddings)


def _attention(s: _Shape) -> int:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return 2 * s.hidden * q + 2 * s.hidden * kv


def _expert(s: _Shape) -> int:
    return 3 * s.hidden * s.expert_ffn


def _blocks(s: _Shape, experts_reached: int) -> int:
    """Matmul parameters of all blocks when each routed token reaches ``experts_reached`` experts."""
    routed = s.layers - s.dense_layers
    return (s.layers * _attention(s) + s.dense_layers * 3 * s.hidden * s.ffn
            + routed * (s.experts * s.hidden + experts_reached * _expert(s)))


def parameter_count(shape: Any) -> int:
    """Exact number of trainable parameters, every expert included (tied embeddings counted once)."""
    s = _shape(shape)
    norms = s.layers * (2 * s.hidden + 2 * s.head_dim) + s.hidden  # block norms, q/k norms, final norm
    embed = s.vocab_rows * s.hidden
    return _blocks(s, s.experts) + norms + embed + (0 if s.tied else embed)


def active_parameter_count(shape: Any) -> int:
    """Parameters one token uses: as :func:`parameter_count` with only its k experts per routed block."""
    s = _shape(shape)
    return parameter_count(shape) - (s.layers - s.dense_layers) * (s.experts - s.top_k) * _expert(s)


def expert_parameter_count(shape: Any) -> int:
    """Parameters of all experts of all routed blocks (what expert parallelism splits)."""
    s = _shape(shape)
    return (s.layers - s.dense_layers) * s.experts * _expert(s)


def block_matmul_params(shape: Any) -> int:
    """Matmul parameters of the largest block before any splitting (ZeRO-3's gathered working set)."""
    s = _shape(shape)
    routed = s.experts * s.hidden + s.experts * _expert(s)
    return _attention(s) + max(routed if s.dense_layers < s.layers else 0, 3 * s.hidden * s.ffn if s.dense_layers else 0)


def flops_per_token(shape: Any, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward + backward) on the active parameters."""
    s = _shape(shape)
    return 6.0 * (_blocks(s, s.top_k) + s.hidden * s.vocab_rows) + 12.0 * s.layers * s.heads * s.head_dim * seq_len


def stage_params(cfg: Any) -> int:
    """Parameters held by the largest pipeline stage, before tensor- and expert-parallel splitting."""
    m, pp = cfg.model, cfg.parallel.pp
    total = parameter_count(m)
    if pp == 1:
        return total
    s = _shape(m)
    embed = s.vocab_rows * s.hidden
    per_block = (total - embed - (0 if s.tied else embed) - s.hidden) // s.layers
    most_blocks = math.ceil(s.layers / pp)
    return max(embed + most_blocks * per_block, embed + s.hidden + most_blocks * per_block)


def activation_bytes_per_layer(cfg: Any) -> float:
    """Bytes one routed block keeps for backward, per micro-batch, without recomputation.

    Attention as the Llama family's (q of ``n_heads * head_dim``); the routed part keeps the router's
    logits and fp32 probabilities (2 x E per token) and, for each of a token's k copies, the copy, the
    gate/up output, the SwiGLU product and the expert's output (2h + 3f).
    """
    s, tp = _shape(cfg.model), cfg.parallel.tp
    seq, b = cfg.data.seq_len, cfg.train.micro_batch
    elt = 4 if cfg.precision == "fp32" else 2
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attention = 4 * s.hidden + (q + 2 * kv + q + q) / tp
    routed = 2 * s.experts * 4 / elt + s.top_k * (2 * s.hidden + 3 * s.expert_ffn)
    return seq * b * (attention + routed) * elt


def dispatch_bytes(cfg: Any) -> float:
    """Bytes of the expert-parallel token exchange on the busiest rank, per micro-batch (0 at ep = 1).

    The exchange runs one routed block at a time: the receive buffer of the k copies of every token
    and the buffer of their results on the way back are in flight together (2 x tokens x k x hidden),
    and each routed block of the stage keeps its expert-order index for backward (8 bytes a copy).
    Balanced routing is assumed: a rank receives as many copies as it sends; a skewed router raises
    the receive side by up to the load's max/mean (``moe_load_max_mean`` in the metrics).
    """
    if cfg.parallel.ep == 1:
        return 0.0
    s = _shape(cfg.model)
    elt = 4 if cfg.precision == "fp32" else 2
    copies = cfg.data.seq_len * cfg.train.micro_batch * s.top_k
    routed_here = math.ceil((s.layers - s.dense_layers) / cfg.parallel.pp)
    return 2 * copies * s.hidden * elt + routed_here * copies * 8


def config_errors(cfg: Any) -> list[str]:
    """The MoE family's rules on a whole config, each naming the field and the fix."""
    m = cfg.model
    if m.moe is None:
        if m.init_from is not None:  # the section comes from init_from, whose own error says why it could not
            return []
        return ["model.family=qwen3_moe needs the model.moe section (experts, top_k, expert_ffn_hidden, ...); start from"
                " model.preset: moe-tiny, or write model.moe: {experts: 8, top_k: 2}"]
    e = m.moe
    errors = []
    head_dim = m.head_dim or m.hidden // m.n_heads
    if m.head_dim is None and m.hidden % m.n_heads:
        errors.append(f"model.hidden={m.hidden} is not a multiple of model.n_heads={m.n_heads}; set model.head_dim")
    elif head_dim % 2:
        errors.append(f"the head width {head_dim} is odd; RoPE needs an even model.head_dim")
    if e.top_k > e.experts:
        errors.append(f"model.moe.top_k={e.top_k} exceeds model.moe.experts={e.experts}: a token cannot reach more"
                      " experts than there are; lower top_k or add experts")
    if e.dense_layers >= m.n_layers:
        errors.append(f"model.moe.dense_layers={e.dense_layers} leaves none of the model.n_layers={m.n_layers}"
                      " blocks routed; lower it (or train model.family: llama)")
    if e.capacity_factor is not None and e.capacity_factor < 1.0:
        errors.append(f"model.moe.capacity_factor={e.capacity_factor} is below 1.0: even a perfectly balanced router"
                      " would drop tokens (each expert's share of a micro-batch is tokens * top_k / experts);"
                      " set it to at least 1.0, or null for dropless routing")
    if cfg.precision == "fp16":
        errors.append("precision=fp16 with model.family=qwen3_moe: the router losses enter backward inside the blocks,"
                      " past DeepSpeed's fp16 loss scaling; use precision=bf16 (or fp32)")
    if cfg.parallel.sp > 1:  # load balancing is a function of a whole micro-batch's routing, not of a chunk's
        errors.append(f"parallel.sp={cfg.parallel.sp}: the qwen3_moe family is not sequence-parallel yet (its"
                      " routers' load-balancing loss would be computed on each rank's chunk of the tokens, not on"
                      " the whole micro-batch as one process does); set parallel.sp=1")
    if cfg.parallel.tp_sequence_parallel:  # the routed blocks would route each tp rank's chunk of the tokens
        errors.append("parallel.tp_sequence_parallel=true: the qwen3_moe family does not split the sequence inside"
                      " tensor parallelism yet (its routed blocks sit outside the tp regions and would route each"
                      " tp rank's chunk alone); turn it off")
    return errors
