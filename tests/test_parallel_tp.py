"""Tensor parallelism: sharded init, split dims, the vocab-parallel loss and tp2 against the dense model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from fm_train.config import FmConfig
from fm_train.dist.groups import ParallelGroups
from fm_train.dist.topology import Topology
from fm_train.engine.train_module import build_tp_model, build_train_module
from fm_train.families import FAMILIES, family_of
from fm_train.families.llama.model import LlamaArgs, LlamaForCausalLM, causal_lm_loss
from fm_train.families.spec import layout_errors as family_layout_errors
from fm_train.families.spec import split_dims
from fm_train.parallel.tensor_parallel import (
    TPGroup,
    gather_from_tp,
    vocab_parallel_cross_entropy,
)

SEED = 7
LLAMA = FAMILIES["llama"]


def layout_errors(args: LlamaArgs, tp: int, pp: int) -> list[str]:
    return family_layout_errors(LLAMA, args, tp, pp)


def tiny_args(*, tie: bool = True, bias: bool = False, vocab: int = 512, n_layers: int = 2,
              vocab_multiple: int = 1) -> LlamaArgs:
    return LlamaArgs(n_layers=n_layers, hidden=64, n_heads=4, n_kv_heads=2, ffn_hidden=172, vocab_size=vocab,
                     max_seq_len=64, tie_embeddings=tie, qkv_bias=bias, vocab_multiple=vocab_multiple)


def dense_model(args: LlamaArgs) -> LlamaForCausalLM:
    model = LlamaForCausalLM(args)
    model.init_weights(SEED)
    return model


def merged(shards: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    return shards[0] if dim is None else torch.cat(shards, dim=dim)


@pytest.mark.unit
@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("tie,bias", [(True, False), (False, True)])
def test_sharded_init_equals_slices_of_the_dense_init(tp_size: int, tie: bool, bias: bool) -> None:
    # Materialising a shard needs no process group, so every tp rank can be built in one process.
    args = tiny_args(tie=tie, bias=bias)
    dense = dense_model(args).state_dict()
    shards = [build_tp_model(LLAMA, args, TPGroup(None, r, tp_size), SEED) for r in range(tp_size)]
    dims = split_dims(LLAMA, args)
    assert set(dims) == set(dense)
    for name, value in dense.items():
        assert torch.equal(merged([s.state_dict()[name] for s in shards], dims[name]), value), name
    for shard in shards:
        assert (shard.lm_head.weight is shard.model.embed_tokens.weight) == tie
        assert torch.equal(shard.model.rope_cos, dense_model(args).model.rope_cos)


@pytest.mark.unit
def test_split_dims_follow_the_megatron_plan() -> None:
    dims = split_dims(LLAMA, tiny_args(tie=False, bias=True))
    expected = {
        "model.embed_tokens.weight": 0, "lm_head.weight": 0, "model.norm.weight": None,
        "model.layers.1.self_attn.q_proj.weight": 0, "model.layers.1.self_attn.q_proj.bias": 0,
        "model.layers.1.self_attn.k_proj.weight": 0, "model.layers.1.self_attn.v_proj.weight": 0,
        "model.layers.1.self_attn.o_proj.weight": 1, "model.layers.1.self_attn.o_proj.bias": None,
        "model.layers.1.mlp.gate_proj.weight": 0, "model.layers.1.mlp.up_proj.weight": 0,
        "model.layers.1.mlp.down_proj.weight": 1, "model.layers.1.input_layernorm.weight": None,
    }
    assert {k: dims[k] for k in expected} == expected


@pytest.mark.unit
def test_vocab_parallel_loss_of_one_shard_is_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    labels[0, :2] = -100  # ignored positions are left out of the mean, as in F.cross_entropy
    loss = vocab_parallel_cross_entropy(logits, labels, TPGroup(None))
    (grad,) = torch.autograd.grad(loss, logits)
    ref = causal_lm_loss(logits, labels)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.unit
def test_layout_errors_name_the_field_and_the_fix() -> None:
    errors = layout_errors(tiny_args(vocab=510), tp=4, pp=1)
    assert any("model.vocab_size=510" in e and "vocab-parallel" in e for e in errors)
    assert any("model.n_kv_heads=2" in e for e in errors)
    assert any("smaller than parallel.pp=3" in e for e in layout_errors(tiny_args(), tp=1, pp=3))
    # A huge vocabulary next to tiny blocks leaves a stage with only the embedding.
    assert any("gets no decoder block" in e for e in layout_errors(tiny_args(vocab=65536, n_layers=3), tp=1, pp=3))
    assert layout_errors(tiny_args(), tp=2, pp=2) == []


@pytest.mark.unit
def test_build_refuses_tp_without_groups(tiny_config_dict: dict) -> None:
    tiny_config_dict["parallel"] = {"tp": 2, "pp": 1, "zero_stage": 1}
    with pytest.raises(ValueError, match="needs the rank's ParallelGroups"):
        cfg = FmConfig(**tiny_config_dict)
        build_train_module(cfg, family_of(cfg.model))


def _tp2_against_dense(tie: bool, bias: bool, vocab: int = 512) -> dict[str, float]:
    args = tiny_args(tie=tie, bias=bias, vocab=vocab, vocab_multiple=128)
    groups = ParallelGroups(Topology(world=2, tp=2))
    tp = TPGroup.from_groups(groups)
    model, dense = build_tp_model(LLAMA, args, tp, SEED), dense_model(args)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab_size, (2, 32), generator=gen)
    labels = torch.randint(0, args.vocab_size, (2, 32), generator=gen)
    labels[1, -3:] = -100

    local_logits = model(ids)
    assert local_logits.shape[-1] == args.padded_vocab_size // 2  # the loss never sees full logits
    loss = vocab_parallel_cross_entropy(local_logits, labels, tp, vocab_size=args.vocab_size)
    loss.backward()
    ref_logits = dense(ids)
    ref_loss = causal_lm_loss(ref_logits, labels, vocab_size=args.vocab_size)
    ref_loss.backward()

    diffs = {"logits": (gather_from_tp(local_logits.detach(), tp) - ref_logits.detach()).abs().max().item(),
             "loss": abs(loss.item() - ref_loss.item())}
    return {**diffs, **gradient_diffs(model, dense, tp)}


def gradient_diffs(model: torch.nn.Module, dense: torch.nn.Module, tp: TPGroup, floor: float = 1e-12) -> dict[str, float]:
    """Per parameter: the tp shards' gathered gradient against the dense model's, relative to the
    largest reference entry (at least ``floor``)."""
    diffs, ref_grads = {}, {n: p.grad for n, p in dense.named_parameters()}
    for name, p in model.named_parameters():
        parts = [torch.empty_like(p.grad) for _ in range(tp.size)]
        dist.all_gather(parts, p.grad.contiguous(), group=tp.group)
        grad = merged(parts, p.tp_split_dim) if p.tp_split_dim is not None else p.grad
        ref = ref_grads[name]
        diffs[name] = ((grad - ref).abs().max() / ref.abs().max().clamp_min(floor)).item()
        # DeepSpeed counts a shard's gradient on every tp rank, a replicated one on tp rank 0 only.
        assert p.tensor_model_parallel == (p.tp_split_dim is not None), name
    return diffs


def _tp2_cases() -> dict[tuple[bool, bool, int], dict[str, float]]:
    # 1001 tokens pad to 1024 rows: tp rank 1's shard ends in 23 padding columns.
    cases = ((True, False, 512), (False, True, 512), (True, False, 1001), (False, False, 1001))
    return {(tie, bias, vocab): _tp2_against_dense(tie, bias, vocab) for tie, bias, vocab in cases}


@pytest.mark.multiproc
def test_tp2_logits_loss_and_gradients_equal_the_dense_model() -> None:
    for rank, cases in enumerate(run_distributed(_tp2_cases, world_size=2)):
        for (tie, bias, vocab), diffs in cases.items():
            bad = {k: v for k, v in diffs.items() if not v < 1e-5}
            assert not bad, f"rank {rank}, tie={tie}, bias={bias}, vocab={vocab}: {bad}"
            assert len(diffs) >= 2 + 20  # logits, loss and every parameter (20 in the smallest case)
