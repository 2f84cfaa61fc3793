"""The Llama decoder as a DeepSpeed ``PipelineModule``: embedding, decoder blocks, final norm, head, loss.

Layer ``i`` of the pipeline is one of the pure model's own modules (``DecoderLayer`` and ``RMSNorm``
subclassed only to fit the ``PipelineModule`` calling convention, one tensor in, one out), so every
layer's state-dict keys, prefixed by :func:`pipeline_layer_names`, are Hugging Face keys. Each
layer is built on the meta device, tensor-parallel sharded by the plan and then materialised with
this rank's shard only; a stage never allocates another stage's layers.
"""

from __future__ import annotations

import functools

import torch

from fm_train.deepspeed_adapter.pipeline import (
    FmPipelineModule,
    LayerSpec,
    TiedLayerSpec,
)
from fm_train.families.llama.model import (
    DecoderLayer,
    LlamaArgs,
    RMSNorm,
    causal_lm_loss,
    rope_at,
    rope_tables,
)
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
from fm_train.parallel.tensor_parallel import (
    ColumnParallelLinear,
    TPGroup,
    apply_tensor_parallel,
)
from fm_train.families.llama.tp_plan import TP_PLAN as PLAN


class DecoderBlockPipe(DecoderLayer):
    """Layer ``1 + index``: the pure ``DecoderLayer`` (``model.layers.{index}``), tp-sharded."""

    def __init__(self, args: LlamaArgs, index: int, tp: TPGroup, seed: InitSource) -> None:
        with torch.device("meta"):
            super().__init__(args)
        apply_tensor_parallel(self, tp, PLAN)
        materialize_(self, args, seed, tp, PLAN, prefix=f"model.layers.{index}.")
        self.head_dim, self.rope_theta = args.head_dim, args.rope_theta
        self.seq_split = tp.size if tp.sequence_parallel else 1  # hidden holds seq / tp tokens between the regions

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:  # type: ignore[override]
        # RoPE tables recomputed here rather than stored per block (max_seq_len x head_dim per layer);
        # they cost O(seq x head_dim), nothing next to a block. Positions (and document ids) travel with
        # the hidden states when the sequence is split or masked (split_stage_input), else 0..seq-1.
        hidden, extra = split_stage_input(x)
        if extra:
            cos, sin = rope_at(extra[0], self.head_dim, self.rope_theta)
            out = super().forward(hidden, cos, sin, extra[1] if len(extra) > 1 else None)
            return (out, *extra)
        seq = hidden.shape[1] * self.seq_split
        cos, sin = rope_tables(self.head_dim, seq, self.rope_theta, device=hidden.device)
        return super().forward(hidden, cos, sin)


class FinalNormPipe(RMSNorm):
    """The final ``model.norm`` (what traveled with the hidden states stops here)."""

    def __init__(self, args: LlamaArgs, tp: TPGroup, seed: InitSource) -> None:
        with torch.device("meta"):
            super().__init__(args.hidden, args.norm_eps)
        apply_tensor_parallel(self, tp, PLAN)  # whole, but with the sequence split its gradient is summed over tp
        materialize_(self, args, seed, tp, PLAN, prefix="model.norm.")

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:  # type: ignore[override]
        return super().forward(split_stage_input(x)[0])


class LMHeadPipe(ColumnParallelLinear):
    """The untied ``lm_head``: column-parallel over the vocabulary; its weight goes to the fused loss
    (:class:`~fm_train.parallel.pipeline.HeadLoss`), or with that off, its logits stay sharded for the loss."""

    def __init__(self, args: LlamaArgs, tp: TPGroup, seed: InitSource, head_loss: HeadLoss) -> None:
        super().__init__(args.hidden, args.padded_vocab_size, tp, device="meta")
        materialize_(self, args, seed, tp, PLAN, prefix="lm_head.")
        self.head_loss = head_loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_loss.head_output(self, x)


def pipeline_layer_names(args: LlamaArgs) -> dict[int, str]:
    """Pipeline layer index -> the pure model's module prefix of that layer's parameters.

    ``layer_XX-model_states.pt`` key ``k`` is the Hugging Face key ``f"{names[XX]}.{k}"``. With tied
    embeddings the last layer (``lm_head``) is the embedding itself and DeepSpeed writes no file for it.
    """
    names = {0: "model.embed_tokens"}
    names.update({1 + i: f"model.layers.{i}" for i in range(args.n_layers)})
    names[args.n_layers + 1] = "model.norm"
    names[args.n_layers + 2] = "lm_head"
    return names


def layer_param_counts(args: LlamaArgs) -> list[int]:
    """Unsharded parameter count of each pipeline layer (the tied head counts: its stage holds a copy)."""
    overrides = {args.n_layers + 2: "model.embed_tokens"} if args.tie_embeddings else None
    return layer_counts(pipeline_layer_names(args), full_shapes(args), overrides)


def stage_bounds(args: LlamaArgs, pp: int) -> list[int]:
    """Layer boundaries of the ``pp`` stages (stage ``s`` owns layers ``[b[s], b[s + 1])``).

    The same balanced partition DeepSpeed computes from :func:`layer_param_counts`; raises a
    ``ValueError`` naming the fix when some stage would own no decoder block.
    """
    return stage_bounds_of(layer_param_counts(args), range(1, args.n_layers + 1), pp, "decoder block")


def loss_fn_for(args: LlamaArgs, tp: TPGroup) -> HeadLoss:
    """The training loss: cross-entropy over the real vocabulary from the head's input and weight (fused,
    vocab-parallel when tp > 1), or over this rank's logits while the fused form is off."""
    unfused = vocab_loss(functools.partial(causal_lm_loss, vocab_size=args.vocab_size), args.vocab_size, tp)
    return HeadLoss(args.vocab_size, tp, unfused)


def build_pipeline(args: LlamaArgs, *, pp: int, dp: int, tp: TPGroup, seed: InitSource,
                   activation_checkpointing: bool = False) -> FmPipelineModule:
    """The pipeline of ``args`` over a ``pp x dp x tp`` grid (DeepSpeed's axis order, as our Topology).

    Every rank of the world calls this (``PipelineModule`` creates process groups); each builds its
    own stage's layers with its own tp shard. Feed it ``((input_ids,), labels)`` via ``train_batch``.
    """
    stage_bounds(args, pp)  # clear error before DeepSpeed partitions
    loss = loss_fn_for(args, tp)
    embed: LayerSpec
    embedding = (args, tp, seed, PLAN, "model.embed_tokens")
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
