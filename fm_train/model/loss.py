"""The output head fused with the cross-entropy: per-token losses without ever holding the full logits.

The unfused loss makes ``tokens x vocab`` logits, an fp32 copy of them and the log-softmax kept for
backward (three ``tokens x vocab`` tensors; at a 128k vocabulary and 2048 tokens, 1 GiB each in fp32).
:func:`linear_cross_entropy` runs the head's matmul and the cross-entropy over a few rows at a time and
keeps for backward only the head's input and one log-sum-exp per token; backward computes the logits
again a slice of the vocabulary at a time (one more head matmul) and turns each slice straight into its
rows of the weight's gradient and its part of the input's. When all the tokens' fp32 logits fit in one
chunk (:data:`CHUNK_BYTES`), forward keeps their exponentials and backward reuses them: no second
matmul, at most one chunk held. Values equal the unfused loss's up to the
summation order of the log-sum-exp.

The result is one fp32 loss per token (0 where the label is ``ignore_index``), so a caller takes the
mean over the tokens, or each sample's sum, at no cost. Under tensor parallelism the weight holds this
rank's rows of the vocabulary (``vocab_start``), the per-token statistics are combined by the caller's
``combine`` (three all-reduces of one number per token over the tp group, made by the parallel layer:
the model imports no collectives) and the input's gradient is this rank's part, summed by the
caller's tp copy (:class:`fm_train.parallel.tensor_parallel.VocabParallelHead`).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

#: Label of a position the loss leaves out: ``torch.nn.functional.cross_entropy``'s default.
IGNORE_INDEX = -100

#: fp32 bytes of one chunk's logits: forward takes this / (4 * vocabulary columns) tokens at a time, backward
#: this / (4 * tokens) vocabulary columns at a time (at least one).
CHUNK_BYTES = 64 * 1024**2


Combine = Callable[[torch.Tensor, Literal["max", "sum"]], None]
"""Reduces a tensor in place over the ranks that hold parts of the vocabulary."""


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, vocab_start: int = 0, real_vocab: int | None = None,
                         ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None,
                         combine: Combine | None = None) -> torch.Tensor:
    """Per-token cross-entropy of ``F.linear(hidden, weight, bias)`` against ``labels``, in fp32.

    ``hidden`` ``[tokens, in]``, ``weight`` ``[columns, in]`` (this rank's vocabulary rows from
    ``vocab_start`` under tp), ``labels`` ``[tokens]`` global token ids or ``ignore_index``. Only the
    first ``real_vocab`` columns of ``weight`` take part in the softmax (the rest are vocabulary
    padding; None: all). ``chunk_rows``: tokens per forward chunk (default from :data:`CHUNK_BYTES`); ``combine``:
    when the vocabulary is split, reduces a tensor in place over the ranks holding its parts (``"max"`` or
    ``"sum"``; :func:`fm_train.parallel.tensor_parallel.tp_combine`); None: the vocabulary is whole.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy wants hidden [tokens, in] and labels [tokens], got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    columns = weight.shape[0]
    real = columns if real_vocab is None else max(0, min(columns, real_vocab))
    rows = chunk_rows or max(1, CHUNK_BYTES // (4 * columns))
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, vocab_start, real, ignore_index, rows, combine)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, real: int) -> torch.Tensor:
    """fp32 logits of rows ``h`` (computed in the input's dtype, as the unfused head), padding at -inf."""
    logits = F.linear(h, weight, bias).float()
    if real < logits.shape[-1]:
        logits[:, real:] = float("-inf")
    return logits


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                labels: torch.Tensor, vocab_start: int, real: int, ignore_index: int, rows: int,
                combine: Combine | None) -> torch.Tensor:
        tokens = hidden.shape[0]
        local = labels - vocab_start
        mine = (labels != ignore_index) & (local >= 0) & (local < real)
        local = torch.where(mine, local, 0)
        exps = scale = None
        if rows >= tokens:
            # One chunk: its exponentials stay for backward (one exp pass, no second matmul); a row's
            # softmax is then exps x scale, scale = exp(row max - log-sum-exp) once the sums are combined.
            logits = _chunk_logits(hidden, weight, bias, real)
            target = torch.where(mine, logits.gather(1, local[:, None]).squeeze(1), 0.0)
            row_max = logits.amax(dim=-1)
            row_max = torch.where(row_max.isfinite(), row_max, 0.0)  # a row of padding only: exps 0
            exps = logits.sub_(row_max[:, None]).exp_()
            lse = row_max + exps.sum(dim=-1).log_()
        else:
            lse = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
            target = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
            for start in range(0, tokens, rows):
                end = min(start + rows, tokens)
                logits = _chunk_logits(hidden[start:end], weight, bias, real)
                lse[start:end] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, local[start:end, None]).squeeze(1)
                target[start:end] = torch.where(mine[start:end], picked, 0.0)
                del logits
        if combine is not None:  # log-sum-exp over the ranks' vocabulary parts
            top = lse.clone()
            combine(top, "max")
            total = (lse - top).exp_()
            combine(total, "sum")
            lse = top + total.log_()
            combine(target, "sum")
        if exps is not None:
            scale = (row_max - lse).exp_()
        valid = labels != ignore_index
        ctx.save_for_backward(hidden, weight, bias, local, mine, valid, lse, exps, scale)
        ctx.rows, ctx.real = rows, real
        return torch.where(valid, lse - target, 0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, weight, bias, local, mine, valid, lse, exps, scale = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad = torch.where(valid, grad.float(), 0.0)  # an ignored token's loss is the constant 0
        if exps is not None:
            return _one_chunk_backward(hidden, weight, bias, local, mine, exps, scale, grad, need_h, need_w, need_b)
        tokens, columns, real = hidden.shape[0], weight.shape[0], ctx.real
        # Backward walks the vocabulary, all tokens at a time: each slice of the weight's gradient is one
        # matmul written straight into it (as the unfused head's), and only the input's gradient, tokens x
        # in, is accumulated (in fp32) over the slices.
        cols = max(1, CHUNK_BYTES // (4 * tokens))
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        for g_out in (grad_w, grad_b):  # padding columns: no probability, no gradient (the slices below skip them)
            if g_out is not None:
                g_out[real:].zero_()
        for c0 in range(0, min(columns, real), cols):
            c1 = min(c0 + cols, columns)
            w = weight[c0:c1]
            probs = _chunk_logits(hidden, w, None if bias is None else bias[c0:c1], real - c0)
            probs = probs.sub_(lse[:, None]).exp_()
            # d loss / d logit = softmax - one_hot(label): the one-hot where this rank owns the label, in this slice
            here = mine & (local >= c0) & (local < c1)
            probs.scatter_add_(1, (local - c0).clamp(0, c1 - c0 - 1)[:, None], -here[:, None].float())
            g = probs.mul_(grad[:, None]).to(hidden.dtype)
            del probs
            if grad_h is not None:
                if g.dtype == torch.float32:
                    grad_h.addmm_(g, w)
                else:  # 16-bit slices multiplied in fp32 (exact products), summed over the slices in fp32
                    grad_h.addmm_(g.float(), w.float())
            if grad_w is not None:
                torch.mm(g.t(), hidden, out=grad_w[c0:c1])
            if grad_b is not None:
                grad_b[c0:c1] = g.sum(0)
        return (None if grad_h is None else grad_h.to(hidden.dtype), grad_w, grad_b,
                None, None, None, None, None, None)


def _one_chunk_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, local: torch.Tensor,
                        mine: torch.Tensor, exps: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor,
                        need_h: bool, need_w: bool, need_b: bool) -> tuple[Any, ...]:
    """Backward from the exponentials forward kept: d loss / d logit = (softmax - one_hot(label)) x the token's
    upstream gradient, softmax = exps x scale (a new tensor: backward may run again with retain_graph)."""
    g = exps * (scale * grad)[:, None]
    g.scatter_add_(1, local[:, None], -(grad * mine)[:, None])  # the one-hot where this rank owns the label
    g = g.to(hidden.dtype)
    grad_h = grad_w = grad_b = None
    if need_h:  # 16-bit: multiplied in fp32 (exact products), as the sliced path
        grad_h = g @ weight if g.dtype == torch.float32 else (g.float() @ weight.float()).to(hidden.dtype)
    if need_w:
        grad_w = g.t() @ hidden
    if need_b and bias is not None:
        grad_b = g.sum(0)
    return grad_h, grad_w, grad_b, None, None, None, None, None, None


class LMHead(nn.Linear):
    """The output head: ``nn.Linear`` (same parameters, same state-dict keys) that, given labels, returns
    the per-token losses of :func:`linear_cross_entropy` instead of the logits.

    ``forward(hidden)``: logits ``[..., columns]``; ``forward(hidden, labels)``: fp32 losses shaped as
    ``labels`` (0 where a label is ``ignore_index``). The matmul runs inside the module's call, so
    whatever gathers the weight around a module's forward (ZeRO-3) still does. ``real_vocab``: columns
    that are tokens (the rest are vocabulary padding, left out of the softmax). ``bias``: a bias another
    module holds (BERT's MLM bias, ``cls.predictions.bias`` in Hugging Face's keys), in place of the head's own.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, real_vocab: int | None = None,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.real_vocab = out_features if real_vocab is None else real_vocab

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,  # type: ignore[override]
                bias: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.bias if bias is None else bias
        if labels is None:
            return F.linear(x, self.weight, bias)
        losses = linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.weight, labels.reshape(-1), bias=bias,
                                      real_vocab=self.real_vocab)
        return losses.view(labels.shape)


def token_mean(losses: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean of per-token ``losses`` over the tokens whose label is not ``ignore_index``
    (``F.cross_entropy``'s mean)."""
    return losses.sum() / (labels != ignore_index).sum()
