"""The pure model as a DeepSpeed ``PipelineModule``: embedding, decoder blocks, final norm, head, loss.

Layer ``i`` of the pipeline is one of the pure model's own modules (``DecoderLayer`` and ``RMSNorm``
subclassed only to fit the ``PipelineModule`` calling convention, one tensor in, one out), so every
layer's state-dict keys, prefixed by :func:`pipeline_layer_names`, are Hugging Face keys. Each
layer is built on the meta device, tensor-parallel sharded by the plan and then materialised with
this rank's shard only; a stage never allocates another stage's layers.

Stages are balanced by parameter count. Parameter counts come from the shapes, not from building
every layer on every rank as DeepSpeed's own ``'parameters'`` method does.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from deepspeed.runtime.utils import partition_balanced

from fm_train.model.llama import DecoderLayer, LlamaArgs, RMSNorm, causal_lm_loss, rope_tables
from fm_train.parallel.sharded_init import InitSource, full_shapes, materialize_
from fm_train.parallel.tensor_parallel import (
    ColumnParallelLinear,
    TPGroup,
    VocabParallelEmbedding,
    apply_tensor_parallel,
    copy_to_tp,
    vocab_parallel_cross_entropy,
)

TIED_KEY = "embed"


class EmbeddingPipe(VocabParallelEmbedding):
    """Layer 0: token ids -> hidden states (``model.embed_tokens``); with tied embeddings also the head."""

    def __init__(self, args: LlamaArgs, tp: TPGroup, seed: InitSource) -> None:
        super().__init__(args.padded_vocab_size, args.hidden, tp, device="meta")
        materialize_(self, args, seed, tp, prefix="model.embed_tokens.")

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        # DeepSpeed hands the first stage the input tuple of the batch, ``(input_ids,)``.
        ids = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        return super().forward(ids)


def tied_head_forward(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """Last stage with tied embeddings: this rank's vocabulary shard of the logits, ``h E_local^T``."""
    return F.linear(copy_to_tp(hidden, embedding.tp), embedding.weight)


class DecoderBlockPipe(DecoderLayer):
    """Layer ``1 + index``: the pure ``DecoderLayer`` (``model.layers.{index}``), tp-sharded."""

    def __init__(self, args: LlamaArgs, index: int, tp: TPGroup, seed: InitSource) -> None:
        with torch.device("meta"):
            super().__init__(args)
        apply_tensor_parallel(self, tp)
        materialize_(self, args, seed, tp, prefix=f"model.layers.{index}.")
        self.head_dim, self.rope_theta = args.head_dim, args.rope_theta

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # RoPE tables for this sequence length, recomputed here rather than sent between stages
        # (p2p and DeepSpeed's activation partitioning want one activation tensor) or stored per
        # block (max_seq_len x head_dim per layer); they cost O(seq x head_dim), nothing next to a block.
        cos, sin = rope_tables(self.head_dim, hidden.shape[1], self.rope_theta, device=hidden.device)
        return super().forward(hidden, cos, sin)


class FinalNormPipe(RMSNorm):
    """The final ``model.norm``."""

    def __init__(self, args: LlamaArgs, tp: TPGroup, seed: InitSource) -> None:
        with torch.device("meta"):
            super().__init__(args.hidden, args.norm_eps)
        materialize_(self, args, seed, tp, prefix="model.norm.")


class LMHeadPipe(ColumnParallelLinear):
    """The untied ``lm_head``: column-parallel over the vocabulary, logits stay sharded for the loss."""

    def __init__(self, args: LlamaArgs, tp: TPGroup, seed: InitSource) -> None:
        super().__init__(args.hidden, args.padded_vocab_size, tp, device="meta")
        materialize_(self, args, seed, tp, prefix="lm_head.")


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
    shapes = full_shapes(args)
    head_prefix = "model.embed_tokens" if args.tie_embeddings else "lm_head"
    prefixes = [*pipeline_layer_names(args).values()][:-1] + [head_prefix]
    return [sum(s.numel() for n, s in shapes.items() if n.startswith(prefix + ".")) for prefix in prefixes]


def stage_bounds(args: LlamaArgs, pp: int) -> list[int]:
    """Layer boundaries of the ``pp`` stages (stage ``s`` owns layers ``[b[s], b[s + 1])``).

    The same balanced partition DeepSpeed computes from :func:`layer_param_counts`; raises a
    ``ValueError`` naming the fix when some stage would own no decoder block.
    """
    if args.n_layers < pp:
        raise ValueError(f"model.n_layers={args.n_layers} is smaller than parallel.pp={pp}: every stage needs"
                         " a decoder block; lower parallel.pp or add layers")
    bounds = [int(b) for b in partition_balanced(weights=layer_param_counts(args), num_parts=pp)]
    for s in range(pp):
        blocks = [i for i in range(bounds[s], bounds[s + 1]) if 1 <= i <= args.n_layers]
        if not blocks:
            raise ValueError(
                f"pipeline stage {s} of {pp} gets no decoder block when balancing by parameters (layer"
                f" bounds {bounds}; the embedding/head are large next to a block); lower parallel.pp"
            )
    return bounds


class FmPipelineModule(PipelineModule):
    """``PipelineModule`` with shape-based stage balancing and gradient-norm bookkeeping for tp + pp."""

    def __init__(self, layers: list[LayerSpec], *, counts: list[int], tp: TPGroup, **kwargs: Any) -> None:
        for spec, count in zip(layers, counts):
            spec.param_count = count  # read by _count_layer_params during super().__init__
        super().__init__(layers, **kwargs)
        self._mark_gradient_norm_owners(tp)

    def _count_layer_params(self) -> list[int]:
        # DeepSpeed builds every layer of every stage here to count its parameters; shapes suffice.
        return [spec.param_count for spec in self._layer_specs]

    def _mark_gradient_norm_owners(self, tp: TPGroup) -> None:
        """Make each parameter count exactly once in DeepSpeed's global gradient norm.

        DeepSpeed counts a parameter if it is flagged model-parallel or if the rank is rank 0 of a
        "model-parallel" group. ZeRO reads that rank within the tp group, but the plain fp32 path
        (``clip_grad_norm_``) reads it within the pipeline grid's pipe x tp group, where it would drop
        every replicated weight outside stage 0 and count the tied head twice. So: a shard counts on
        its rank, a replicated weight on tp rank 0 of its stage, a stage's copy of a tied weight that
        DeepSpeed marked ``ds_pipe_replicated`` nowhere.
        """
        for p in self.parameters():
            owner = (getattr(p, "tensor_model_parallel", False) or tp.rank == 0) and not getattr(p, "ds_pipe_replicated", False)
            p.model_parallel = owner
            p.tensor_model_parallel = owner


def loss_fn_for(args: LlamaArgs, tp: TPGroup) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss over this rank's logits: cross-entropy over the real vocabulary, vocab-parallel when tp > 1."""
    if tp.size == 1:
        return functools.partial(causal_lm_loss, vocab_size=args.vocab_size)
    return functools.partial(vocab_parallel_cross_entropy, tp=tp, vocab_size=args.vocab_size)


def build_pipeline(args: LlamaArgs, *, pp: int, dp: int, tp: TPGroup, seed: InitSource,
                   activation_checkpointing: bool = False) -> FmPipelineModule:
    """The pipeline of ``args`` over a ``pp x dp x tp`` grid (DeepSpeed's axis order, as our Topology).

    Every rank of the world calls this (``PipelineModule`` creates process groups); each builds its
    own stage's layers with its own tp shard. Feed it ``((input_ids,), labels)`` via ``train_batch``.
    """
    stage_bounds(args, pp)  # clear error before DeepSpeed partitions
    embed: LayerSpec
    if args.tie_embeddings:
        embed = TiedLayerSpec(TIED_KEY, EmbeddingPipe, args, tp, seed)
        head: LayerSpec = TiedLayerSpec(TIED_KEY, EmbeddingPipe, args, tp, seed, forward_fn=tied_head_forward)
    else:
        embed, head = LayerSpec(EmbeddingPipe, args, tp, seed), LayerSpec(LMHeadPipe, args, tp, seed)
    layers = [embed, *(LayerSpec(DecoderBlockPipe, args, i, tp, seed) for i in range(args.n_layers)),
              LayerSpec(FinalNormPipe, args, tp, seed), head]
    return FmPipelineModule(
        layers,
        counts=layer_param_counts(args),
        tp=tp,
        topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp.size, num_dp=dp),
        loss_fn=loss_fn_for(args, tp),
        partition_method="parameters",
        # One block per checkpoint segment; only blocks are recomputed (the embedding's integer input
        # cannot require grad, which reentrant checkpointing needs).
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        checkpointable_layers=[DecoderBlockPipe.__name__],
    )
