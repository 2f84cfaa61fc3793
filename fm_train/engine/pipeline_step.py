"""Training and evaluation steps for DeepSpeed's ``PipelineEngine`` (parallel.pp > 1).

The pipeline engine runs a whole optimizer step itself (``train_batch``: ``grad_accum`` micro-batches
through the 1F1B schedule, gradient reduction, clipping, optimizer, LR scheduler) and pulls the
micro-batches from an iterator as ``((input_ids,), labels)`` (with sequence parallelism or document masking
``((input_ids, position_ids[, document_ids]), labels)`` of this rank's chunk: ``pipeline_item``). Only the first stage (inputs) and the
last stage (labels) pull; the returned loss is computed on the last stage, averaged over the
micro-batches and the dp ranks, and broadcast by DeepSpeed to every stage of the pipeline, so every
rank of the world ends the step holding the same loss.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from fm_train.deepspeed_adapter.engine import PipelineEngine
from fm_train.deepspeed_adapter.grad_norm import GradNormTracker
from fm_train.engine.state import TrainState
from fm_train.engine.step import Batch, StepOutput
from fm_train.parallel.sequence_parallel import SINGLE_SP, SPGroup, pipeline_item, sequence_group


class MicroBatchFeed:
    """The iterator handed to ``train_batch``: ``count`` batches of ``stream`` as pipeline items.

    It remembers the ``state`` and ``receipt`` of the last batch it handed out, which is what a
    checkpoint must resume after. :meth:`drain` reads what the engine did not: a middle stage (pp > 2)
    pulls nothing, and every rank's stream must still advance by the same micro-batches, so that the
    data state in a checkpoint and the batches after a resume are the same on every rank.
    """

    def __init__(self, stream: Iterator[Batch], count: int, sp: SPGroup = SINGLE_SP) -> None:
        self._stream, self._sp = stream, sp
        self._left = count
        self.state: dict[str, Any] | None = None
        self.receipt = ""

    def __iter__(self) -> "MicroBatchFeed":
        return self

    def __next__(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        if self._left == 0:
            # The engine asked for more micro-batches than one step holds: a batch-size mismatch.
            raise RuntimeError("the pipeline engine pulled more micro-batches than gradient_accumulation_steps")
        batch = next(self._stream)
        self._left -= 1
        self.state, self.receipt = batch.get("state"), batch.get("receipt", "")
        return pipeline_item(batch, self._sp)

    def drain(self) -> None:
        """Consume the micro-batches of this step that the engine did not pull."""
        while self._left:
            next(self)


def pipeline_train_step(engine: PipelineEngine, batches: Iterator[Batch], state: TrainState, tokens_per_step: int,
                        grad_norm: GradNormTracker) -> StepOutput:
    """One optimizer step through ``engine.train_batch``; advances ``state`` like the plain step does."""
    accum = engine.gradient_accumulation_steps()
    lr = float(engine.get_lr()[0])
    feed = MicroBatchFeed(batches, accum, sequence_group(engine.module))
    loss = engine.train_batch(data_iter=feed)
    feed.drain()
    state.data_state, state.data_receipt = feed.state, feed.receipt
    state.step += 1
    state.tokens_seen += tokens_per_step
    # train_batch returns the mean over micro-batches (and dp); the meter wants their sum.
    return StepOutput(loss_sum=loss.detach().float().reshape(()) * accum, micro_batches=accum, lr=lr,
                      grad_norm=grad_norm.last())


@torch.no_grad()
def pipeline_evaluate(engine: PipelineEngine, batches: Iterable[Batch],
                      group: dist.ProcessGroup | None = None) -> float:
    """Mean loss of ``batches`` (this dp rank's share) over all dp ranks, the same value on every rank.

    ``eval_batch`` needs one micro-batch count on every rank (it reduces over dp and barriers the
    world on each call), so the batches are listed first and every rank evaluates the smallest count
    any rank has (the validation loader hands every rank the same number). ``group`` is unused: the
    engine averages over its own dp group. Returns NaN when some rank has no batch.
    """
    del group  # DeepSpeed's pipeline grid owns the dp reduction
    sp = sequence_group(engine.module)
    items = [pipeline_item(b, sp) for b in batches]
    count = torch.tensor([len(items)], dtype=torch.int64, device=engine.device)
    if dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
    n = int(count.item())
    if n == 0:
        return float("nan")
    loss = engine.eval_batch(data_iter=iter(items[:n]), num_micro_batches=n)
    return float(loss)
