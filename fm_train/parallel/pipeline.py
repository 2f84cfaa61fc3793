"""What every family's DeepSpeed ``PipelineModule`` shares: stage balancing by parameter count, the loss
over (vocab-parallel) logits and the manifest's layer table; DeepSpeed's side (the ``PipelineModule``
subclass with the gradient-norm bookkeeping for tp + pp, layer specs, the partitioner) is
:mod:`fm_train.deepspeed_adapter.pipeline`. A family's own pipeline (:mod:`fm_train.families.llama.pipeline`,
:mod:`fm_train.families.bert.pipeline`) lists its layers and calls :func:`pipeline_module`.

Stages are balanced by parameter count. Parameter counts come from the shapes, not from building
every layer on every rank as DeepSpeed's own ``'parameters'`` method does.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from fm_train.deepspeed_adapter.pipeline import (
    FmPipelineModule,
    LayerSpec,
    balanced_bounds,
)
from fm_train.deepspeed_adapter.pipeline import pipeline_module as _ds_pipeline_module
from fm_train.parallel.sequence_parallel import split_stage_input
from fm_train.parallel.sharded_init import InitSource, materialize_
from fm_train.model.loss import IGNORE_INDEX, linear_cross_entropy, token_mean
from fm_train.parallel.tensor_parallel import (
    TPGroup,
    VocabParallelEmbedding,
    copy_to_tp,
    tp_combine,
    vocab_parallel_cross_entropy,
)
from fm_train.parallel.tp_plan import TPPlan

#: DeepSpeed's tied-module key of the word embedding that is also the output head.
TIED_KEY = "embed"

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class EmbeddingPipe(VocabParallelEmbedding):
    """Layer 0: token ids -> the token embeddings (the pure model's ``module``), vocab-parallel; with a
    tied head also the last stage's output layer (:func:`tied_head_forward`)."""

    def __init__(self, args: Any, tp: TPGroup, seed: InitSource, plan: TPPlan, module: str) -> None:
        super().__init__(args.padded_vocab_size, args.hidden, tp, device="meta")
        materialize_(self, args, seed, tp, plan, prefix=module + ".")

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        # DeepSpeed hands the first stage the input tuple of the batch, ``(input_ids,)``, or with sequence
        # parallelism or document masking ``(input_ids, position_ids[, document_ids])``: those travel on.
        ids, extra = split_stage_input(inputs)
        hidden = super().forward(ids)
        return (hidden, *extra) if extra else hidden


def tied_head_forward(embedding: EmbeddingPipe, hidden: torch.Tensor, head_loss: "HeadLoss | None" = None
                      ) -> torch.Tensor:
    """The tied output layer on the last stage: this rank's vocabulary shard of the logits, ``h E_local^T``;
    with a fused ``head_loss``, the hidden states it turns into losses (:meth:`HeadLoss.head_output`)."""
    if head_loss is not None:
        return head_loss.head_output(embedding, hidden)
    return F.linear(copy_to_tp(hidden, embedding.tp, fresh_grad=True), embedding.weight)


class HeadLoss:
    """A pipeline's loss with the output head fused into it: the full logits never exist on the last stage.

    The head layer (an untied head, or the tied embedding's second use) calls :meth:`head_output`, which
    remembers the layer and passes the hidden states on; the loss then computes each token's
    cross-entropy from them and the layer's weight (this rank's vocabulary rows) in chunks
    (:func:`~fm_train.model.loss.linear_cross_entropy`, vocab-parallel over tp) and takes their mean.
    With ``fused`` off (the checkpoint probe wants logits) the head layer returns this rank's logits and
    ``unfused``, the loss over logits, applies.

    An encoder's head has more to it (BERT's): a layer before the head that the loss applies (a transform,
    :meth:`transform_output`) and a bias held by a layer after it (:meth:`bias_output`). With
    ``labelled_only`` the loss first keeps the tokens whose label is not ``-100``, so the transform and the
    head run on those rows only (a masked LM's ~15 %); the rows enter the tp region after the transform
    (replicated, its gradient whole on every rank), which the sequence split inside tp would not allow.
    """

    def __init__(self, vocab_size: int, tp: TPGroup, unfused: LossFn, *, labelled_only: bool = False) -> None:
        if labelled_only and tp.sequence_parallel:
            raise ValueError("HeadLoss(labelled_only=True) picks rows of the whole sequence: it cannot run with"
                             " the sequence split inside tensor parallelism (parallel.tp_sequence_parallel)")
        self.vocab_size, self.tp, self.unfused = vocab_size, tp, unfused
        self.labelled_only = labelled_only
        self.fused = True
        self._head: torch.nn.Module | None = None
        self._transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._bias: torch.nn.Module | None = None

    def head_output(self, head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the head layer (whose ``weight`` holds this rank's vocabulary rows) returns for ``hidden``."""
        self._head = head
        if self.fused:
            return hidden
        return F.linear(copy_to_tp(hidden, self.tp, fresh_grad=True), head.weight)

    def transform_output(self, transform: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor
                         ) -> torch.Tensor:
        """What a layer before the head returns: ``transform(hidden)``, or fused, ``hidden`` (the loss applies
        ``transform``, to the labelled rows only with ``labelled_only``)."""
        self._transform = transform
        return hidden if self.fused else transform(hidden)

    def bias_output(self, holder: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        """What a layer after the head holding its ``bias`` (this rank's columns) returns: the head's logits
        plus the bias, or fused, the hidden states the loss takes (and adds the bias to its logits)."""
        self._bias = holder
        return output if self.fused else output + holder.bias

    def __call__(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.unfused(output, labels)
        if self._head is None:
            raise RuntimeError("HeadLoss: the pipeline's head layer never ran (it must call head_output)")
        hidden, labels = output, labels.reshape(-1)
        if self.labelled_only:
            keep = labels != IGNORE_INDEX
            hidden, labels = hidden.reshape(-1, hidden.shape[-1])[keep], labels[keep]
        if self._transform is not None:
            hidden = self._transform(hidden)
        hidden = copy_to_tp(hidden, self.tp, fresh_grad=True)  # under the sequence split: [batch, seq / tp, hidden] gathered
        hidden = hidden.reshape(-1, hidden.shape[-1])
        weight = self._head.weight
        start = self.tp.rank * weight.shape[0]
        losses = linear_cross_entropy(hidden, weight, labels, bias=None if self._bias is None else self._bias.bias,
                                      vocab_start=start, real_vocab=self.vocab_size - start,
                                      combine=tp_combine(self.tp))
        return token_mean(losses, labels)


def layer_counts(layer_names: Mapping[int, str], shapes: Mapping[str, torch.Size],
                 overrides: Mapping[int, str] | None = None) -> list[int]:
    """Unsharded parameter count of each pipeline layer: the parameters it holds (those under its module
    prefix that no longer prefix claims), or for a layer in ``overrides`` those another layer's module
    holds (a tied head counts as the embedding: its stage keeps a copy)."""
    owner = _owners(list(layer_names.values()), list(shapes))
    counted = {i: (overrides or {}).get(i, m) for i, m in layer_names.items()}
    return [sum(shapes[n].numel() for n, m in owner.items() if m == counted[i]) for i in sorted(counted)]


def _owners(modules: list[str], names: list[str]) -> dict[str, str]:
    """Parameter name -> the longest module prefix in ``modules`` it lies under (unclaimed names left out)."""
    out = {}
    for name in names:
        under = [m for m in modules if name.startswith(m + ".")]
        if under:
            out[name] = max(under, key=len)
    return out


def layer_table(layer_names: Mapping[int, str], dims: Mapping[str, int | None]) -> list[dict[str, Any]]:
    """The manifest's layer table: per pipeline layer its pure-model module and the tp split dims of the
    parameters it holds, by local name (a parameter belongs to the longest module prefix it lies under)."""
    owner = _owners(list(layer_names.values()), list(dims))
    table = []
    for index, module in sorted(layer_names.items()):
        prefix = module + "."
        local = {n[len(prefix):]: dims[n] for n, m in owner.items() if m == module}
        table.append({"index": index, "module": module, "tp_split_dims": local})
    return table


def stage_bounds_of(counts: list[int], blocks: range, pp: int, block: str) -> list[int]:
    """Layer boundaries of ``pp`` stages balanced by ``counts`` (stage ``s`` owns ``[b[s], b[s + 1])``).

    ``blocks`` are the layer indices of the repeated blocks; raises a ``ValueError`` naming the fix when
    some stage would own none of them (``block`` names them in the message).
    """
    if len(blocks) < pp:
        raise ValueError(f"model.n_layers={len(blocks)} is smaller than parallel.pp={pp}: every stage needs"
                         f" a {block}; lower parallel.pp or add layers")
    bounds = balanced_bounds(counts, pp)
    for s in range(pp):
        if not any(i in blocks for i in range(bounds[s], bounds[s + 1])):
            raise ValueError(
                f"pipeline stage {s} of {pp} gets no {block} when balancing by parameters (layer bounds"
                f" {bounds}; the embedding/head are large next to a block); lower parallel.pp")
    return bounds


def vocab_loss(dense_loss: LossFn, vocab_size: int, tp: TPGroup) -> LossFn:
    """The training loss over this rank's logits: ``dense_loss`` when tp = 1, else the vocab-parallel
    cross-entropy over the real vocabulary, labels of ``-100`` left out. Both families' objectives are
    that cross-entropy (next-token, masked-token); a family whose loss is something else needs its own
    vocab-parallel form here."""
    if tp.size == 1:
        return dense_loss
    return functools.partial(vocab_parallel_cross_entropy, tp=tp, vocab_size=vocab_size)


def pipeline_module(layers: list[LayerSpec], counts: list[int], *, pp: int, dp: int, tp: TPGroup, loss_fn: LossFn,
                    activation_checkpointing: bool, block_class: type) -> FmPipelineModule:
    """The ``PipelineModule`` of ``layers`` over a ``pp x dp x tp`` grid (DeepSpeed's axis order, as our
    Topology), balanced by ``counts``; with activation checkpointing each ``block_class`` layer is a segment."""
    return _ds_pipeline_module(layers, counts, pp=pp, dp=dp, tp_size=tp.size, tp_rank=tp.rank, loss_fn=loss_fn,
                               activation_checkpointing=activation_checkpointing, block_class=block_class)
