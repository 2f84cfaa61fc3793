"""Vocabulary padding: any tokenizer size trains under tensor parallelism, and the padding changes nothing.

The embedding and head have ``vocab_size`` rounded up to ``model.vocab_multiple`` rows. These tests
check that a padded model computes exactly what the unpadded one does (logits of real tokens, loss,
gradients), that the padding rows start at zero and stay there through AdamW with weight decay,
that both losses leave the padding out of the softmax (also on a tp rank holding padding only),
that a Hugging Face checkpoint of the tokenizer's size is read into the padded rows slice by slice,
and that config and resume checks name the field. The multi-process equivalence and conversion of a
1,001-token model live with the other layouts (test_parallel_equivalence, test_convert_parallel).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from fm_train.families.llama.model import LlamaArgs, LlamaForCausalLM, causal_lm_loss
from fm_train.model.base import padded_vocab_size
from fm_train.parallel.tensor_parallel import TPGroup, vocab_parallel_cross_entropy

VOCAB = 1001  # 7 x 11 x 13: no tp size divides it


def _args(multiple: int, *, tie: bool) -> LlamaArgs:
    return LlamaArgs(n_layers=2, hidden=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=VOCAB,
                     max_seq_len=32, tie_embeddings=tie, vocab_multiple=multiple)


@pytest.mark.unit
def test_padded_size_rounds_up_to_the_multiple() -> None:
    assert [padded_vocab_size(v, 128) for v in (1001, 1024, 50257, 32001, 128256)] == [1024, 1024, 50304, 32128, 128256]
    assert padded_vocab_size(1001, 1) == 1001


@pytest.mark.unit
@pytest.mark.parametrize("tie", [True, False])
def test_a_padded_model_computes_what_the_unpadded_one_does(tie: bool) -> None:
    plain, padded = LlamaForCausalLM(_args(1, tie=tie)), LlamaForCausalLM(_args(128, tie=tie))
    plain.init_weights(3)
    padded.init_weights(3)
    rows = ("model.embed_tokens.weight", "lm_head.weight")
    with torch.no_grad():
        for name, p in padded.named_parameters():
            if name in rows:
                assert p.shape[0] == 1024 and torch.count_nonzero(p[VOCAB:]) == 0, f"{name}: padding rows start at zero"
            p[:plain.get_parameter(name).shape[0]].copy_(plain.get_parameter(name))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (3, 17), generator=gen)
    ids, labels = tokens[:, :-1], tokens[:, 1:]

    got, want = padded(ids), plain(ids)
    assert got.shape[-1] == 1024 and want.shape[-1] == VOCAB
    torch.testing.assert_close(got[..., :VOCAB], want, rtol=0, atol=1e-6)
    loss, ref = causal_lm_loss(got, labels, vocab_size=VOCAB), causal_lm_loss(want, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    loss.backward()
    ref.backward()
    for name, p in padded.named_parameters():
        g, g_ref = p.grad, plain.get_parameter(name).grad
        torch.testing.assert_close(g[:g_ref.shape[0]], g_ref, rtol=1e-5, atol=1e-8, msg=name)
        if name in rows:
            assert torch.count_nonzero(g[VOCAB:]) == 0, f"{name}: the padding got a gradient"

    # AdamW with weight decay: zero gradient and zero moments keep the padding rows exactly zero.
    opt = torch.optim.AdamW(padded.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        causal_lm_loss(padded(ids), labels, vocab_size=VOCAB).backward()
    for name in rows:
        assert torch.count_nonzero(padded.get_parameter(name)[VOCAB:]) == 0, name


@pytest.mark.unit
def test_the_losses_leave_padding_columns_out_of_the_softmax() -> None:
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(4, 6, 11, generator=gen)
    labels = torch.randint(0, 11, (4, 6), generator=gen)
    # Padding logits far above the real ones: any leak into the softmax would dominate the loss.
    logits = torch.cat([real, torch.full((4, 6, 5), 50.0)], dim=-1).requires_grad_(True)
    want = F.cross_entropy(real.reshape(-1, 11), labels.reshape(-1))
    for loss in (causal_lm_loss(logits, labels, vocab_size=11),
                 vocab_parallel_cross_entropy(logits, labels, TPGroup(None), vocab_size=11)):
        (grad,) = torch.autograd.grad(loss, logits)
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
        assert torch.count_nonzero(grad[..., 11:]) == 0 and torch.isfinite(grad).all()
    assert torch.equal(logits[..., 11:], torch.full((4, 6, 5), 50.0))  # the caller's logits are untouched


def _split_loss_with_a_padding_only_rank() -> list[float]:
    """vocab 5 in 16 columns over tp2: rank 1's 8 columns are all padding."""
    import torch.distributed as dist

    tp = TPGroup(dist.group.WORLD, dist.get_rank(), 2)
    gen = torch.Generator().manual_seed(2)
    full = torch.randn(3, 7, 16, generator=gen)
    labels = torch.randint(0, 5, (3, 7), generator=gen)
    labels[0, 0] = -100
    local = full.chunk(2, dim=-1)[tp.rank].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, labels, tp, vocab_size=5)
    (grad,) = torch.autograd.grad(loss, local)
    ref_full = full.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_full[..., :5].reshape(-1, 5), labels.reshape(-1), ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref, ref_full)
    return [abs(loss.item() - ref.item()), (grad - ref_grad.chunk(2, dim=-1)[tp.rank]).abs().max().item(),
            float(torch.isfinite(grad).all())]


@pytest.mark.multiproc
def test_vocab_parallel_loss_with_a_rank_that_holds_only_padding() -> None:
    for rank, (loss_diff, grad_diff, finite) in enumerate(run_distributed(_split_loss_with_a_padding_only_rank, 2)):
        assert loss_diff < 1e-6 and grad_diff < 1e-7 and finite == 1.0, (rank, loss_diff, grad_diff)


@pytest.fixture(scope="module")
def hf_1001(tmp_path_factory) -> Path:
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(5)
    out = tmp_path_factory.mktemp("hf") / "llama-1001"
    HFLlama(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                        tie_word_embeddings=False)).save_pretrained(out)
    return out


@pytest.mark.unit
@pytest.mark.parametrize("parts", [1, 2, 4, 8])
def test_an_imported_vocabulary_is_read_into_the_padded_rows_slice_by_slice(hf_1001: Path, parts: int) -> None:
    from fm_train.config import ModelConfig
    from fm_train.convert.hf_import import open_hf
    from fm_train.families import family_of
    from fm_train.families.llama.model import args_from_config
    from fm_train.parallel.sharded_init import initial_flat, initial_shard

    llama = family_of("llama")
    fields, _ = open_hf(hf_1001, llama)
    args = args_from_config(ModelConfig(**fields))
    assert args.padded_vocab_size == 1024
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        _, whole = open_hf(hf_1001, llama)
        stored = whole.read(name)
        full = torch.cat([stored, stored.new_zeros(1024 - VOCAB, 32)])
        for rank in range(parts):
            _, weights = open_hf(hf_1001, llama)  # a fresh reader per rank: its counters are that rank's reads
            got = initial_shard(args, weights, name, 0, TPGroup(None, rank, parts))
            want = full.chunk(parts, dim=0)[rank]
            assert torch.equal(got, want), (name, rank)
            real_rows = max(0, min(VOCAB, (rank + 1) * 1024 // parts) - rank * 1024 // parts)
            assert weights.elements_read == real_rows * 32, f"rank {rank} read rows it does not hold"
        # ZeRO-3 partitions: flat ranges inside, across and beyond the real rows.
        for start, count in ((0, 100), (VOCAB * 32 - 40, 90), (VOCAB * 32 + 3, 300), (1024 * 32 - 7, 7)):
            _, weights = open_hf(hf_1001, llama)
            assert torch.equal(initial_flat(args, weights, name, start, count), full.reshape(-1)[start:start + count])


@pytest.mark.unit
def test_config_names_the_padding_and_the_fix(tiny_config_dict: dict) -> None:
    from fm_train.config import ConfigError, FmConfig, build_config

    tiny_config_dict["model"].update(vocab_size=VOCAB, n_heads=6, n_kv_heads=6, hidden=96, ffn_hidden=192)
    cfg = FmConfig(**tiny_config_dict)
    assert (cfg.model.vocab_multiple, cfg.model.padded_vocab_size) == (128, 1024)
    tiny_config_dict["cluster"] = {"workers": 3}
    tiny_config_dict["parallel"] = {"tp": 3, "pp": 1, "zero_stage": 1}
    with pytest.raises(ConfigError) as info:
        build_config(tiny_config_dict)
    assert "padded vocabulary 1024 (model.vocab_size=1001 rounded up to model.vocab_multiple=128)" in str(info.value)
    assert "set model.vocab_multiple to a multiple of 3 (e.g. 384)" in str(info.value)
    tiny_config_dict["model"]["vocab_multiple"] = 384
    assert build_config(tiny_config_dict).model.padded_vocab_size == 1152


@pytest.mark.unit
def test_resume_refuses_another_padding_and_reads_old_manifests_as_unpadded(tiny_config_dict: dict) -> None:
    from fm_train.checkpoint import CheckpointError
    from fm_train.checkpoint.manifest import saved_padded_vocab
    from fm_train.checkpoint.resume import check_compatible
    from fm_train.config import FmConfig

    tiny_config_dict["model"]["vocab_size"] = VOCAB
    cfg = FmConfig(**tiny_config_dict)
    saved = {"config": {"model": cfg.model.model_dump() | {"vocab_multiple": 64}}, "data": {}}
    assert saved_padded_vocab(saved["config"]["model"]) == 1024
    check_compatible(saved, cfg, None, Path("step_1"))  # 1001 pads to 1024 either way: the tensors fit
    saved["config"]["model"]["vocab_multiple"] = 1
    with pytest.raises(CheckpointError, match=r"vocab_multiple: checkpoint 1 \(1001 embedding rows\), config 128"):
        check_compatible(saved, cfg, None, Path("step_1"))
    del saved["config"]["model"]["vocab_multiple"]  # a manifest from before the padding
    assert saved_padded_vocab(saved["config"]["model"]) == 1001
