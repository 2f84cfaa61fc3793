"""Validation loss: mean over a fixed set of held-out micro-batches and all dp ranks."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist

from fm_train.deepspeed_adapter.engine import DeepSpeedEngine
from fm_train.engine.step import forward_inputs


@torch.no_grad()
def evaluate(engine: DeepSpeedEngine, batches: Iterable[Mapping[str, Any]],
             group: dist.ProcessGroup | None = None) -> float:
    """Mean loss of ``batches`` (each rank its own share) averaged over ``group`` (None: the world).

    Ranks may hold different numbers of batches: the sum and the count are reduced in one
    collective, so nobody waits on a missing one. Returns NaN when no rank had a batch.
    """
    engine.eval()
    try:
        totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
        for batch in batches:
            args, extra = forward_inputs(batch, engine.device)
            loss = engine(*args, **extra)
            totals[0] += loss.detach().to(torch.float64)
            totals[1] += 1
    finally:
        engine.train()
    if dist.is_initialized():
        dist.all_reduce(totals, group=group)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")
