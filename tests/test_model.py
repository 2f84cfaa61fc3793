"""The pure model against transformers' LlamaForCausalLM: same keys, same logits; seeded init."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from fm_train.config import build_config
from fm_train.families import family_of
from fm_train.families.llama.model import LlamaArgs, LlamaForCausalLM, causal_lm_loss

pytestmark = pytest.mark.unit


def _args(**kw) -> LlamaArgs:
    base = dict(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, ffn_hidden=172, vocab_size=512, max_seq_len=64)
    return LlamaArgs(**{**base, **kw})


def _hf_config(a: LlamaArgs) -> LlamaConfig:
    return LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden, intermediate_size=a.ffn_hidden,
                       num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                       max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                       tie_word_embeddings=a.tie_embeddings, attention_bias=a.qkv_bias)


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False), dict(qkv_bias=True), dict(n_kv_heads=4, rope_theta=500000.0)])
def test_logits_equal_transformers(kw):
    args = _args(**kw)
    ours = LlamaForCausalLM(args)
    ours.init_weights(3)
    if args.qkv_bias:  # zero-init biases would not exercise the key map
        with torch.no_grad():
            for layer in ours.model.layers:
                layer.self_attn.q_proj.bias.normal_()
    hf = HFLlama(_hf_config(args))
    hf.load_state_dict(ours.state_dict(), strict=True)
    tokens = torch.randint(0, args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=0, atol=1e-5)


def test_init_is_seeded_by_name_and_layout_free():
    a, b = LlamaForCausalLM(_args()), LlamaForCausalLM(_args())
    torch.manual_seed(123)  # global RNG state must not matter
    a.init_weights(5)
    b.init_weights(5)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    deeper = LlamaForCausalLM(_args(n_layers=3))
    deeper.init_weights(5)
    # A parameter's values depend on its name, not on how many blocks come before it.
    assert torch.equal(deeper.model.layers[1].mlp.up_proj.weight, a.model.layers[1].mlp.up_proj.weight)


def test_seeded_slices_are_drawn_alone_from_the_tiles_they_overlap(monkeypatch):
    """A tp shard of rows or columns, an expert-parallel rank's experts and a ZeRO-3 flat range equal the
    same slice of the whole parameter, and a shard draws only the tiles it overlaps."""
    import fm_train.model.base as base
    from fm_train.families.qwen3_moe.model import MoEArgs
    from fm_train.parallel.sharded_init import full_init, initial_flat, initial_rows, initial_shard
    from fm_train.parallel.tensor_parallel import TPGroup

    monkeypatch.setattr(base, "INIT_TILE", (16, 32))
    drawn = []
    tile_generator = base._tile_generator
    monkeypatch.setattr(base, "_tile_generator", lambda *a: drawn.append(a[1:3]) or tile_generator(*a))
    args = _args(vocab_size=500, vocab_multiple=64)  # 12 padding rows of the embedding and the head
    for name, dim in [("model.layers.0.mlp.up_proj.weight", 0), ("model.layers.1.self_attn.o_proj.weight", 1),
                      ("model.embed_tokens.weight", 0), ("model.norm.weight", 0)]:
        whole = full_init(args, 5, name)
        model = LlamaForCausalLM(args)
        model.init_weights(5)
        assert torch.equal(whole, dict(model.named_parameters())[name])
        for parts in (2, 4):
            for rank in range(parts):
                drawn.clear()
                got = initial_shard(args, 5, name, dim, TPGroup(None, rank, parts))
                assert torch.equal(got, whole.chunk(parts, dim)[rank]), (name, parts, rank)
                if whole.dim() == 2:  # its share of the tiles, and at most one more line of them at an edge
                    grid = (-(-whole.shape[0] // 16), -(-whole.shape[1] // 32))
                    assert len(set(drawn)) <= -(-grid[0] * grid[1] // parts) + grid[1 - dim], (name, parts, drawn)
                    assert len(drawn) == len(set(drawn))  # no tile drawn twice
        n = whole.numel()
        for start, count in [(0, 7), (33, min(100, n - 33)), (n - 50, 50)]:
            assert torch.equal(initial_flat(args, 5, name, start, count), whole.reshape(-1)[start:start + count])
    assert torch.all(full_init(args, 5, "model.embed_tokens.weight")[500:] == 0)
    moe = MoEArgs(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, head_size=16, ffn_hidden=96, vocab_size=512,
                  max_seq_len=64, experts=4, top_k=2, expert_ffn_hidden=32)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    experts = full_init(moe, 5, name)
    for rank in range(2):
        assert torch.equal(initial_rows(moe, 5, name, rank, 2), experts.chunk(2, 0)[rank])


def test_parameter_count_matches_module():
    cfg = build_config({"model": {"preset": "tiny", "qkv_bias": True, "tie_embeddings": False}})
    from fm_train.families.llama.model import args_from_config

    parameter_count = family_of(cfg.model).sizes.parameter_count
    model = LlamaForCausalLM(args_from_config(cfg.model))
    assert sum(p.numel() for p in model.parameters()) == parameter_count(cfg.model)


def test_loss_is_log_vocab_at_uniform_logits():
    logits = torch.zeros(2, 5, 512)
    labels = torch.randint(0, 512, (2, 5))
    assert causal_lm_loss(logits, labels).item() == pytest.approx(torch.log(torch.tensor(512.0)).item(), rel=1e-6)
