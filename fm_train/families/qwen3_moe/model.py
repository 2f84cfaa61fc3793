"""A pure Mixture-of-Experts decoder with the math of Hugging Face ``Qwen3MoeForCausalLM``.

Attention is the Llama family's (RoPE, grouped-query, SDPA) with Qwen3's RMSNorm of each query and
key head before RoPE; each feed-forward block is a softmax router choosing the top-k of E SwiGLU
experts per token (renormalised over the k when ``norm_topk_prob``), except the first
``dense_layers`` blocks, which keep a dense SwiGLU MLP. Module names are the Hugging Face state-dict
keys, experts included: ``mlp.gate.weight [E, H]``, ``mlp.experts.gate_up_proj [E, 2F, H]``,
``mlp.experts.down_proj [E, H, F]``.

Routing and the experts are separate modules so that expert parallelism is applied from outside
(:mod:`fm_train.parallel.expert_parallel`): the block sorts the routed token copies by expert and
calls ``experts(tokens, counts)``; expert parallelism wraps that call with the all-to-all dispatch
and combine and gives each rank only its experts' rows. Dropless by default: every token reaches its
k experts; with ``capacity_factor`` each expert takes at most ``ceil(cf * tokens * k / E)`` of a
micro-batch's token copies in token order, and the rest are dropped (counted).

The router's losses (load balancing, z-loss) are local to each block: their gradient enters the
backward pass at the block (:class:`RouterLossGrad`, Megatron-Core's way), so the model's output
stays the logits, a pipeline stage needs no extra tensor, and the loss the engine reports is the
language-model loss alone; the values go to the metrics through :class:`RouterStats`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fm_train.families.qwen3_moe import TIED_PARAMS, VOCAB_ROW_PARAMS
from fm_train.families.llama.model import RMSNorm, apply_rope, causal_lm_loss, rope_tables, silu_mul
from fm_train.model.attention import CoreAttention, rope_slice
from fm_train.model.base import Init, ModelArgs
from fm_train.model.loss import LMHead

#: Expert parameters: one leading row per expert (what expert parallelism splits).
EXPERT_PARAMS: tuple[str, ...] = ("experts.gate_up_proj", "experts.down_proj")


@dataclass(frozen=True)
class MoEArgs(ModelArgs):
    """Shape and routing of the model; built from ``fm_train.config.ModelConfig`` by :func:`args_from_config`."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_size: int  # width of one attention head (Qwen3: not always hidden / n_heads)
    ffn_hidden: int  # the dense layers' SwiGLU width
    vocab_size: int
    max_seq_len: int
    experts: int
    top_k: int
    expert_ffn_hidden: int
    dense_layers: int = 0
    norm_topk_prob: bool = True
    aux_loss_coef: float = 0.001
    z_loss_coef: float = 0.0
    capacity_factor: float | None = None
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    vocab_multiple: int = 1

    VOCAB_ROW_PARAMS: ClassVar[tuple[str, ...]] = VOCAB_ROW_PARAMS
    TIED_PARAMS: ClassVar[Mapping[str, str]] = TIED_PARAMS

    @property
    def head_dim(self) -> int:  # type: ignore[override]
        return self.head_size

    def ties(self) -> bool:
        return self.tie_embeddings

    def is_moe_layer(self, index: int) -> bool:
        """Whether block ``index`` routes to experts (the first ``dense_layers`` do not)."""
        return index >= self.dense_layers

    @property
    def moe_layers(self) -> int:
        return self.n_layers - self.dense_layers

    def build(self) -> MoEForCausalLM:
        return MoEForCausalLM(self)

    def init_of(self, name: str) -> Init:
        """As the Llama family: ones for norms, normal(0, ``init_std``) for matrices, output projections
        (o_proj, every expert's and the dense MLP's down_proj) scaled by ``1/sqrt(2 * n_layers)``."""
        if name.endswith(("norm.weight", "layernorm.weight")):
            return Init(fill=1.0)
        if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
            return Init(std=self.init_std / math.sqrt(2 * self.n_layers))
        return Init(std=self.init_std)


def args_from_config(model_cfg: Any) -> MoEArgs:
    """Model arguments from the ``model`` section of a run config (its ``moe`` subsection for the routing)."""
    moe = model_cfg.moe
    fields = {f.name for f in dataclasses.fields(MoEArgs)}
    values = {name: getattr(model_cfg, name) for name in fields if hasattr(model_cfg, name)}
    values.update({name: getattr(moe, name) for name in fields if hasattr(moe, name)})
    values["head_size"] = model_cfg.head_dim or model_cfg.hidden // model_cfg.n_heads
    values["expert_ffn_hidden"] = moe.expert_ffn_hidden or model_cfg.ffn_hidden
    return MoEArgs(**values)


class Attention(nn.Module):
    """Grouped-query causal self-attention with an RMSNorm on each query and key head (Qwen3)."""

    def __init__(self, args: MoEArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.q_proj = nn.Linear(args.hidden, args.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden, args.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden, args.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * self.head_dim, args.hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps)
        self.core = CoreAttention(causal=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(bsz, seq, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(bsz, seq, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)  # as Llama's
        return self.o_proj(self.core(q, k, v, document_ids).reshape(bsz, seq, -1))


class MLP(nn.Module):
    """Dense SwiGLU feed-forward of the first ``dense_layers`` blocks."""

    def __init__(self, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn_hidden, bias=False)
        self.up_proj = nn.Linear(hidden, ffn_hidden, bias=False)
        self.down_proj = nn.Linear(ffn_hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    """Softmax over the experts' logits, then the top-k (``weight [E, H]``, HF's ``mlp.gate``)."""

    def __init__(self, args: MoEArgs) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = args.top_k, args.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(args.experts, args.hidden))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [T, E], probs fp32 [T, E], top-k weights [T, k] in x's dtype, top-k experts [T, k])``."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights.to(logits.dtype), experts


class Experts(nn.Module):
    """E SwiGLU experts stored as two stacked tensors (HF's fused layout).

    ``forward(tokens, counts)``: ``tokens`` are sorted by expert, ``counts[e]`` (a tensor) rows for local
    expert ``e``; returns each row through its expert, in the same order. Expert parallelism keeps only this
    rank's rows of both tensors and feeds it the tokens other ranks routed to them.
    """

    def __init__(self, args: MoEArgs) -> None:
        super().__init__()
        e, h, f = args.experts, args.hidden, args.expert_ffn_hidden
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, f))

    def forward(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if not tokens.shape[0]:  # no token routed here; keep the experts in the graph for a uniform backward
            return tokens[:0] + 0.0 * (self.gate_up_proj.sum() + self.down_proj.sum())
        # One grouped matmul per projection over all experts (torch's grouped_mm, as transformers runs
        # these experts), not a loop of per-expert matmuls.
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = F.grouped_mm(tokens, self.gate_up_proj.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
        return F.grouped_mm(silu_mul(gate, up), self.down_proj.transpose(-2, -1), offs=offsets)


class RouterLossGrad(torch.autograd.Function):
    """Identity on ``x``; in backward, feeds ``scale`` as the gradient of ``loss`` (a block's router loss).

    ``scale`` is the factor the engine applies to each micro-batch's language-model loss (``1 /
    grad_accum``), set from outside by :func:`set_router_loss_scale`; so the router losses' gradients
    are scaled exactly as the main loss is, in every layout, pipeline stages included.
    """

    scale: ClassVar[float] = 1.0

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, RouterLossGrad.scale)


def set_router_loss_scale(scale: float) -> None:
    """The factor on the router losses' gradient: the one the engine puts on each micro-batch's loss."""
    RouterLossGrad.scale = float(scale)


class RouterStats:
    """What the routers measured in training forwards since the last reset, for the metrics (never for
    gradients). Kept as detached tensors on the model's device, so a forward never waits for the device;
    the metrics read them once per logged step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens_per_expert: torch.Tensor | None = None  # token copies routed to each expert, summed
        self.losses: torch.Tensor | None = None  # (load-balancing, z, dropped copies), summed over forwards
        self.routed = 0  # token copies
        self.forwards = 0

    def add(self, counts: torch.Tensor, aux: torch.Tensor, z: torch.Tensor, dropped: torch.Tensor) -> None:
        losses = torch.stack([aux.detach().float(), z.detach().float(), dropped.float()])
        self.tokens_per_expert = counts if self.tokens_per_expert is None else self.tokens_per_expert + counts
        self.losses = losses if self.losses is None else self.losses + losses
        self.forwards += 1


class SparseMoeBlock(nn.Module):
    """Router plus experts (HF's ``mlp`` of a routed block); the router losses attach to its output."""

    def __init__(self, args: MoEArgs, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer  # the block's index in the model, for the per-layer metrics
        self.experts_total, self.top_k = args.experts, args.top_k
        self.capacity_factor = args.capacity_factor
        self.aux_loss_coef, self.z_loss_coef = args.aux_loss_coef, args.z_loss_coef
        self.gate = Router(args)
        self.experts = Experts(args)
        self.stats = RouterStats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        tokens, k, e = x.shape[0], self.top_k, self.experts_total
        logits, probs, weights, chosen = self.gate(x)
        flat = chosen.reshape(-1)
        counts = torch.bincount(flat, minlength=e)
        # Load-balancing loss (Switch Transformer): E * sum_e f_e * P_e, f_e the share of token copies
        # routed to e (summing to k, as in transformers' load_balancing_loss_func), P_e its mean probability.
        aux = e * torch.sum(counts.to(probs.dtype) / tokens * probs.mean(dim=0))
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()  # router z-loss (ST-MoE)
        if self.capacity_factor is None:  # dropless: every copy, sorted by expert (stable: in token order)
            order, kept_counts = torch.argsort(flat, stable=True), counts
        else:
            keep = _within_capacity(flat, e, math.ceil(self.capacity_factor * tokens * k / e))
            order = torch.argsort(torch.where(keep, flat, e), stable=True)[: int(keep.sum())]
            kept_counts = torch.bincount(flat[order], minlength=e)
        source = order // k  # the token each sorted copy comes from
        out = self.experts(x[source], kept_counts)
        out = out * weights.reshape(-1)[order].unsqueeze(-1)
        y = torch.zeros_like(x).index_add_(0, source, out.to(x.dtype))
        if self.training:  # evaluation and the checkpoint's probe are not the training step's routing
            self.stats.add(counts.detach(), aux, z, dropped=counts.sum() - kept_counts.sum())
            self.stats.routed += flat.numel()
        router_loss = self.aux_loss_coef * aux + self.z_loss_coef * z
        if torch.is_grad_enabled() and router_loss.requires_grad:
            y = RouterLossGrad.apply(y, router_loss)
        return y.reshape(shape)


def _within_capacity(flat: torch.Tensor, experts: int, capacity: int) -> torch.Tensor:
    """Which token copies (``flat``: expert of each, in token order) fit their expert's ``capacity``."""
    one_hot = F.one_hot(flat, experts)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1)  # 1-based place in its expert's queue
    return position <= capacity


class DecoderLayer(nn.Module):
    """Pre-norm block: attention then the routed experts (or the dense MLP), each with a residual."""

    def __init__(self, args: MoEArgs, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden, args.norm_eps)
        self.mlp: nn.Module = (SparseMoeBlock(args, index) if args.is_moe_layer(index)
                               else MLP(args.hidden, args.ffn_hidden))
        # Every block knows the model's routed blocks, so that a pipeline stage holding none of them
        # still reports their metrics' names (every rank must name the same ones).
        self.routed_layers = tuple(i for i in range(args.n_layers) if args.is_moe_layer(i))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, document_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class MoEBackbone(nn.Module):
    """Embedding, blocks and final norm; HF's ``Qwen3MoeModel`` (keys under ``model.``)."""

    def __init__(self, args: MoEArgs) -> None:
        super().__init__()
        self.args = args
        rows = args.padded_vocab_size
        self.embed_tokens: nn.Module | None = nn.Embedding(rows, args.hidden, _weight=torch.empty(rows, args.hidden))
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.n_layers))
        self.norm: nn.Module | None = RMSNorm(args.hidden, args.norm_eps)
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
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


class MoEForCausalLM(nn.Module):
    """Backbone plus output head; ``forward(tokens) -> logits`` with ``args.padded_vocab_size`` columns, or
    with ``labels`` each token's loss (the head fused with the cross-entropy, as the Llama family's)."""

    def __init__(self, args: MoEArgs) -> None:
        super().__init__()
        self.args = args
        self.model = MoEBackbone(args)
        self.lm_head: nn.Linear | None = LMHead(args.hidden, args.padded_vocab_size, real_vocab=args.vocab_size)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``tokens`` (with ``labels``: each token's fp32 loss); the other arguments as the Llama family's."""
        h = self.model(tokens, position_ids, document_ids)
        if self.lm_head is None:
            return h
        return self.lm_head(h) if labels is None else self.lm_head(h, labels)


def moe_blocks(model: nn.Module) -> list[SparseMoeBlock]:
    """The routed blocks of a model (or of a pipeline stage), in order."""
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def take_router_metrics(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Router metrics since the last call as ``name -> (sum, count)``, which the training loop adds over
    all ranks (pipeline stages hold different blocks) before dividing; resets the counters.

    ``moe_aux_loss`` and ``moe_z_loss`` (unscaled, per routed block and forward), ``moe_load_max_mean``
    (the most loaded expert's token copies over the mean, per block; 1.0 is perfect balance),
    ``moe_dropped`` (the share of token copies over capacity), and ``moe_load_max_mean/layer_NN`` for
    each routed block NN of the model. Every key is there on every rank.
    """
    blocks = [b for b in moe_blocks(model) if b.stats.forwards]
    losses = [b.stats.losses.tolist() for b in blocks]  # the one read of the device per block and record
    loads = {b.layer: float(b.stats.tokens_per_expert.max() / b.stats.tokens_per_expert.double().mean())
             for b in blocks}
    forwards = sum(b.stats.forwards for b in blocks)
    out = {"moe_aux_loss": (sum(aux for aux, _, _ in losses), forwards),
           "moe_z_loss": (sum(z for _, z, _ in losses), forwards),
           "moe_load_max_mean": (sum(loads.values()), len(blocks)),
           "moe_dropped": (sum(d for _, _, d in losses), sum(b.stats.routed for b in blocks))}
    routed = next((m.routed_layers for m in model.modules() if isinstance(m, DecoderLayer)), ())
    width = len(str(max(routed, default=0)))
    for layer in routed:
        out[f"moe_load_max_mean/layer_{layer:0{width}d}"] = (loads.get(layer, 0.0), 1 if layer in loads else 0)
    for b in moe_blocks(model):
        b.stats.reset()
    return {k: (float(total), float(count)) for k, (total, count) in out.items()}


__all__ = ["MoEArgs", "MoEForCausalLM", "DecoderLayer", "SparseMoeBlock", "Experts", "Router", "args_from_config",
           "causal_lm_loss", "moe_blocks", "set_router_loss_scale", "take_router_metrics"]
