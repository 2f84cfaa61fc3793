"""Document masking: a packed sample computes what each of its documents computes alone (Llama and the MoE
family), the GPU kernel's mask (FlexAttention, here unfused on CPU) equals the CPU one, the loader's
document ids follow the shards' EOS tokens, and what cannot mask or split the sequence is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fm_train  # noqa: F401  (registers the families)
from fm_train.config import ConfigError, build_config
from fm_train.families import family_of
from fm_train.model.attention import CoreAttention, document_mask, flex_document_attention

EOS = 1


def _model(raw_model: dict):
    cfg = build_config({"model": raw_model, "precision": "fp32", "data": {"seq_len": 32},
                        "cluster": {"workers": 1}})
    family = family_of(cfg.model)
    args = family.modules().args(cfg.model)
    torch.manual_seed(0)
    model = args.build()
    with torch.no_grad():
        for name, param in model.named_parameters():
            args.init_parameter(name, param, 3)
    family.modules().finish_materialize(model, args)
    return model.eval()


LLAMA = {"n_layers": 2, "hidden": 32, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "vocab_size": 64,
         "max_seq_len": 32, "tie_embeddings": False}
MOE = {"preset": "moe-tiny", "n_layers": 2, "hidden": 32, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
       "ffn_hidden": 48, "vocab_size": 64, "max_seq_len": 32,
       "moe": {"experts": 4, "top_k": 2, "expert_ffn_hidden": 16, "dense_layers": 1}}


@pytest.mark.parametrize("shape", [LLAMA, MOE], ids=["llama", "qwen3_moe"])
def test_a_packed_sample_computes_each_document_alone(shape):
    from data_shards.loader import document_ids

    model = _model(shape)
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(2, 64, (n,), generator=gen) for n in (7, 12, 9)]
    docs = [torch.cat([d[:-1], torch.tensor([EOS])]) for d in docs]  # each document ends with its EOS
    packed = torch.cat(docs)[None]
    ids = torch.from_numpy(document_ids(packed.numpy(), EOS))
    assert ids.tolist()[0] == [0] * 7 + [1] * 12 + [2] * 9
    with torch.no_grad():
        masked = model(packed, document_ids=ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])  # each from position 0
        unmasked = model(packed)[0]
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[7:], alone[7:], atol=1e-3)  # later documents did see earlier ones


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [True, False])
def test_the_flex_attention_mask_equals_the_cpu_mask(causal):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 24, 4, 8, generator=gen)
    k, v = torch.randn(2, 24, 2, 8, generator=gen), torch.randn(2, 24, 2, 8, generator=gen)
    documents = torch.tensor([[0] * 5 + [1] * 11 + [2] * 8, [0] * 24], dtype=torch.int32)
    cpu = CoreAttention(causal=causal)(q, k, v, documents)
    flex = flex_document_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), documents, causal,
                                   compiled=False).transpose(1, 2)
    torch.testing.assert_close(flex, cpu, rtol=1e-5, atol=1e-5)
    mask = document_mask(documents, causal)
    assert mask.shape == (2, 1, 24, 24) and not mask[0, 0, 5, 4] and bool(mask[0, 0, 6, 5]) == causal or not causal
    whole = CoreAttention(causal=causal)(q, k, v, None)  # one document per row: the second row equals it
    torch.testing.assert_close(cpu[1], whole[1], rtol=1e-5, atol=1e-5)


def test_the_loader_yields_document_ids_from_the_shards_eos(corpus):
    import data_shards

    info = data_shards.check_sources([str(corpus)], 512)
    stream = data_shards.make_train_loader([(str(corpus), 1.0)], seq_len=32, micro_batch=512, dp_rank=0, dp_size=1,
                                           seed=1, documents=True)
    batch = next(iter(stream))
    ids, docs = batch["input_ids"].numpy(), batch["document_ids"].numpy()
    assert docs.shape == ids.shape and docs.dtype == np.int32
    ends = ids == info.eos_id
    assert ends.any(), "the corpus packs its files: 512 samples hold some file ends"
    expected = np.cumsum(ends, axis=1) - ends  # a document includes its EOS; the next one starts after
    np.testing.assert_array_equal(docs, expected)
    plain = next(iter(data_shards.make_train_loader([(str(corpus), 1.0)], seq_len=32, micro_batch=512, dp_rank=0,
                                                    dp_size=1, seed=1)))
    assert "document_ids" not in plain and torch.equal(plain["input_ids"], batch["input_ids"])


def _errors(raw: dict) -> str:
    base = {"precision": "fp32", "data": {"seq_len": 32}, "cluster": {"workers": 2}}
    for key, value in raw.items():
        base[key] = {**base.get(key, {}), **value}
    with pytest.raises(ConfigError) as info:
        build_config(base)
    return str(info.value)


def test_what_cannot_mask_or_split_the_sequence_is_refused():
    assert "bert family does not keep attention within documents" in _errors(
        {"model": {"preset": "bert-tiny"}, "data": {"document_masking": True}, "cluster": {"workers": 1}})
    assert "bert family is not sequence-parallel" in _errors({"model": {"preset": "bert-tiny"}, "parallel": {"sp": 2}})
    assert "qwen3_moe family is not sequence-parallel yet" in _errors(
        {"model": {"preset": "moe-tiny"}, "parallel": {"sp": 2}})
    assert "parallel.tp=1 has none" in _errors({"model": {"preset": "tiny"}, "parallel": {"tp_sequence_parallel": True}})
    assert "tp=2 x parallel.sp=2 does not divide data.seq_len=30" in _errors(
        {"model": {"preset": "tiny"}, "parallel": {"tp": 2, "sp": 2, "tp_sequence_parallel": True},
         "data": {"seq_len": 30}, "cluster": {"workers": 4}})
    assert "qwen3_moe family does not split the sequence inside tensor parallelism" in _errors(
        {"model": {"preset": "moe-tiny"}, "parallel": {"tp": 2, "tp_sequence_parallel": True}})
    assert "bert family does not split the sequence inside tensor parallelism" in _errors(
        {"model": {"preset": "bert-tiny"}, "parallel": {"tp": 2, "tp_sequence_parallel": True}})
    assert "does not divide data.seq_len=30" in _errors(
        {"model": {"preset": "tiny"}, "parallel": {"sp": 4}, "data": {"seq_len": 30}, "cluster": {"workers": 4}})
    assert "does not divide the data-parallel size 3" in _errors(
        {"model": {"preset": "tiny"}, "parallel": {"sp": 2}, "cluster": {"workers": 3}})
    message = _errors({"model": {"preset": "tiny", "n_heads": 4, "n_kv_heads": 4}, "parallel": {"sp": 8},
                       "cluster": {"workers": 8}})
    assert "does not divide the 4 attention heads per tp rank" in message
    assert "kv heads per tp rank" not in message  # 4 kv heads, sp 8: repeated, fine
    assert "one must divide the other" in _errors(
        {"model": {"preset": "tiny", "n_heads": 12, "n_kv_heads": 3, "hidden": 192}, "parallel": {"sp": 2}})


def test_the_mask_is_made_once_per_batch_and_freed_with_it(monkeypatch):
    import gc
    import weakref

    from fm_train.model import attention

    made = []
    real = attention.additive_mask
    monkeypatch.setattr(attention, "additive_mask", lambda *args: made.append(len(made)) or real(*args))
    q = torch.randn(1, 6, 2, 8)
    documents = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.int32)
    core = CoreAttention()
    first = core(q, q, q, documents)
    torch.testing.assert_close(core(q, q, q, documents), first)  # a second block of the same forward
    assert len(made) == 1
    mask = weakref.ref(attention._MASKS.mask)
    del documents
    gc.collect()
    assert mask() is None and attention._MASKS.mask is None  # gone with its batch
    core(q, q, q, torch.tensor([[0, 1, 1, 1, 1, 1]], dtype=torch.int32))
    assert len(made) == 2


def test_samples_of_32k_tokens_pack_documents_and_read_with_their_ids(tmp_path):
    """Shards at seq_len 32,768: every sample packs many source files end to end (EOS between them), reads
    back whole, and its document ids count the EOS tokens before each position."""
    import data_shards

    shards = data_shards.build_default_corpus(tmp_path / "long", vocab_size=512, seq_len=32768, max_bytes=600_000)
    info = data_shards.check_sources([str(shards)], 512)
    assert info.seq_len == 32768
    stream = data_shards.make_train_loader([(str(shards), 1.0)], seq_len=32768, micro_batch=1, dp_rank=0, dp_size=1,
                                           seed=0, documents=True)
    batch = next(iter(stream))
    ids, docs = batch["input_ids"].numpy(), batch["document_ids"].numpy()
    assert ids.shape == docs.shape == (1, 32768)
    ends = ids == info.eos_id
    assert ends.sum() >= 2  # several files in one sample
    np.testing.assert_array_equal(docs, np.cumsum(ends, axis=1) - ends)
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
