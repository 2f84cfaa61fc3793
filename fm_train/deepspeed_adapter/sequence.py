"""DeepSpeed's Ulysses all-to-all (``deepspeed.sequence.layer.DistributedAttention``), behind one function.

``DistributedAttention`` takes q, k and v split by sequence, exchanges them all-to-all within the
sequence-parallel group so that each rank holds the whole sequence for ``heads / sp`` heads, runs the
local attention, and exchanges the result back; its autograd function sends the gradients the same
way. It is used as it is: the layout (batch first, ``[batch, seq, heads, head_dim]``: scatter the
heads, gather the sequence) and the local attention are ours, and any extra forward argument (the
document ids) is passed through to the local attention.
"""

from __future__ import annotations

from fm_train.deepspeed_adapter import version as _version  # noqa: F401 - checks the release first

import torch
from deepspeed.sequence.layer import DistributedAttention
from torch import nn
from torch.distributed import ProcessGroup

#: Dimensions of ``[batch, seq, heads, head_dim]``: the all-to-all scatters heads and gathers the sequence.
_HEADS, _SEQ, _BATCH = 2, 1, 0


class UlyssesExchange(nn.Module):
    """``forward(q, k, v, *extra)`` on this rank's ``seq / sp`` tokens: ``local(q, k, v, *extra)`` on the whole
    sequence and ``heads / sp`` heads, the result returned for this rank's tokens and all heads."""

    def __init__(self, local: nn.Module, group: ProcessGroup) -> None:
        super().__init__()
        self.exchange = DistributedAttention(local, group, scatter_idx=_HEADS, gather_idx=_SEQ)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *extra: object) -> torch.Tensor:
        return self.exchange(q, k, v, _BATCH, None, *extra)
