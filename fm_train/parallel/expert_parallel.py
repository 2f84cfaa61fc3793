"""Expert parallelism: each rank of an expert-parallel group keeps E / ep experts of every routed block,
and the tokens routed to the others travel there and back by all-to-all.

Applied from outside to a pure model, like tensor parallelism: :func:`apply_expert_parallel` keeps
this rank's rows of each experts module's stacked parameters and wraps its ``forward(tokens, counts)``
(the routed token copies sorted by global expert, ``counts[e]`` rows each) with

1. an all-to-all of the counts, so each rank learns how many rows every source sends to each of its
   local experts;
2. an all-to-all of the rows (``torch.distributed.nn.functional.all_to_all_single``: autograd sends the
   gradients back the same way), then a permutation from source-major to expert-major order;
3. the local experts, the inverse permutation and the all-to-all back.

A row's result does not depend on where it is computed, so every layout computes what one process
computes. Routing stays on each rank (its router is replicated like any dense weight); only the
experts' gradients need another reduction: over the ranks holding the same experts (the
expert-data-parallel group), which DeepSpeed does for parameters marked by
:func:`fm_train.deepspeed_adapter.moe.mark_expert_parameters`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class EPGroup:
    """The calling rank's expert-parallel group, its index in it and the group size."""

    group: ProcessGroup | None
    rank: int = 0
    size: int = 1

    def local_experts(self, experts: int) -> range:
        """The global indices of the experts this rank keeps."""
        if experts % self.size:
            raise ValueError(f"expert parallelism: ep={self.size} does not divide the {experts} experts")
        n = experts // self.size
        return range(self.rank * n, (self.rank + 1) * n)


def _all_to_all_counts(counts: torch.Tensor, ep: EPGroup) -> torch.Tensor:
    """``counts [E]`` (rows this rank sends to each global expert) -> ``[ep, E / ep]``: rows each source
    rank sends to each of this rank's experts."""
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=ep.group)
    return received.view(ep.size, -1)


def _expert_major(recv: torch.Tensor, total: int) -> torch.Tensor:
    """Row order that turns the ``total`` arrived rows, grouped by (source, local expert), into (local
    expert, source)."""
    lengths = recv.reshape(-1)
    starts = torch.cumsum(lengths, 0) - lengths  # where each (source, expert) chunk starts
    starts_t, lengths_t = starts.view_as(recv).t().reshape(-1), recv.t().reshape(-1)
    offsets = torch.cumsum(lengths_t, 0) - lengths_t
    within = torch.arange(total, device=recv.device) - torch.repeat_interleave(offsets, lengths_t, output_size=total)
    return torch.repeat_interleave(starts_t, lengths_t, output_size=total) + within


def dispatch_forward(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokens: torch.Tensor,
                     counts: torch.Tensor, ep: EPGroup) -> torch.Tensor:
    """Run ``forward`` (this rank's experts) on every rank's rows for them; returns this rank's rows' results."""
    send = counts.to(torch.int64)
    recv = _all_to_all_counts(send, ep)  # [source, local expert]
    # The split sizes must be on the host: the one device read of a dispatch.
    per_rank = send.view(ep.size, -1).sum(dim=1).tolist()
    from_rank = recv.sum(dim=1).tolist()
    arrived = dist_fn.all_to_all_single(tokens.new_empty((sum(from_rank), tokens.shape[-1])), tokens,
                                        output_split_sizes=from_rank, input_split_sizes=per_rank, group=ep.group)
    order = _expert_major(recv, sum(from_rank))
    out = forward(arrived[order], recv.sum(dim=0))
    back = torch.empty_like(out).index_copy(0, order, out) if out.shape[0] else out
    return dist_fn.all_to_all_single(tokens.new_empty(tokens.shape[:1] + out.shape[1:]), back,
                                     output_split_sizes=per_rank, input_split_sizes=from_rank, group=ep.group)


def _shard_experts(module: nn.Module, ep: EPGroup) -> None:
    """Keep this rank's rows of every stacked expert parameter (dim 0: one row per expert)."""
    for name, param in list(module.named_parameters(recurse=False)):
        local = ep.local_experts(param.shape[0])
        part = param.detach()[local.start:local.stop] if param.device.type != "meta" else \
            torch.empty((len(local), *param.shape[1:]), device="meta", dtype=param.dtype)
        setattr(module, name, nn.Parameter(part.clone() if part.device.type != "meta" else part,
                                           requires_grad=param.requires_grad))


def apply_expert_parallel(model: nn.Module, ep: EPGroup, expert_types: tuple[type, ...]) -> list[nn.Module]:
    """Split every module of ``expert_types`` in ``model`` (in place) over ``ep``; returns those modules.

    Their parameters keep their names with E / ep rows (the checkpoint manifest records which global
    experts a rank holds); their forward exchanges rows with the group. ep = 1 changes nothing.
    """
    found = [m for m in model.modules() if isinstance(m, expert_types)]
    if ep.size == 1:
        return found
    for module in found:
        _shard_experts(module, ep)
        local_forward = module.forward
        module.forward = (lambda tokens, counts, _f=local_forward: dispatch_forward(_f, tokens, counts, ep))
    return found
