"""The step's kernels against the math they replaced: RMSNorm through ``F.rms_norm``, RoPE without ``cat``,
SwiGLU keeping one tensor less, and the output head fused with the cross-entropy (dense and tp2).

References are Hugging Face's own modules where they exist (conversion checks logits against them) and
otherwise the replaced code, verbatim. Norm, RoPE and SwiGLU must match bit for bit; the fused loss
to fp32 rounding (its log-sum-exp adds in another order) and bf16 noise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fm_train.families.llama.model import (
    LlamaArgs,
    LlamaForCausalLM,
    RMSNorm,
    apply_rope,
    causal_lm_loss,
    rope_at,
    rope_tables,
    silu_mul,
)
from fm_train.model.loss import IGNORE_INDEX, linear_cross_entropy, token_mean
from tests.distributed import run_distributed

DTYPES = [torch.float32, torch.bfloat16]


def _old_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The replaced ``apply_rope`` (``rotate_half`` through ``cat``)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_equals_hf_llama_and_qwen3_norms_bit_for_bit(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    torch.manual_seed(0)
    x = (torch.randn(2, 9, 64) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(64)).to(dtype)
    grad = torch.randn(2, 9, 64).to(dtype)
    ours = RMSNorm(64, 1e-6).to(dtype)
    outs = []
    for norm in (ours, LlamaRMSNorm(64, eps=1e-6).to(dtype), Qwen3MoeRMSNorm(64, eps=1e-6).to(dtype)):
        with torch.no_grad():
            norm.weight.copy_(weight)
        xi = x.clone().requires_grad_()
        y = norm(xi)
        y.backward(grad)
        outs.append((y.detach(), xi.grad, norm.weight.grad))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("positions", [False, True])
def test_rope_equals_hf_apply_rotary_pos_emb_and_the_cat_form_bit_for_bit(dtype, positions):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    batch, heads, seq, dim = 2, 3, 11, 16
    q = torch.randn(batch, heads, seq, dim).to(dtype).requires_grad_()
    k = torch.randn(batch, 1, seq, dim).to(dtype).requires_grad_()
    if positions:
        pos = torch.randint(0, 40, (batch, seq))
        cos, sin = rope_at(pos, dim, 10000.0)  # (batch, seq, dim)
        hf_cos, hf_sin = cos, sin
    else:
        cos, sin = rope_tables(dim, seq, 10000.0)  # (seq, dim)
        hf_cos, hf_sin = cos[None].expand(batch, -1, -1), sin[None].expand(batch, -1, -1)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos.to(dtype), hf_sin.to(dtype))
    ours_q, ours_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    assert torch.equal(ours_q, hf_q) and torch.equal(ours_k, hf_k)
    grad = torch.randn_like(ours_q)
    (ours_grad,) = torch.autograd.grad(ours_q, q, grad)
    (old_grad,) = torch.autograd.grad(_old_rope(q, cos, sin), q, grad)
    (hf_grad,) = torch.autograd.grad(hf_q, q, grad)
    assert torch.equal(ours_grad, old_grad) and torch.equal(ours_grad, hf_grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_two_op_swiglu_bit_for_bit(dtype):
    torch.manual_seed(0)
    gate = (torch.randn(3, 7, 40) * 2).to(dtype).requires_grad_()
    up = torch.randn(3, 7, 40).to(dtype).requires_grad_()
    grad = torch.randn(3, 7, 40).to(dtype)
    ours = silu_mul(gate, up)
    ours_grads = torch.autograd.grad(ours, (gate, up), grad)
    old = F.silu(gate) * up
    old_grads = torch.autograd.grad(old, (gate, up), grad)
    assert torch.equal(ours, old)
    assert all(torch.equal(a, b) for a, b in zip(ours_grads, old_grads))


def test_silu_mul_keeps_one_tensor_less_for_backward():
    gate = torch.randn(4, 32, requires_grad=True)
    up = torch.randn(4, 32, requires_grad=True)

    def saved(fn) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(gate, up)
        return sum(seen.values())

    assert saved(silu_mul) == 2 * 4 * 32 * 4  # gate and up only
    assert saved(lambda g, u: F.silu(g) * u) == 3 * 4 * 32 * 4  # and silu(gate)


def _loss_case(dtype: torch.dtype, bias: bool):
    torch.manual_seed(0)
    tokens, hidden, columns, real = 41, 24, 64, 57  # 7 padding columns
    h = torch.randn(tokens, hidden).to(dtype).requires_grad_()
    w = (torch.randn(columns, hidden) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(columns) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, real, (tokens,))
    labels[::4] = IGNORE_INDEX
    return h, w, b, labels, real


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [6, 1000], ids=["recomputed", "kept"])  # 7 chunks / one chunk, kept
def test_linear_cross_entropy_equals_the_logits_loss(dtype, bias, chunk_rows, monkeypatch):
    import fm_train.model.loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 41 * 9)  # backward: 9 columns a slice, the last one padding
    h, w, b, labels, real = _loss_case(dtype, bias)
    params = [t for t in (h, w, b) if t is not None]
    ref = causal_lm_loss(F.linear(h, w, b), labels, vocab_size=real)  # the unchanged loss (-100 left out)
    ref_grads = torch.autograd.grad(ref, params)
    matmuls = []
    chunk_logits = loss_module._chunk_logits
    monkeypatch.setattr(loss_module, "_chunk_logits", lambda *a: matmuls.append(a[0].shape[0]) or chunk_logits(*a))
    per_token = linear_cross_entropy(h, w, labels, bias=b, real_vocab=real, chunk_rows=chunk_rows)
    ours = token_mean(per_token, labels)
    forward = len(matmuls)
    grads = torch.autograd.grad(ours, params, retain_graph=True)
    again = torch.autograd.grad(ours, params)  # backward twice: the kept logits are not consumed in place
    for a, r in zip(again, grads):
        assert torch.equal(a, r)
    if chunk_rows >= labels.shape[0]:  # one chunk of all the tokens: backward reuses it, no second head matmul
        assert matmuls == [labels.shape[0]]
    else:
        assert forward == 7 and len(matmuls) > forward
    assert per_token.dtype == torch.float32 and per_token.shape == labels.shape
    assert torch.all(per_token[labels == IGNORE_INDEX] == 0)
    if dtype == torch.float32:
        assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
        for a, r in zip(grads, ref_grads):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)
    else:  # the same bf16 logits; the loss is fp32 from there on. Gradients within bf16 rounding
        assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
        for a, r in zip(grads, ref_grads):
            assert a.dtype == r.dtype
            torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=2e-2 * r.abs().max().item())
    # Per-sample sums (two samples of the same tokens) are the unfused per-token losses summed.
    unfused = F.cross_entropy(F.linear(h, w, b).float()[:, :real], labels, reduction="none")
    torch.testing.assert_close(per_token.detach(), unfused.detach(), rtol=1e-5, atol=1e-5)


def _tiny_llama(vocab_multiple: int = 8) -> LlamaForCausalLM:
    args = LlamaArgs(n_layers=2, hidden=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=61, max_seq_len=16,
                     tie_embeddings=False, vocab_multiple=vocab_multiple)
    model = args.build()
    model.init_weights(3)
    return model


def test_llama_head_loss_equals_the_loss_over_its_logits():
    model = _tiny_llama()
    torch.manual_seed(1)
    tokens = torch.randint(0, 61, (3, 12))
    labels = torch.randint(0, 61, (3, 12))
    labels[:, -1] = IGNORE_INDEX
    params = [p for p in model.parameters()]
    ref = causal_lm_loss(model(tokens), labels, vocab_size=61)
    ref_grads = torch.autograd.grad(ref, params)
    losses = model(tokens, labels=labels)
    assert losses.shape == (3, 12)
    ours = token_mean(losses, labels)
    grads = torch.autograd.grad(ours, params)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)


def test_bert_head_loss_on_the_masked_rows_equals_the_loss_over_all_its_logits():
    """The encoder given labels runs its transform and fused decoder on the masked rows only; loss and every
    gradient (the tied decoder/embedding and the MLM bias included) are those of the logits path."""
    from fm_train.families.bert.model import BertArgs, masked_lm_loss

    args = BertArgs(n_layers=2, hidden=32, n_heads=4, ffn_hidden=64, vocab_size=61, max_seq_len=16, vocab_multiple=8)
    model = args.build()
    model.init_weights(3)
    with torch.no_grad():  # BERT's biases start at zero: give them values, so their gradients mean something
        model.cls.predictions.bias[:61].normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(1)
    tokens = torch.randint(0, 61, (3, 12))
    labels = torch.where(torch.rand(3, 12) < 0.3, torch.randint(0, 61, (3, 12)), IGNORE_INDEX)
    labels[0, 0], labels[1, :] = 5, IGNORE_INDEX  # a sample with nothing masked
    params = [p for p in model.parameters()]
    ref = masked_lm_loss(model(tokens), labels, vocab_size=61)
    ref_grads = torch.autograd.grad(ref, params)
    losses = model(tokens, labels=labels)
    assert losses.shape == (3, 12) and losses.dtype == torch.float32
    assert (losses[labels == IGNORE_INDEX] == 0).all()
    ours = token_mean(losses, labels)
    grads = torch.autograd.grad(ours, params)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)
    # Nothing masked: NaN, as F.cross_entropy's mean over no token.
    none = torch.full_like(labels, IGNORE_INDEX)
    assert torch.isnan(masked_lm_loss(model(tokens), none, vocab_size=61))
    assert torch.isnan(token_mean(model(tokens, labels=none), none))


def _tp2_head(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, real: int, chunk_bytes: int) -> dict:
    """Rank's part of the vocab-parallel fused head: per-token losses and this rank's gradients."""
    import torch.distributed as dist

    import fm_train.model.loss as loss_module
    from fm_train.parallel.tensor_parallel import TPGroup, VocabParallelHead

    loss_module.CHUNK_BYTES = chunk_bytes  # this child process's own module

    rank = dist.get_rank()
    tp = TPGroup(dist.group.WORLD, rank, 2)
    head = VocabParallelHead(weight.shape[1], weight.shape[0], tp, real_vocab=real)
    with torch.no_grad():
        head.weight.copy_(weight.chunk(2)[rank])
    h = hidden.clone().requires_grad_()
    losses = head(h[None], labels[None])[0]
    token_mean(losses, labels).backward()
    # Plain lists: a tensor sent back through the queue would need this process alive to be read.
    return {"losses": losses.detach().tolist(), "grad_h": h.grad.tolist(), "grad_w": head.weight.grad.tolist()}


@pytest.mark.parametrize("chunk_bytes", [64 * 1024**2, 4 * 32 * 9], ids=["kept", "recomputed"])
def test_vocab_parallel_fused_head_equals_the_dense_loss_on_tp2(chunk_bytes):
    # Rank 1's 32 columns end in 7 padding columns, left out of the softmax
    h, w, _, labels, real = _loss_case(torch.float32, bias=False)
    h, w = h.detach(), w.detach()
    results = [{k: torch.tensor(v) for k, v in r.items()}
               for r in run_distributed(_tp2_head, 2, (h, w, labels, real, chunk_bytes))]
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    per_token = F.cross_entropy(F.linear(hr, wr).float()[:, :real], labels, reduction="none")
    ref = causal_lm_loss(F.linear(hr, wr), labels, vocab_size=real)
    ref.backward()
    for r in results:  # every tp rank: the same losses, the whole input gradient
        torch.testing.assert_close(r["losses"], per_token.detach(), rtol=1e-6, atol=1e-6)
        assert token_mean(r["losses"], labels).item() == pytest.approx(ref.item(), rel=1e-6)
        torch.testing.assert_close(r["grad_h"], hr.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.cat([r["grad_w"] for r in results]), wr.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_blocks_saved_tensors_match_the_planners_activation_term(precision):
    """What a Llama block keeps for backward (every saved storage once, parameters left out) is what the
    planner's ``activation_bytes_per_layer`` says, within what it leaves out: per-row statistics (the
    norms' rsqrt, attention's log-sum-exp) and, in bf16, the RoPE tables cast for q and k (3.4% at this
    tiny width, 1% at the 1.1b preset's: bench/RESULTS.md)."""
    from types import SimpleNamespace

    from fm_train.families.llama.model import DecoderLayer
    from fm_train.families.llama.shape import activation_bytes_per_layer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    seq, hidden, ffn = 128, 256, 688
    args = LlamaArgs(n_layers=2, hidden=hidden, n_heads=4, n_kv_heads=2, ffn_hidden=ffn, vocab_size=64, max_seq_len=seq)
    block = DecoderLayer(args).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    cos, sin = rope_tables(args.head_dim, seq, args.rope_theta)
    x = torch.randn(2, seq, hidden, dtype=dtype, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin)
    cfg = SimpleNamespace(model=SimpleNamespace(hidden=hidden, ffn_hidden=ffn, n_heads=4, n_kv_heads=2, head_dim=None),
                          parallel=SimpleNamespace(tp=1, tp_sequence_parallel=False, activation_checkpointing=False),
                          data=SimpleNamespace(seq_len=seq), train=SimpleNamespace(micro_batch=2), precision=precision)
    assert sum(seen.values()) == pytest.approx(activation_bytes_per_layer(cfg), rel=0.04)


def test_the_planner_counts_the_fused_loss_by_the_losss_own_chunk_size():
    from fm_train.model.loss import CHUNK_BYTES
    from fm_train.plan.memory import LOSS_CHUNK_BYTES, fused_loss_bytes

    assert LOSS_CHUNK_BYTES == CHUNK_BYTES
    # 2048 tokens over a 128,256-column head at hidden 2048: a fraction of the unfused logits' 3 copies.
    unfused = 2048 * 128256 * (4 + 4 + 4)
    assert fused_loss_bytes(2048, 128256, 2048, half=False) < 0.45 * unfused


def test_the_planner_counts_the_encoders_head_on_its_masked_tokens():
    from data_shards.masking import masked_per_sample
    from fm_train.config import build_config
    from fm_train.families import family_of
    from fm_train.plan.memory import estimate_memory, fused_loss_bytes

    cfg = build_config({"model": {"preset": "bert-base", "vocab_size": 30522},
                        "data": {"seq_len": 512}, "train": {"micro_batch": 8}})
    family = family_of(cfg.model)
    masked = 8 * masked_per_sample(512)
    assert masked == 8 * 76  # round(0.15 x the 510 positions between [CLS] and [SEP])
    half = cfg.precision != "fp32"
    want = fused_loss_bytes(masked, cfg.model.padded_vocab_size, cfg.model.hidden, half)
    assert estimate_memory(cfg, family).logits == want
