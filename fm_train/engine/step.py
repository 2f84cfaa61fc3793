"""One optimizer step of a module whose ``forward(input_ids, labels)`` returns the loss (pp = 1).

One step is ``grad_accum`` calls of ``engine(...)``, ``engine.backward`` and ``engine.step``;
DeepSpeed scales each micro-batch loss by ``1/grad_accum`` and applies the optimizer (and the LR
scheduler) only at the accumulation boundary. Data parallel and tensor parallel runs take this
path; a pipeline takes :func:`fm_train.engine.pipeline_step.pipeline_train_step`, which returns the
same :class:`StepOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

from fm_train.deepspeed_adapter.engine import DeepSpeedEngine
from fm_train.deepspeed_adapter.grad_norm import GradNormTracker
from fm_train.engine.source_metrics import SampleLosses
from fm_train.engine.state import TrainState

Batch = Mapping[str, Any]
"""``{"input_ids": long[B, S], "labels": long[B, S], "document_ids": int[B, S], "state": dict, "receipt": str}``
(the last three optional)."""


def forward_inputs(batch: Batch, device: torch.device) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """The engine's forward arguments for ``batch`` on ``device``: ``(input_ids, labels)``, and the document
    ids as a keyword when the batch has them (``data.document_masking``)."""
    extra = {"document_ids": batch["document_ids"].to(device)} if batch.get("document_ids") is not None else {}
    return (batch["input_ids"].to(device), batch["labels"].to(device)), extra


@dataclass
class StepOutput:
    """What one optimizer step reports to the meter."""

    loss_sum: torch.Tensor  # sum of the micro-batch losses, on the device
    micro_batches: int
    lr: float  # the rate this step was taken with
    grad_norm: float | None  # global, before clipping
    samples: list[SampleLosses] = field(default_factory=list)  # per-sample losses, when the module reports them


def train_step(engine: DeepSpeedEngine, batches: Iterator[Batch], state: TrainState, tokens_per_step: int,
               grad_norm: GradNormTracker) -> StepOutput:
    """One optimizer step over ``engine.gradient_accumulation_steps()`` micro-batches; advances ``state``.

    ``grad_norm`` is the tracker attached to ``engine`` (once, before its first step).
    """
    accum = engine.gradient_accumulation_steps()
    lr = float(engine.get_lr()[0])
    loss_sum = torch.zeros((), dtype=torch.float32, device=engine.device)
    samples: list[SampleLosses] = []
    take = getattr(engine.module, "take_sample_losses", None)  # ModelWithLoss with per-source metrics on
    for _ in range(accum):
        batch = next(batches)
        args, extra = forward_inputs(batch, engine.device)
        loss = engine(*args, **extra)
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().float()
        taken = take() if take is not None else None
        if taken is not None and batch.get("source_ids") is not None:
            samples.append((batch["source_ids"], *taken))
        # The batch's state resumes the stream right after it, so the last one is what to save.
        state.data_state = batch.get("state")
        state.data_receipt = batch.get("receipt", "")
    state.step += 1
    state.tokens_seen += tokens_per_step
    return StepOutput(loss_sum=loss_sum, micro_batches=accum, lr=lr, grad_norm=grad_norm.last(), samples=samples)
