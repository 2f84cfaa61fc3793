"""Ulysses sequence parallelism: each rank of a sequence-parallel group holds ``seq / sp`` tokens of the
same samples; around attention an all-to-all turns the sequence split into a head split and back.

Applied from outside, like tensor and expert parallelism: :func:`apply_sequence_parallel` wraps every
:class:`~fm_train.model.attention.CoreAttention` of a pure model (or pipeline stage) with DeepSpeed's
exchange (:mod:`fm_train.deepspeed_adapter.sequence`). Everything else in a block works token by token
and needs nothing. :func:`local_inputs` cuts a batch to this rank's tokens, with their RoPE positions
and the whole sample's document ids (after the exchange, attention sees every token).

The sp ranks are data-parallel ranks for everything but the data: ZeRO partitions over them and their
gradients are averaged with the others'. Each rank's loss is the mean over its own tokens; with the
same number of tokens on every rank (every next-token label counts), the average over the group is the
mean over the whole sample, as one process computes it, and so are the averaged gradients.

Grouped-query attention with fewer kv heads (per tp rank) than sp: the kv heads are repeated before the
exchange so that each rank gets the one its query heads use (``sp`` must be a multiple of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.distributed import ProcessGroup

from fm_train.model.attention import CoreAttention


@dataclass(frozen=True)
class SPGroup:
    """The calling rank's sequence-parallel group, its index in it (which chunk of the sequence it
    holds) and the group size."""

    group: ProcessGroup | None
    rank: int = 0
    size: int = 1


SINGLE_SP = SPGroup(group=None)


class UlyssesAttention(nn.Module):
    """A :class:`CoreAttention` on this rank's chunk of the sequence: kv heads repeated up to ``sp`` when
    fewer, then DeepSpeed's all-to-all around the local attention."""

    def __init__(self, core: CoreAttention, sp: SPGroup) -> None:
        super().__init__()
        from fm_train.deepspeed_adapter.sequence import UlyssesExchange

        self.sp_size = sp.size
        self.exchange = UlyssesExchange(core, sp.group)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        if k.shape[2] < self.sp_size:  # each rank must receive the kv head its query heads use
            repeat = self.sp_size // k.shape[2]
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        if document_ids is None:
            return self.exchange(q, k, v)
        return self.exchange(q, k, v, document_ids)


def apply_sequence_parallel(model: nn.Module, sp: SPGroup) -> int:
    """Wrap every ``CoreAttention`` of ``model`` in place for the group ``sp``; returns how many."""
    if sp.size == 1:
        return 0
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, CoreAttention)]
    for name, core in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, UlyssesAttention(core, sp))
    return len(targets)


def local_inputs(batch: Mapping[str, Any], sp: SPGroup,
                 device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(input_ids, labels, extra)`` of this rank's chunk of ``batch``, on ``device``: ``extra`` holds the
    model's keyword inputs, ``position_ids`` (the chunk's place in the sample, when sp > 1) and
    ``document_ids`` (the whole samples', when the batch has them)."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    documents = batch.get("document_ids")
    extra: dict[str, torch.Tensor] = {}
    if sp.size > 1:
        seq = input_ids.shape[-1]
        if seq % sp.size:
            raise ValueError(f"a batch of {seq} tokens per sample cannot be split over parallel.sp={sp.size} ranks")
        chunk = slice(sp.rank * (seq // sp.size), (sp.rank + 1) * (seq // sp.size))
        input_ids, labels = input_ids[:, chunk], labels[:, chunk]
        extra["position_ids"] = torch.arange(chunk.start, chunk.stop, device=device).expand(input_ids.shape[0], -1)
    if documents is not None:
        extra["document_ids"] = documents.to(device)
    return input_ids.to(device), labels.to(device), extra


def sequence_group(module: nn.Module) -> SPGroup:
    """The sequence-parallel group a train module was built for (a ``ModelWithLoss`` or a pipeline)."""
    return getattr(module, "sp", SINGLE_SP)


def pipeline_item(batch: Mapping[str, Any], sp: SPGroup) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``batch`` as a pipeline micro-batch ``(inputs, labels)`` for this rank's chunk: ``(input_ids,)`` alone,
    or with sequence parallelism or document ids ``(input_ids, position_ids[, document_ids])``, which the
    stages pass on with their hidden states (:func:`split_stage_input`)."""
    input_ids, labels, extra = local_inputs(batch, sp, device=batch["input_ids"].device)
    if not extra:
        return (input_ids,), labels
    positions = extra.get("position_ids")
    if positions is None:
        positions = torch.arange(input_ids.shape[-1]).expand_as(input_ids)
    documents = extra.get("document_ids")
    return (input_ids, positions, *(() if documents is None else (documents,))), labels


def split_stage_input(x: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A pipeline stage's input as ``(hidden states, what travels with them)``: nothing, or the
    ``(position_ids[, document_ids])`` of :func:`pipeline_item`."""
    if isinstance(x, (tuple, list)):
        return x[0], tuple(x[1:])
    return x, ()
