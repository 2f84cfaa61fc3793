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
from fm_train.model.base import ModelArgs, parameter_generator, real_logits

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

    def init_parameter(self, name: str, param: torch.Tensor, seed: int) -> None:
        init_llama_parameter(self, name, param, seed)


def args_from_config(model_cfg: Any) -> LlamaArgs:
    """Model arguments from the ``model`` section of a run config (a ``fm_train.config.ModelConfig``)."""
    return LlamaArgs(**{f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(LlamaArgs)})


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 like Hugging Face's ``LlamaRMSNorm``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(batch, heads, seq, head_dim)`` by position: ``cos``/``sin`` are
    ``(seq, head_dim)`` (the same positions in every sample) or ``(batch, seq, head_dim)``."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    return x * cos + _rotate_half(x) * sin


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
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
    no token. :func:`causal_lm_loss` leaves them out, and :func:`real_logits` drops them.
    """

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaBackbone(args)
        self.lm_head: nn.Linear | None = nn.Linear(args.hidden, args.padded_vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``tokens`` ``[batch, seq]``; ``position_ids`` (default ``0..seq-1``) are the tokens'
        RoPE positions, ``document_ids`` (default: one document) keep attention within each document
        (:mod:`fm_train.model.attention`)."""
        h = self.model(tokens, position_ids, document_ids)
        return self.lm_head(h) if self.lm_head is not None else h

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seeded init, identical in every layout: normal(0, std) for matrices, ones for norms, zero biases.

        Output projections (o_proj, down_proj) are scaled by ``1/sqrt(2 * n_layers)`` (GPT-2/OLMo
        practice) so the residual stream does not grow with depth. Each parameter draws from its own
        generator seeded by ``seed`` and its name, so the values depend on nothing else: not on what
        ran before, nor on which pipeline stage builds which blocks. The vocabulary padding rows of
        the embedding and the head are zero.
        """
        for name, param in self.named_parameters():
            if param.device.type == "meta":
                raise RuntimeError(f"init_weights: {name} is on the meta device; call to_empty() first")
            init_llama_parameter(self.args, name, param, seed)

    def tie_weights(self) -> None:
        """Tie the head to the embedding again (after ``to_empty``, which gives each its own storage)."""
        if self.args.tie_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight


def init_llama_parameter(args: LlamaArgs, name: str, param: torch.Tensor, seed: int) -> None:
    """Fill ``param`` (the pure model's ``name``, full shape) with its seeded initial value in place.

    Each parameter draws from its own generator seeded by ``seed`` and its name, so one parameter's
    value can be made alone (a rank materialising only its shard, :mod:`fm_train.parallel.sharded_init`).
    """
    gen = parameter_generator(seed, name)
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        param.fill_(1.0)
    elif name.endswith(".bias"):
        param.zero_()
    else:
        std = args.init_std
        scale = std / math.sqrt(2 * args.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
        param.copy_(torch.empty(param.shape, dtype=torch.float32).normal_(0.0, scale, generator=gen).to(param.dtype))
        if name.endswith(VOCAB_ROW_PARAMS):
            param[args.vocab_size:] = 0.0


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy; ``labels`` are already shifted (``labels[i] = tokens[i + 1]``).

    With ``vocab_size`` the softmax runs over the first ``vocab_size`` columns only: padding
    columns are never predicted and get no gradient.
    """
    logits = real_logits(logits, vocab_size)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))

