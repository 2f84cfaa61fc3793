"""The BERT family's size formulas (torch-free): parameters, model FLOPs, and the memory terms.

Model FLOPs per token are ``6 * N_matmul + 12 * n_layers * hidden * seq_len``, as for the decoder
(:mod:`fm_train.families.llama.shape`): ``N_matmul`` is each block's q, k, v, output, intermediate
and output projections plus the MLM head's transform and decoder (``hidden * vocab``, tied to the
word embeddings but a matmul all the same). The embeddings are lookups, LayerNorms elementwise.
The head runs on the masked positions only (training gives the model its labels), so it counts for
their share of a window (:func:`head_tokens`), not for every position as in ``BertForMaskedLM``.
"""

from __future__ import annotations

import math
from typing import Any


def block_matmul_params(shape: Any) -> int:
    """Parameters of one block's projections (q, k, v, attention output, intermediate, output)."""
    h = shape.hidden
    return 4 * h * h + 2 * h * shape.ffn_hidden


def _embeddings(shape: Any) -> int:
    """Word, position and token-type embeddings and their LayerNorm."""
    h = shape.hidden
    return shape.padded_vocab_size * h + shape.max_seq_len * h + shape.type_vocab_size * h + 2 * h


def _block(shape: Any) -> int:
    """One encoder block: its projections, their biases, two LayerNorms."""
    h = shape.hidden
    return block_matmul_params(shape) + 4 * h + shape.ffn_hidden + h + 2 * 2 * h


def _head(shape: Any) -> int:
    """The prediction transform (dense + LayerNorm) and the decoder's bias (its weight is the embedding)."""
    h = shape.hidden
    return h * h + h + 2 * h + shape.padded_vocab_size


def parameter_count(shape: Any) -> int:
    """Exact number of trainable parameters (the decoder tied to the word embeddings, counted once)."""
    return _embeddings(shape) + shape.n_layers * _block(shape) + _head(shape)


def _masked(seq_len: int) -> int:
    """Positions of a window the loss predicts (the loader's fixed count per sample, at most)."""
    from data_shards.masking import masked_per_sample

    return masked_per_sample(seq_len)


def head_tokens(cfg: Any) -> int:
    """Tokens of one micro-batch the prediction head computes: the masked ones, at most."""
    return cfg.train.micro_batch * _masked(cfg.data.seq_len)


def flops_per_token(shape: Any, seq_len: int) -> float:
    """Model FLOPs for one trained token (forward + backward) at sequence length ``seq_len``: the blocks for
    every token, the head (transform and decoder) for the masked share of them."""
    head = (shape.hidden * shape.hidden + shape.hidden * shape.padded_vocab_size) * _masked(seq_len) / seq_len
    return 6.0 * (shape.n_layers * block_matmul_params(shape) + head) + 12.0 * shape.n_layers * shape.hidden * seq_len


def stage_params(cfg: Any) -> int:
    """An upper bound on the parameters of the largest pipeline stage, before tensor-parallel splitting:
    the first stage holds the embeddings, the last the head and a copy of the word embeddings (the tied
    decoder), and either may hold the most blocks (the planner sizes memory for the worst stage)."""
    m, pp = cfg.model, cfg.parallel.pp
    if pp == 1:
        return parameter_count(m)
    first, last = _embeddings(m), m.padded_vocab_size * m.hidden + _head(m)
    return max(first, last) + math.ceil(m.n_layers / pp) * _block(m)


def activation_bytes_per_layer(cfg: Any) -> float:
    """Bytes one post-LN block keeps for backward, per micro-batch, without recomputation (the
    decoder's accounting, Korthikanti et al. 2022, for q/k/v, attention, two LayerNorms and a GELU MLP)."""
    m, tp = cfg.model, cfg.parallel.tp
    s, b, h, f = cfg.data.seq_len, cfg.train.micro_batch, m.hidden, m.ffn_hidden
    elt = 4 if cfg.precision == "fp32" else 2
    replicated = 4 * h  # both LayerNorms' inputs and outputs
    sharded = 3 * h + 2 * h + 2 * f  # q/k/v, attention out + dense input, intermediate and GELU outputs
    return s * b * (replicated + sharded / tp) * elt


def config_errors(cfg: Any) -> list[str]:
    """The encoder's own rules on a whole config: no grouped-query attention, the decoder tied to the embedding."""
    m = cfg.model
    errors = []
    if m.n_kv_heads != m.n_heads:
        errors.append(f"model.n_kv_heads={m.n_kv_heads} differs from model.n_heads={m.n_heads}: BERT has no"
                      " grouped-query attention; set them equal (the bert-* presets do)")
    if not m.tie_embeddings:
        errors.append("model.tie_embeddings=false: BERT's MLM decoder is the word embedding; set it to true")
    if cfg.parallel.sp > 1:  # a chunk's share of the masked tokens varies: its mean loss would be misweighted
        errors.append(f"parallel.sp={cfg.parallel.sp}: the bert family is not sequence-parallel (its loss counts only"
                      " the masked tokens, which the sp ranks' chunks hold unequal shares of); set parallel.sp=1")
    if cfg.parallel.tp_sequence_parallel:
        errors.append("parallel.tp_sequence_parallel=true: the bert family does not split the sequence inside tensor"
                      " parallelism (its prediction head's transform runs outside the tp regions); turn it off")
    if cfg.data.document_masking:
        errors.append("data.document_masking=true: the bert family does not keep attention within documents"
                      " (its samples are single sequences with [CLS]/[SEP]); set data.document_masking=false")
    return errors
