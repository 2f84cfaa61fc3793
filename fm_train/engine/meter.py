"""Per-log-interval accounting: loss averaged over steps and dp ranks, throughput, MFU, memory.

Losses are summed on the device and reduced only when a record is due, so steps between logs run
without a host sync or a collective. On a GPU the interval is timed with CUDA events on the compute
stream (:class:`CudaEventClock`): the host runs ahead of the GPU by up to several steps, so a host
timer read before the record's sync would count queued, unfinished work as done.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from fm_train.engine.flops import mfu
from fm_train.engine.metrics import peak_memory_gib
from fm_train.engine.state import TrainState


class WallClock:
    """Host time of an interval, minus paused spans (what a CPU run measures)."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - start

    def elapsed_s(self) -> float:
        return time.perf_counter() - self._start


class CudaEventClock:
    """GPU time of an interval on the current stream, minus paused spans, from CUDA events.

    Each running span is a pair of events; :meth:`elapsed_s` waits for the last one only, so no
    step in between syncs. Work on side streams (DeepSpeed's overlapped reductions) is joined into
    the compute stream before a step ends, so it is inside the spans.
    """

    def __init__(self, device: torch.device) -> None:
        self._stream = torch.cuda.current_stream(device)
        self._spans: list[tuple[torch.cuda.Event, torch.cuda.Event | None]] = [(self._event(), None)]

    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(self._stream)
        return event

    def _close(self) -> None:
        start, end = self._spans[-1]
        if end is None:
            self._spans[-1] = (start, self._event())

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._close()
        try:
            yield
        finally:
            self._spans.append((self._event(), None))

    def elapsed_s(self) -> float:
        self._close()
        self._spans[-1][1].synchronize()  # type: ignore[union-attr]
        return sum(start.elapsed_time(end) for start, end in self._spans) / 1e3  # type: ignore[arg-type]


def interval_clock(device: torch.device) -> WallClock | CudaEventClock:
    """CUDA events on a GPU, the host clock elsewhere."""
    return CudaEventClock(device) if device.type == "cuda" else WallClock()


@dataclass(frozen=True)
class ThroughputSpec:
    """Constants of a run that turn step counts into tokens and FLOPs."""

    tokens_per_step: int  # global: micro_batch x grad_accum x dp x seq_len
    world_size: int  # devices sharing those tokens (tp and pp peers included)
    flops_per_token: float
    peak_flops: float  # per device


class IntervalMeter:
    """Collects steps since the last record and turns them into one train record.

    ``group`` is the process group the loss is averaged over (None: the whole world). With tensor
    or pipeline parallelism pass the data-parallel group: tp peers hold identical losses, and a
    pipeline step hands every stage the loss DeepSpeed broadcast from the last one.
    """

    def __init__(self, spec: ThroughputSpec, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
        self.spec = spec
        self.device = device
        self.group = group
        self._reset()

    def _reset(self) -> None:
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._losses = 0
        self._steps = 0
        self._clock = interval_clock(self.device)

    def add_step(self, loss_sum: torch.Tensor, micro_batches: int) -> None:
        """Account one optimizer step: the sum of its micro-batch losses and how many there were."""
        self._loss_sum += loss_sum.detach().to(torch.float64)
        self._losses += micro_batches
        self._steps += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the enclosed time (evaluation, checkpoint saving) out of step time and tokens/s."""
        with self._clock.paused():
            yield

    def record(self, state: TrainState, *, lr: float, grad_norm: float | None) -> dict[str, Any]:
        """The train record of the interval (a collective: every rank must call it), then reset.

        ``loss`` is the mean micro-batch loss over the interval's steps and all dp ranks; ``lr`` and
        ``grad_norm`` (global, before clipping) are those of the interval's last step.
        """
        elapsed = self._clock.elapsed_s()
        totals = torch.stack([self._loss_sum, torch.tensor(float(self._losses), dtype=torch.float64, device=self.device)])
        mem = torch.tensor([peak_memory_gib(self.device)], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(totals, group=self.group)
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)  # the fullest device anywhere, not only in the dp group
        tokens_per_s = self._steps * self.spec.tokens_per_step / elapsed
        per_device = tokens_per_s / self.spec.world_size
        record = {
            "step": state.step,
            "loss": (totals[0] / totals[1]).item(),
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": per_device,
            "mfu": mfu(per_device, self.spec.flops_per_token, self.spec.peak_flops),
            "step_time_s": elapsed / self._steps,
            "peak_mem_gib": mem.item(),
            "tokens_seen": state.tokens_seen,
            "data_receipt": state.data_receipt,
        }
        self._reset()
        return record
