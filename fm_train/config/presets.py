"""Named model shapes that a config can pick with ``model.preset`` and then override field by field.

The shapes follow the published architectures so that a converted checkpoint has the familiar
``config.json``: TinyLlama-1.1B, Llama-2 7B/13B and Llama-3 8B/70B; BERT-base and BERT-large for
encoders. ``tiny`` and ``bert-tiny`` are the test and demo sizes.
"""

from __future__ import annotations

from typing import Any

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Test and demo size: trains on 2 CPU cores in minutes.
    "tiny": dict(n_layers=4, hidden=128, n_heads=4, n_kv_heads=2, ffn_hidden=344, vocab_size=8192,
                 max_seq_len=256, tie_embeddings=True, rope_theta=10000.0),
    # GPT-3 "small" width and depth with a Llama block.
    "125m": dict(n_layers=12, hidden=768, n_heads=12, n_kv_heads=12, ffn_hidden=2048, vocab_size=32000,
                 max_seq_len=2048, tie_embeddings=True, rope_theta=10000.0),
    # TinyLlama/TinyLlama-1.1B shape.
    "1.1b": dict(n_layers=22, hidden=2048, n_heads=32, n_kv_heads=4, ffn_hidden=5632, vocab_size=32000,
                 max_seq_len=2048, tie_embeddings=False, rope_theta=10000.0),
    # Llama-2 7B and 13B shapes.
    "7b": dict(n_layers=32, hidden=4096, n_heads=32, n_kv_heads=32, ffn_hidden=11008, vocab_size=32000,
               max_seq_len=4096, tie_embeddings=False, rope_theta=10000.0),
    "13b": dict(n_layers=40, hidden=5120, n_heads=40, n_kv_heads=40, ffn_hidden=13824, vocab_size=32000,
                max_seq_len=4096, tie_embeddings=False, rope_theta=10000.0),
    # Llama-3 8B shape.
    "8b": dict(n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=128256,
               max_seq_len=8192, tie_embeddings=False, rope_theta=500000.0),
    # Llama-3 70B shape.
    "70b": dict(n_layers=80, hidden=8192, n_heads=64, n_kv_heads=8, ffn_hidden=28672, vocab_size=128256,
                max_seq_len=8192, tie_embeddings=False, rope_theta=500000.0),
    # Encoders (model.family: bert). Test and demo size, the width of Google's BERT-Tiny.
    "bert-tiny": dict(family="bert", n_layers=2, hidden=128, n_heads=2, n_kv_heads=2, ffn_hidden=512,
                      vocab_size=8192, max_seq_len=256, tie_embeddings=True, norm_eps=1e-12, type_vocab_size=2),
    # BERT-base and BERT-large (Devlin et al. 2019), with bert-base-uncased's vocabulary size.
    "bert-base": dict(family="bert", n_layers=12, hidden=768, n_heads=12, n_kv_heads=12, ffn_hidden=3072,
                      vocab_size=30522, max_seq_len=512, tie_embeddings=True, norm_eps=1e-12, type_vocab_size=2),
    "bert-large": dict(family="bert", n_layers=24, hidden=1024, n_heads=16, n_kv_heads=16, ffn_hidden=4096,
                       vocab_size=30522, max_seq_len=512, tie_embeddings=True, norm_eps=1e-12, type_vocab_size=2),
    # Mixture-of-Experts decoders (model.family: moe, Qwen3-MoE math: RMSNorm on each query and key head).
    # Test and demo size.
    "moe-tiny": dict(family="qwen3_moe", n_layers=4, hidden=128, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden=344,
                     vocab_size=8192, max_seq_len=256, tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-6,
                     moe=dict(experts=8, top_k=2, expert_ffn_hidden=128, dense_layers=1, norm_topk_prob=True,
                              aux_loss_coef=0.01, z_loss_coef=0.001)),
    # The shapes of OLMoE-1B-7B (Muennighoff et al. 2024), Qwen3-30B-A3B and Mixtral-8x7B; what each
    # block computes is Qwen3-MoE's (OLMoE normalises q and k over all heads, Mixtral not at all).
    "olmoe-1b-7b": dict(family="qwen3_moe", n_layers=16, hidden=2048, n_heads=16, n_kv_heads=16, head_dim=128,
                        ffn_hidden=1024, vocab_size=50304, max_seq_len=4096, tie_embeddings=False, rope_theta=10000.0,
                        norm_eps=1e-5, moe=dict(experts=64, top_k=8, expert_ffn_hidden=1024, norm_topk_prob=False,
                                                aux_loss_coef=0.01, z_loss_coef=0.001)),
    "qwen3-30b-a3b": dict(family="qwen3_moe", n_layers=48, hidden=2048, n_heads=32, n_kv_heads=4, head_dim=128,
                          ffn_hidden=6144, vocab_size=151936, max_seq_len=40960, tie_embeddings=False,
                          rope_theta=1000000.0, norm_eps=1e-6,
                          moe=dict(experts=128, top_k=8, expert_ffn_hidden=768, norm_topk_prob=True,
                                   aux_loss_coef=0.001)),
    "mixtral-8x7b": dict(family="qwen3_moe", n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, head_dim=128,
                         ffn_hidden=14336, vocab_size=32000, max_seq_len=32768, tie_embeddings=False,
                         rope_theta=1000000.0, norm_eps=1e-5,
                         moe=dict(experts=8, top_k=2, expert_ffn_hidden=14336, norm_topk_prob=True,
                                  aux_loss_coef=0.02)),
}


def preset_names() -> list[str]:
    """The preset names, in order of size."""
    return list(MODEL_PRESETS)
