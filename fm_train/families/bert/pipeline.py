"""The BERT encoder as a DeepSpeed ``PipelineModule``: word embeddings, the rest of the embeddings,
encoder blocks, the prediction transform, the tied decoder and the decoder's bias, then the loss.

The loss is the head fused with the cross-entropy (:class:`~fm_train.parallel.pipeline.HeadLoss`), as the
pure model's: the last three layers hand it the transform, the decoder's weight and the bias and pass
the hidden states on; it keeps the masked tokens' rows, runs the transform on them and the decoder
(vocab-parallel over tp) a few rows at a time. With it off (the probe) they compute the logits.

The word embedding is its own layer so that the last stage can tie the decoder to it (a
``TiedLayerSpec`` ties a module's ``weight``; DeepSpeed sums the two stages' gradients); the MLM bias
follows the decoder as a layer of its own for the same reason. Every other layer is one of the pure
model's modules, so each layer's keys, prefixed by :func:`pipeline_layer_names`, are
``BertForMaskedLM`` keys. Layers are built on the meta device, split by the BERT tp plan and
materialised with this rank's shard only.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fm_train.deepspeed_adapter.pipeline import (
    FmPipelineModule,
    LayerSpec,
    TiedLayerSpec,
)
from fm_train.families.bert.model import (
    BertArgs,
    BertLayer,
    BertPredictionHeadTransform,
    masked_lm_loss,
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
from fm_train.parallel.sharded_init import InitSource, full_shapes, materialize_
from fm_train.parallel.tensor_parallel import TPGroup, apply_tensor_parallel
from fm_train.families.bert.tp_plan import TP_PLAN as PLAN


class EmbeddingSumPipe(nn.Module):
    """Layer 1: plus position and token-type embeddings, then LayerNorm (the rest of ``bert.embeddings``).

    Pretraining batches are single segments, so every token has type 0, as ``BertEmbeddings`` assumes
    when it is given no ``token_type_ids``.
    """

    def __init__(self, args: BertArgs, tp: TPGroup, seed: InitSource) -> None:
        super().__init__()
        with torch.device("meta"):
            self.position_embeddings = nn.Embedding(args.max_seq_len, args.hidden)
            self.token_type_embeddings = nn.Embedding(args.type_vocab_size, args.hidden)
            self.LayerNorm = nn.LayerNorm(args.hidden, eps=args.norm_eps)
        materialize_(self, args, seed, tp, PLAN, prefix="bert.embeddings.")

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        # The same sum, in the same order, as BertEmbeddings.forward.
        h = words + self.position_embeddings.weight[: words.shape[1]] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(h)


class EncoderBlockPipe(BertLayer):
    """Layer ``2 + index``: the pure ``BertLayer`` (``bert.encoder.layer.{index}``), tp-sharded."""

    def __init__(self, args: BertArgs, index: int, tp: TPGroup, seed: InitSource) -> None:
        with torch.device("meta"):
            super().__init__(args)
        apply_tensor_parallel(self, tp, PLAN)
        materialize_(self, args, seed, tp, PLAN, prefix=f"bert.encoder.layer.{index}.")


class TransformPipe(BertPredictionHeadTransform):
    """``cls.predictions.transform``: dense, GELU, LayerNorm, replicated on every tp rank; fused, the loss
    applies it to the masked rows (:meth:`HeadLoss.transform_output`)."""

    def __init__(self, args: BertArgs, tp: TPGroup, seed: InitSource, head_loss: HeadLoss) -> None:
        with torch.device("meta"):
            super().__init__(args)
        materialize_(self, args, seed, tp, PLAN, prefix="cls.predictions.transform.")
        self.head_loss = head_loss

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head_loss.transform_output(super().forward, h)


class PredictionBiasPipe(nn.Module):
    """The last layer: the MLM bias (``cls.predictions.bias``), this rank's columns; added to its logit
    shard, or fused, handed to the loss (:meth:`HeadLoss.bias_output`)."""

    def __init__(self, args: BertArgs, tp: TPGroup, seed: InitSource, head_loss: HeadLoss) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(tp.split(args.padded_vocab_size, "the padded vocabulary"), device="meta"))
        materialize_(self, args, seed, tp, PLAN, prefix="cls.predictions.")
        self.head_loss = head_loss

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.head_loss.bias_output(self, logits)


def pipeline_layer_names(args: BertArgs) -> dict[int, str]:
    """Pipeline layer index -> the pure model's module prefix of that layer's parameters.

    ``layer_XX-model_states.pt`` key ``k`` is the ``BertForMaskedLM`` key ``f"{names[XX]}.{k}"``; the
    decoder layer is the word embedding itself (tied) and DeepSpeed writes no file for it.
    """
    n = args.n_layers
    names = {0: "bert.embeddings.word_embeddings", 1: "bert.embeddings"}
    names.update({2 + i: f"bert.encoder.layer.{i}" for i in range(n)})
    names.update({n + 2: "cls.predictions.transform", n + 3: "cls.predictions.decoder", n + 4: "cls.predictions"})
    return names


def layer_param_counts(args: BertArgs) -> list[int]:
    """Unsharded parameter count of each pipeline layer (the tied decoder counts: its stage holds a copy)."""
    decoder_is_the_embedding = {args.n_layers + 3: "bert.embeddings.word_embeddings"}
    return layer_counts(pipeline_layer_names(args), full_shapes(args), decoder_is_the_embedding)


def stage_bounds(args: BertArgs, pp: int) -> list[int]:
    """Layer boundaries of the ``pp`` stages, balanced by parameters; ``ValueError`` when a stage would
    own no encoder block."""
    return stage_bounds_of(layer_param_counts(args), range(2, args.n_layers + 2), pp, "encoder block")


def loss_fn_for(args: BertArgs, tp: TPGroup) -> HeadLoss:
    """The training loss: the masked tokens' cross-entropy over the real vocabulary, the transform and the
    decoder fused with it on those rows only (vocab-parallel when tp > 1), or over this rank's logits while
    the fused form is off."""
    unfused = vocab_loss(functools.partial(masked_lm_loss, vocab_size=args.vocab_size), args.vocab_size, tp)
    return HeadLoss(args.vocab_size, tp, unfused, labelled_only=True)


def build_pipeline(args: BertArgs, *, pp: int, dp: int, tp: TPGroup, seed: InitSource,
                   activation_checkpointing: bool = False) -> FmPipelineModule:
    """The encoder's pipeline over a ``pp x dp x tp`` grid; every rank of the world calls this. Feed it
    ``((input_ids,), labels)`` with labels ``-100`` where nothing was masked."""
    stage_bounds(args, pp)  # clear error before DeepSpeed partitions
    loss = loss_fn_for(args, tp)
    words = (args, tp, seed, PLAN, "bert.embeddings.word_embeddings")
    layers = [
        TiedLayerSpec(TIED_KEY, EmbeddingPipe, *words),
        LayerSpec(EmbeddingSumPipe, args, tp, seed),
        *(LayerSpec(EncoderBlockPipe, args, i, tp, seed) for i in range(args.n_layers)),
        LayerSpec(TransformPipe, args, tp, seed, loss),
        # The decoder: the word embedding's shard of the logits (the bias is the next layer's).
        TiedLayerSpec(TIED_KEY, EmbeddingPipe, *words, forward_fn=functools.partial(tied_head_forward, head_loss=loss)),
        LayerSpec(PredictionBiasPipe, args, tp, seed, loss),
    ]
    return pipeline_module(layers, layer_param_counts(args), pp=pp, dp=dp, tp=tp, loss_fn=loss,
                           activation_checkpointing=activation_checkpointing, block_class=EncoderBlockPipe)
