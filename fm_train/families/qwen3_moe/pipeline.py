"""The MoE decoder as a DeepSpeed ``PipelineModule``: embedding, blocks, final norm, head, loss.

As the Llama family's pipeline: layer ``i`` is one of the pure model's own modules (the block
subclassed only for the one-tensor calling convention), built on the meta device, tensor-parallel
sharded by the plan and materialised with this rank's shard, so its keys are Hugging Face keys. A
routed block's router losses reach the backward pass inside its own stage (``RouterLossGrad``), so
nothing but the hidden states travels between stages.
"""

from __future__ import annotations

import functools

import torch

from fm_train.deepspeed_adapter.pipeline import FmPipelineModule, LayerSpec, TiedLayerSpec
from fm_train.families.llama.model import RMSNorm, rope_at, rope_tables
from fm_train.families.qwen3_moe.model import DecoderLayer, MoEArgs, causal_lm_loss
from fm_train.families.qwen3_moe.tp_plan import TP_PLAN as PLAN
from fm_train.parallel.pipeline import (
    TIED_KEY,
    EmbeddingPipe,
    HeadLoss,
    layer_counts,
    pipeline_module,
    stage_bounds_of,
    tied_head_forward,
    vocab_loss,
)
from fm_train.parallel.sequence_parallel import split_stage_input
from fm_train.parallel.sharded_init import InitSource, full_shapes, materialize_
from fm_train.parallel.tensor_parallel import ColumnParallelLinear, TPGroup, apply_tensor_parallel


class DecoderBlockPipe(DecoderLayer):
    """Layer ``1 + index``: the pure ``DecoderLayer`` (``model.layers.{index}``), tp-sharded."""

    def __init__(self, args: MoEArgs, index: int, tp: TPGroup, seed: InitSource) -> None:
        with torch.device("meta"):
            super().__init__(args, index)
        apply_tensor_parallel(self, tp, PLAN)
        materialize_(self, args, seed, tp, PLAN, prefix=f"model.layers.{index}.")
        self.head_size, self.rope_theta = args.head_dim, args.rope_theta

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:  # type: ignore[override]
        hidden, extra = split_stage_input(x)  # positions and document ids travel on, as in the Llama pipeline
        if extra:
            cos, sin = rope_at(extra[0], self.head_size, self.rope_theta)
            return (super().forward(hidden, cos, sin, extra[1] if len(extra) > 1 else None), *extra)
        cos, sin = rope_tables(self.head_size, hidden.shape[1], self.rope_theta, device=hidden.device)
        return super().forward(hidden, cos, sin)


class FinalNormPipe(RMSNorm):
    """The final ``model.norm``."""

    def __init__(self, args: MoEArgs, tp: TPGroup, seed: InitSource) -> None:
        with torch.device("meta"):
            super().__init__(args.hidden, args.norm_eps)
        materialize_(self, args, seed, tp, PLAN, prefix="model.norm.")

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:  # type: ignore[override]
        return super().forward(split_stage_input(x)[0])


class LMHeadPipe(ColumnParallelLinear):
    """The untied ``lm_head``: column-parallel over the vocabulary; its weight goes to the fused loss
    (:class:`~fm_train.parallel.pipeline.HeadLoss`), or with that off, its logits stay sharded for the loss."""

    def __init__(self, args: MoEArgs, tp: TPGroup, seed: InitSource, head_loss: HeadLoss) -> None:
        super().__init__(args.hidden, args.padded_vocab_size, tp, device="meta")
        materialize_(self, args, seed, tp, PLAN, prefix="lm_head.")
        self.head_loss = head_loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_loss.head_output(self, x)


def pipeline_layer_names(args: MoEArgs) -> dict[int, str]:
    """Pipeline layer index -> the pure model's module prefix of that layer's parameters."""
    names = {0: "model.embed_tokens"}
    names.update({1 + i: f"model.layers.{i}" for i in range(args.n_layers)})
    names[args.n_layers + 1] = "model.norm"
    names[args.n_layers + 2] = "lm_head"
    return names


def layer_param_counts(args: MoEArgs) -> list[int]:
    """Unsharded parameter count of each pipeline layer (the tied head counts: its stage holds a copy)."""
    overrides = {args.n_layers + 2: "model.embed_tokens"} if args.tie_embeddings else None
    return layer_counts(pipeline_layer_names(args), full_shapes(args), overrides)


def stage_bounds(args: MoEArgs, pp: int) -> list[int]:
    """Layer boundaries of the ``pp`` stages; ``ValueError`` naming the fix when a stage would own no block."""
    return stage_bounds_of(layer_param_counts(args), range(1, args.n_layers + 1), pp, "decoder block")


def build_pipeline(args: MoEArgs, *, pp: int, dp: int, tp: TPGroup, seed: InitSource,
                   activation_checkpointing: bool = False) -> FmPipelineModule:
    """The pipeline of ``args`` over a ``pp x dp x tp`` grid; every rank of the world calls this."""
    stage_bounds(args, pp)
    unfused = vocab_loss(functools.partial(causal_lm_loss, vocab_size=args.vocab_size), args.vocab_size, tp)
    loss = HeadLoss(args.vocab_size, tp, unfused)  # the head fused with the loss, as the Llama family's
    embedding = (args, tp, seed, PLAN, "model.embed_tokens")
    embed: LayerSpec
    if args.tie_embeddings:
        embed = TiedLayerSpec(TIED_KEY, EmbeddingPipe, *embedding)
        head: LayerSpec = TiedLayerSpec(TIED_KEY, EmbeddingPipe, *embedding,
                                        forward_fn=functools.partial(tied_head_forward, head_loss=loss))
    else:
        embed, head = LayerSpec(EmbeddingPipe, *embedding), LayerSpec(LMHeadPipe, args, tp, seed, loss)
    layers = [embed, *(LayerSpec(DecoderBlockPipe, args, i, tp, seed) for i in range(args.n_layers)),
              LayerSpec(FinalNormPipe, args, tp, seed), head]
    return pipeline_module(layers, layer_param_counts(args), pp=pp, dp=dp, tp=tp, loss_fn=loss,
                           activation_checkpointing=activation_checkpointing, block_class=DecoderBlockPipe)
