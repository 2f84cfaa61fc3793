"""A pure Llama-family decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, tied or untied embeddings.

No distributed code lives here; tensor and pipeline parallelism are applied from outside by module
name (``fm_train/parallel``, with this family's plan in ``tp_plan.py``). Module names map one-to-one onto Hugging Face ``LlamaForCausalLM``
state-dict keys (``model.layers.0.self_attn.q_proj.weight`` ...), so conversion is a rename-free copy.

Sub-modules that are ``None`` pass their input through (torchtitan's pattern), so one class serves
every pipeline stage: the first stage keeps ``embed_tokens``, the last keeps ``norm`` and ``lm_head``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fm_train.families.llama import TIED_PARAMS, VOCAB_ROW_PARAMS
from fm_train.model.attention import CoreAttention, rope_slice
from fm_train.model.base import Init, ModelArgs, real_logits
from fm_train.model.loss import LMHead

@dataclass(frozen=True)
class LlamaArgs(ModelArgs):
    """Shape of the model; built from ``fm_train.config.ModelConfig`` by :func:`args_from_config`."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    vocab_size: int  # the tokenizer's: ids and predictions lie in [0, vocab_size)
    max_seq_len: int
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    init_std: float = 0.02
    vocab_multiple: int = 1

    VOCAB_ROW_PARAMS: ClassVar[tuple[str, ...]] = VOCAB_ROW_PARAMS
    TIED_PARAMS: ClassVar[Mapping[str, str]] = TIED_PARAMS

    def ties(self) -> bool:
        return self.tie_embeddings

    def build(self) -> LlamaForCausalLM:
        return LlamaForCausalLM(self)

    def init_of(self, name: str) -> Init:
        """Ones for norms, zero biases, normal(0, ``init_std``) for matrices; output projections (o_proj,
        down_proj) scaled by ``1/sqrt(2 * n_layers)`` (GPT-2/OLMo practice: the residual stream does not
        grow with depth)."""
        if name.endswith(("norm.weight", "layernorm.weight")):
            return Init(fill=1.0)
        if name.endswith(".bias"):
            return Init()
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            return Init(std=self.init_std / math.sqrt(2 * self.n_layers))
        return Init(std=self.init_std)


def args_from_config(model_cfg: Any) -> LlamaArgs:
    """Model arguments from the ``model`` section of a run config (a ``fm_train.config.ModelConfig``)."""
    return LlamaArgs(**{f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(LlamaArgs)})


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 like Hugging Face's ``LlamaRMSNorm``: the input is
    normalised in fp32, cast back to its dtype, then scaled by the weight (in the weight's dtype).

    The values are HF's, bit for bit, forward and backward (tests/test_kernels.py); what differs is what
    backward keeps: the input in its own dtype and one fp32 number per row (:class:`_RMSNorm`), where
    autograd over the formula keeps an fp32 copy of the input and the normalised output too. The
    formula rather than ``F.rms_norm``: on CPU the latter keeps the same tensors and was not faster
    (bench/RESULTS.md, "The step's kernels").
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps)


class _RMSNorm(torch.autograd.Function):
    """``weight * (h * rsqrt(mean(h^2) + eps)).to(x.dtype)`` with ``h = x.float()``; backward recomputes ``h``
    and the normalised rows from ``x`` and the per-row ``rsqrt``, then runs the ops autograd would."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        h = x.float()
        normed = h * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:  # weight * n: d/d weight = grad * n, summed over the broadcast rows
            product = grad * normed.to(x.dtype)
            grad_w = product.sum(tuple(range(product.dim() - 1))) if product.dim() > 1 else product
        if not ctx.needs_input_grad[0]:
            return None, grad_w, None
        grad_n = (grad * weight).float()
        grad_r = (grad_n * h).sum(-1, keepdim=True)  # n = h * rstd
        grad_v = -0.5 * grad_r * rstd.pow(3)  # rstd = rsqrt(v): autograd's formula, in its order
        grad_p = grad_v.expand(h.shape) / h.shape[-1]  # v = mean(p) + eps
        grad_h = grad_n * rstd + grad_p * (2.0 * h)  # p = h^2; both paths into h
        return grad_h.to(x.dtype), grad_w, None


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape ``(max_seq_len, head_dim)`` in Hugging Face's half-rotation layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rope_at(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``positions`` (``(batch, seq)``): ``(batch, seq, head_dim)``, the rows of
    :func:`rope_tables` at those positions (the same products, so the same values)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                                / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class _Rope(torch.autograd.Function):
    """``x * cos + rotate_half(x) * sin`` (Hugging Face's ``apply_rotary_pos_emb``) written half by half
    into one output, without ``rotate_half``'s ``cat`` and its temporaries.

    The tables repeat their first half (:func:`rope_tables`), so each half of the output is
    ``x1 * c - x2 * s`` and ``x2 * c + x1 * s`` with the same products and sums as HF's, hence the same
    values. The rotation is linear in ``x``: backward needs only the tables, never ``x``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        half = x.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        ctx.save_for_backward(c, s)
        return _rotate(x, c, s, sign=1.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        c, s = ctx.saved_tensors
        return _rotate(grad, c, s, sign=-1.0), None, None  # the transpose of a rotation is the opposite rotation


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, sign: float) -> torch.Tensor:
    """``[x1 * c - sign * x2 * s, x2 * c + sign * x1 * s]`` over the two halves of the last dim."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    if sign > 0:
        torch.sub(torch.mul(x1, c, out=o1), x2 * s, out=o1)
        torch.add(torch.mul(x2, c, out=o2), x1 * s, out=o2)
    else:
        torch.add(torch.mul(x1, c, out=o1), x2 * s, out=o1)
        torch.sub(torch.mul(x2, c, out=o2), x1 * s, out=o2)
    return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(batch, heads, seq, head_dim)`` by position: ``cos``/``sin`` are
    ``(seq, head_dim)`` (the same positions in every sample) or ``(batch, seq, head_dim)``, in
    :func:`rope_tables`' layout (second half a copy of the first)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    return _Rope.apply(x, cos, sin)


class Attention(nn.Module):
    """Grouped-query causal self-attention: projections and RoPE here, the inner product in ``core``.

    Head counts are read from the projection shapes at run time, so a tensor-parallel plan that
    splits q/k/v by heads needs no change here; ``core`` is what sequence parallelism wraps.
    """

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.q_proj = nn.Linear(args.hidden, args.n_heads * self.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.hidden, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.hidden, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * self.head_dim, args.hidden, bias=args.qkv_bias)
        self.core = CoreAttention(causal=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # RoPE on (batch, heads, seq, d): its results are contiguous in the layout SDPA reads; the core
        # takes (batch, seq, heads, d) views of them (the layout sequence parallelism exchanges).
        q = self.q_proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
        return self.o_proj(self.core(q, k, v, document_ids).reshape(bsz, seq, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden, args.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(args.hidden, args.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(args.ffn_hidden, args.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up`` keeping only ``gate`` and ``up`` for backward (autograd would also keep
    ``silu(gate)``, one more ``ffn``-wide tensor per block), recomputing ``silu(gate)`` there instead."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        gate, up = ctx.saved_tensors
        # The same ops autograd runs for F.silu(gate) * up: d/d up = grad * silu(gate), d/d gate = silu's
        # backward of grad * up.
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` (values identical to the two-op form, one tensor less kept for backward)."""
    return _SiluMul.apply(gate, up)


class DecoderLayer(nn.Module):
    """Pre-norm block: attention then MLP, each with a residual."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, document_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    """Embedding, blocks and final norm; HF's ``LlamaModel`` (keys under ``model.``)."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        # Built with uninitialised storage: ``init_weights`` (or a checkpoint) sets every value, and the
        # default normal_ init on the meta device costs over a second (torch imports its compiler for it).
        rows = args.padded_vocab_size
        self.embed_tokens: nn.Module | None = nn.Embedding(rows, args.hidden, _weight=torch.empty(rows, args.hidden))
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.norm: nn.Module | None = RMSNorm(args.hidden, args.norm_eps)
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        # Not persistent: recomputed from args, never stored in checkpoints or the HF export.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        # The tokens' count, not h's: under tp sequence parallelism h holds seq / tp of them.
        cos, sin = rope_slice(self.rope_cos, self.rope_sin, x.shape[1], position_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, document_ids)
        return self.norm(h) if self.norm is not None else h


class LlamaForCausalLM(nn.Module):
    """Backbone plus output head; ``forward(tokens, position_ids, document_ids) -> logits`` (float32 logits only if the model is).

    The logits have ``args.padded_vocab_size`` columns; those from ``args.vocab_size`` on belong to
    no token. :func:`causal_lm_loss` leaves them out, and :func:`real_logits` drops them. Given
    ``labels`` the forward returns each token's loss instead, the head fused with the cross-entropy
    (:class:`~fm_train.model.loss.LMHead`): the full logits never exist.
    """

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaBackbone(args)
        self.lm_head: nn.Linear | None = LMHead(args.hidden, args.padded_vocab_size, real_vocab=args.vocab_size)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``tokens`` ``[batch, seq]``; ``position_ids`` (default ``0..seq-1``) are the tokens'
        RoPE positions, ``document_ids`` (default: one document) keep attention within each document
        (:mod:`fm_train.model.attention`). With ``labels`` (shifted, ``-100`` left out): the fp32 loss of
        each token ``[batch, seq]`` (:func:`~fm_train.model.loss.token_mean` makes it the mean loss)."""
        h = self.model(tokens, position_ids, document_ids)
        if self.lm_head is None:
            return h
        return self.lm_head(h) if labels is None else self.lm_head(h, labels)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seeded init, identical in every layout (:meth:`LlamaArgs.init_of`, drawn by
        :meth:`~fm_train.model.base.ModelArgs.init_parameter`): the values depend on ``seed`` and each
        parameter's name only, not on what ran before, nor on which pipeline stage builds which blocks.
        The vocabulary padding rows of the embedding and the head are zero.
        """
        for name, param in self.named_parameters():
            if param.device.type == "meta":
                raise RuntimeError(f"init_weights: {name} is on the meta device; call to_empty() first")
            self.args.init_parameter(name, param, seed)

    def tie_weights(self) -> None:
        """Tie the head to the embedding again (after ``to_empty``, which gives each its own storage)."""
        if self.args.tie_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy; ``labels`` are already shifted (``labels[i] = tokens[i + 1]``).

    With ``vocab_size`` the softmax runs over the first ``vocab_size`` columns only: padding
    columns are never predicted and get no gradient.
    """
    logits = real_logits(logits, vocab_size)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))

