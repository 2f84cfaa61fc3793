"""Per-source metrics of a mixture: tokens seen and training loss per data source.

Tokens seen come from the data state alone (the order is closed-form, so the state's ``consumed``
counts every source's samples before the stream's position, exactly, on every rank). The loss per
source needs each sample's loss: the module takes it next to the training loss, without a second
forward (the sums of a fused loss head's per-token losses, or :func:`per_sample_cross_entropy` over the
same logits, without gradient), and the step hands it over with the batch's ``source_ids``. Sums stay
on the device between records, like the meter's loss.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

SampleLosses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(source_ids [B], loss sums [B], counted tokens [B])`` of one micro-batch."""


@torch.no_grad()
def per_sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                             vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the token cross-entropies of each sample and how many tokens count (labels -100 do not),
    over the first ``vocab_size`` columns. One sample at a time, so only ``[seq, vocab]`` floats are
    made at once next to the logits the loss already holds."""
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device)
    for b in range(labels.shape[0]):
        row = logits[b, :, :vocab_size] if vocab_size is not None else logits[b]
        sums[b] = F.cross_entropy(row.float(), labels[b], ignore_index=-100, reduction="sum")
    return sums, (labels != -100).sum(dim=1).to(torch.float32)


class SourceMeter:
    """Per-source loss sums between records, and the record's ``tokens_seen/NAME`` and ``loss/NAME``."""

    def __init__(self, names: Sequence[str], seq_len: int, device: torch.device, *, losses: bool,
                 group: dist.ProcessGroup | None = None) -> None:
        """``losses``: whether the module reports per-sample losses (the same on every rank: a collective
        reduces them at each record); ``group``: the data-parallel group (None: the world)."""
        self.names, self.seq_len, self.device, self.losses, self.group = list(names), seq_len, device, losses, group
        self._totals = torch.zeros(2, len(self.names), dtype=torch.float64, device=device)

    def add(self, samples: Sequence[SampleLosses]) -> None:
        """Account the micro-batches of one step."""
        for source, sums, counts in samples:
            index = source.to(self.device)
            self._totals[0].index_add_(0, index, sums.to(self._totals.dtype))
            self._totals[1].index_add_(0, index, counts.to(self._totals.dtype))

    def record(self, data_state: dict[str, Any] | None) -> dict[str, float | int | None]:
        """The per-source fields of a train record (a collective when ``losses``), then reset."""
        out: dict[str, float | int | None] = {}
        consumed = (data_state or {}).get("consumed") or []
        if len(consumed) == len(self.names):
            for name, count in zip(self.names, consumed):
                out[f"tokens_seen/{name}"] = int(count) * self.seq_len
        if self.losses:
            totals = self._totals.clone()
            if dist.is_initialized():
                dist.all_reduce(totals, group=self.group)
            for i, name in enumerate(self.names):
                out[f"loss/{name}"] = float(totals[0, i] / totals[1, i]) if totals[1, i] > 0 else None
            self._totals.zero_()
        return out
