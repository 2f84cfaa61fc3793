"""The tensor-parallel group and what travels over it: Megatron's f/g conjugate collectives, the sequence
gather/scatter of sequence parallelism inside tp, and the cross-entropy over vocabulary-split logits.

The f/g conjugate collectives are hand-written ``torch.autograd.Function`` s (megatron-core is not
a dependency; DeepSpeed AutoTP only handles HF models and does not compose with ``PipelineModule``;
see docs/parallelism.md); the layers and the plan that use them are :mod:`fm_train.parallel.tensor_parallel`.

Sequence parallelism inside tp (``TPGroup.sequence_parallel``, Megatron-style): outside the regions
(norms, residual adds) each tp rank keeps ``seq / tp`` tokens. Entering a region (and the head) becomes
an all-gather of the sequence (reduce-scatter in backward), leaving one (row-parallel outputs, the
vocab-parallel embedding) a reduce-scatter (all-gather in backward), the same bytes as the all-reduce
they replace. The weights left whole (norms, row biases) now see only this rank's tokens, so their
gradients are summed over the tp ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from fm_train.dist.groups import ParallelGroups
from fm_train.model.loss import Combine


@dataclass(frozen=True)
class TPGroup:
    """What a tensor-parallel layer needs to know: its group, its index in it and the group size."""

    group: ProcessGroup | None
    rank: int = 0
    size: int = 1
    #: Outside the tp regions, activations hold this rank's ``seq / size`` tokens (Megatron's sequence parallelism).
    sequence_parallel: bool = False
    #: With the sequence split: regions keep only this rank's chunk of their gathered input for backward and
    #: gather it again then (off when blocks are recomputed, which keeps nothing of a region anyway).
    regather: bool = True
    #: A region's column linears leave their weight gradients to the region's entry, which computes them while
    #: the input gradient's collective is in flight (:class:`_EnterRegion`). Off under ZeRO-3: its parameters
    #: are partitioned when the region is entered, and the entry takes the weights as inputs.
    overlap: bool = False

    @classmethod
    def from_groups(cls, groups: ParallelGroups, sequence_parallel: bool = False, regather: bool = True,
                    overlap: bool = False) -> "TPGroup":
        """The calling rank's tp group out of its :class:`ParallelGroups`."""
        return cls(groups.get_tensor_model_parallel_group(), groups.get_tensor_model_parallel_rank(),
                   groups.get_tensor_model_parallel_world_size(), sequence_parallel and
                   groups.get_tensor_model_parallel_world_size() > 1, regather, overlap)

    def split(self, n: int, what: str) -> int:
        """Size of this rank's share of ``n`` (``what`` names the dimension in the error)."""
        if n % self.size != 0:
            raise ValueError(f"tensor parallelism: tp={self.size} does not divide {what}={n}")
        return n // self.size


SINGLE = TPGroup(None)


# ---- f/g conjugate collectives ---------------------------------------------------------------------
def _all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    # A copy: a gradient handed to a backward or a hook may be the very tensor another branch receives
    # (an add passes one gradient to both inputs), so it is never reduced in place.
    x = x.clone()
    dist.all_reduce(x, group=tp.group)
    return x


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient backward (Megatron's ``f``), in place when
    ``fresh_grad`` (the gradient is a linear's or the fused loss's new input gradient that no other node holds)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TPGroup, fresh_grad: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.tp, ctx.fresh_grad = tp, fresh_grad
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if not ctx.fresh_grad:
            return _all_reduce(grad, ctx.tp), None, None
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.tp.group)
        return grad, None, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, in place; identity backward (Megatron's ``g``).

    In place: the partial sums are a matmul's or a lookup's fresh output that no backward keeps (a kept
    one would make autograd refuse the dirty tensor at backward, not compute with the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TPGroup) -> torch.Tensor:  # type: ignore[override]
        dist.all_reduce(x, group=tp.group)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along the last dim forward; keep this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TPGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.tp = tp
        parts = [torch.empty_like(x) for _ in range(tp.size)]
        dist.all_gather(parts, x.contiguous(), group=tp.group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad.chunk(ctx.tp.size, dim=-1)[ctx.tp.rank].contiguous(), None


def _start_gather_sequence(x: torch.Tensor, tp: TPGroup, async_op: bool = False) -> tuple[torch.Tensor, Any]:
    """Start :func:`_gather_sequence`: (the sequence-first result buffer, the collective's work or None)."""
    front = x.transpose(0, 1).contiguous()
    out = torch.empty((tp.size * front.shape[0], *front.shape[1:]), dtype=x.dtype, device=x.device)
    return out, dist.all_gather_single(out, front, group=tp.group, async_op=async_op)


def _gather_sequence(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """The tp ranks' consecutive chunks of dim 1 (the sequence), concatenated in rank order."""
    out, _ = _start_gather_sequence(x, tp)
    return out.transpose(0, 1).contiguous()


def _start_scatter_sequence_sum(x: torch.Tensor, tp: TPGroup, async_op: bool = False) -> tuple[torch.Tensor, Any]:
    """Start :func:`_scatter_sequence_sum`: (the sequence-first result buffer, the collective's work or None)."""
    front = x.transpose(0, 1).contiguous()
    if front.shape[0] % tp.size:
        raise ValueError(f"tensor-parallel sequence parallelism: tp={tp.size} does not divide the {front.shape[0]}"
                         " tokens of a sample")
    out = torch.empty((front.shape[0] // tp.size, *front.shape[1:]), dtype=x.dtype, device=x.device)
    return out, dist.reduce_scatter_single(out, front, group=tp.group, async_op=async_op)


def _scatter_sequence_sum(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """The sum over the tp ranks of ``x``, keeping this rank's chunk of dim 1 (the sequence)."""
    out, _ = _start_scatter_sequence_sum(x, tp)
    return out.transpose(0, 1).contiguous()


class _GatherSequence(torch.autograd.Function):
    """All-gather of the sequence forward; reduce-scatter of the gradient backward (entering a tp region
    under sequence parallelism: Megatron's ``g`` with ``tensor_parallel_output_grad``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TPGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.tp = tp
        return _gather_sequence(x, tp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _scatter_sequence_sum(grad, ctx.tp), None


class _ScatterSequence(torch.autograd.Function):
    """Reduce-scatter of the sequence forward; all-gather of the gradient backward (leaving a tp region
    under sequence parallelism)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TPGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.tp = tp
        return _scatter_sequence_sum(x, tp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _gather_sequence(grad, ctx.tp), None


def copy_to_tp(x: torch.Tensor, tp: TPGroup, *, fresh_grad: bool = False) -> torch.Tensor:
    """Enter a tp region: identity forward, gradient summed over the tp group backward; under sequence
    parallelism the sequence is gathered (and the gradient reduce-scattered). ``fresh_grad``: the result
    feeds one linear (or the fused head loss) only, so its gradient is summed in place, without a copy."""
    if tp.size == 1:
        return x
    return _GatherSequence.apply(x, tp) if tp.sequence_parallel else _CopyToTP.apply(x, tp, fresh_grad)


def reduce_from_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Leave a tp region: partial results summed over the tp group forward, identity backward; under
    sequence parallelism each rank keeps its chunk of the sum (and the gradient is gathered)."""
    if tp.size == 1:
        return x
    return _ScatterSequence.apply(x, tp) if tp.sequence_parallel else _ReduceFromTP.apply(x, tp)


def gather_from_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Concatenate the tp shards of the last dim (e.g. full logits for evaluation or a probe)."""
    return x if tp.size == 1 else _GatherFromTP.apply(x, tp)


def tensor_sequence_split(module: nn.Module) -> int:
    """How many ways ``module``'s tp layers split the sequence outside their regions (1: they do not)."""
    for sub in module.modules():
        tp = getattr(sub, "tp", None)
        if isinstance(tp, TPGroup) and tp.sequence_parallel:
            return tp.size
    return 1


# ---- vocab-parallel loss ---------------------------------------------------------------------------
def _reduce_(x: torch.Tensor, tp: TPGroup, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
    if tp.size > 1:  # a lone rank needs no process group, so the loss also runs without one
        dist.all_reduce(x, op=op, group=tp.group)


def tp_combine(tp: TPGroup) -> Combine | None:
    """The vocab-split loss's reduction over ``tp`` (:func:`fm_train.model.loss.linear_cross_entropy`); None
    for a lone rank."""
    if tp.size == 1:
        return None
    return lambda x, op: _reduce_(x, tp, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy over logits split along the vocabulary; only (N,)-sized tensors travel."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, real_local: int,  # type: ignore[override]
                tp: TPGroup):
        ctx.in_dtype = logits.dtype
        x = logits.float()
        local_v = x.shape[-1]
        if real_local < local_v:  # vocabulary padding: out of the softmax, so no probability and no gradient
            x = x.clone() if x is logits else x  # never write into the caller's logits
            x[..., real_local:] = float("-inf")
        row_max = x.max(dim=-1).values
        _reduce_(row_max, tp, dist.ReduceOp.MAX)
        x = x - row_max.unsqueeze(-1)  # new tensor: the caller's logits stay untouched
        local_t = target - vocab_start
        mine = (local_t >= 0) & (local_t < local_v)
        local_t = local_t.clamp(0, local_v - 1)
        # where, not a product: a clamped index may land on a padding column (-inf), and -inf * 0 is nan.
        target_logit = torch.where(mine, x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1), 0.0)
        _reduce_(target_logit, tp)
        exp = x.exp_()
        sum_exp = exp.sum(dim=-1)
        _reduce_(sum_exp, tp)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, mine, local_t)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        softmax, mine, local_t = ctx.saved_tensors
        g = softmax.clone()  # d loss / d logit = softmax - one_hot(target), one_hot only where owned
        g.scatter_add_(-1, local_t.unsqueeze(-1), -mine.to(g.dtype).unsqueeze(-1))
        return (g * grad.unsqueeze(-1)).to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp: TPGroup,
                                 ignore_index: int = -100, vocab_size: int | None = None) -> torch.Tensor:
    """Mean next-token loss from this rank's vocabulary shard of the logits ``(..., padded_vocab / tp)``.

    Equals ``F.cross_entropy(full_logits[..., :vocab_size], labels, ignore_index=ignore_index)``
    (mean over the tokens not ignored) without ever holding ``full_logits``; every tp rank returns
    the same value. Columns from ``vocab_size`` on (the vocabulary padding; None: there is none) are
    left out of the softmax.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    target = labels.reshape(-1)
    valid = target != ignore_index
    start = tp.rank * flat.shape[-1]
    real_local = flat.shape[-1] if vocab_size is None else max(0, min(flat.shape[-1], vocab_size - start))
    per_token = _VocabParallelCE.apply(flat, target.masked_fill(~valid, -1), start, real_local, tp)
    return (per_token * valid).sum() / valid.sum()
