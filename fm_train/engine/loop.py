"""The training loop: micro-batches through the DeepSpeed engine, then metrics, eval and hooks.

One optimizer step is ``grad_accum`` calls of ``engine(...)``, ``engine.backward`` and
``engine.step``; DeepSpeed scales each micro-batch loss by ``1/grad_accum`` and applies the
optimizer (and the LR scheduler) only at the accumulation boundary.

This is the data-parallel / tensor-parallel path (the module's ``forward`` returns the loss). A
``deepspeed.pipe.PipelineEngine`` drives its own micro-batches through ``engine.train_batch``; it
plugs in as another ``train_step`` with the same :class:`StepOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from deepspeed.runtime.engine import DeepSpeedEngine

from fm_train.config import FmConfig
from fm_train.engine.evaluate import evaluate
from fm_train.engine.flops import flops_per_token, peak_flops
from fm_train.engine.meter import IntervalMeter, ThroughputSpec
from fm_train.engine.metrics import MetricsSink
from fm_train.engine.state import TrainState
from fm_train.model import args_from_config

Batch = Mapping[str, Any]
"""``{"input_ids": long[B, S], "labels": long[B, S], "state": dict, "receipt": str}`` (the last two optional)."""

StepHook = Callable[[DeepSpeedEngine, TrainState], None]
"""Called after every optimizer step (and its log/eval), e.g. to save a checkpoint when one is due."""


@dataclass
class StepOutput:
    """What one optimizer step reports to the meter."""

    loss_sum: torch.Tensor  # sum of the micro-batch losses, on the device
    micro_batches: int
    lr: float  # the rate this step was taken with
    grad_norm: float | None  # global, before clipping


def _needs_manual_grad_norm(engine: DeepSpeedEngine) -> bool:
    # DeepSpeed's ZeRO, bf16 and fp16 optimizers record the global norm; plain fp32 ZeRO-0 clips
    # with torch and discards it, so the loop measures it itself before engine.step() zeroes grads.
    return not hasattr(engine.optimizer, "_global_grad_norm")


def _grad_norm(module: torch.nn.Module) -> float:
    # Gradients are already averaged over dp at the boundary (ZeRO-0 all-reduces in backward). With
    # tp > 1 the shards' squares would need a sum over the tp group first.
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).item() if grads else 0.0


def train_step(engine: DeepSpeedEngine, batches: Iterator[Batch], state: TrainState, tokens_per_step: int) -> StepOutput:
    """One optimizer step over ``engine.gradient_accumulation_steps()`` micro-batches; advances ``state``."""
    accum = engine.gradient_accumulation_steps()
    manual_norm = _needs_manual_grad_norm(engine)
    lr = float(engine.get_lr()[0])
    loss_sum = torch.zeros((), dtype=torch.float32, device=engine.device)
    norm: float | None = None
    for _ in range(accum):
        batch = next(batches)
        loss = engine(batch["input_ids"].to(engine.device), batch["labels"].to(engine.device))
        engine.backward(loss)
        if manual_norm and engine.is_gradient_accumulation_boundary():
            norm = _grad_norm(engine.module)
        engine.step()
        loss_sum += loss.detach().float()
        # The batch's state resumes the stream right after it, so the last one is what to save.
        state.data_state = batch.get("state")
        state.data_receipt = batch.get("receipt", "")
    state.step += 1
    state.tokens_seen += tokens_per_step
    if not manual_norm:
        norm = engine.get_global_grad_norm()
    return StepOutput(loss_sum=loss_sum, micro_batches=accum, lr=lr, grad_norm=None if norm is None else float(norm))


def throughput_spec(cfg: FmConfig, device: torch.device) -> ThroughputSpec:
    """Tokens per step, devices, FLOPs per token and the device peak for ``cfg`` on ``device``."""
    peak, _source = peak_flops(device, cfg.precision)
    return ThroughputSpec(
        tokens_per_step=cfg.tokens_per_step,
        world_size=dist.get_world_size() if dist.is_initialized() else 1,
        flops_per_token=flops_per_token(args_from_config(cfg.model), cfg.data.seq_len),
        peak_flops=peak,
    )


def train(engine: DeepSpeedEngine, batches: Iterable[Batch], state: TrainState, cfg: FmConfig, *,
          sink: MetricsSink, val_batches: Callable[[], Iterable[Batch]] | None = None,
          hooks: Sequence[StepHook] = (), group: dist.ProcessGroup | None = None,
          spec: ThroughputSpec | None = None) -> TrainState:
    """Train from ``state.step`` to ``cfg.train.steps``; returns the final state.

    Every ``log_every`` steps (and at the last step) a train record goes to ``sink``; every
    ``eval_every`` steps (and at the last step) the mean loss of a fresh ``val_batches()`` does.
    ``group`` is the data-parallel group losses are averaged over (None: the world).
    """
    t = cfg.train
    meter = IntervalMeter(spec or throughput_spec(cfg, engine.device), engine.device, group)
    stream = iter(batches)
    while state.step < t.steps:
        out = train_step(engine, stream, state, cfg.tokens_per_step)
        meter.add_step(out.loss_sum, out.micro_batches)
        last = state.step == t.steps

        if state.step % t.log_every == 0 or last:
            sink.write(meter.record(state, lr=out.lr, grad_norm=out.grad_norm))

        if val_batches is not None and t.eval_every and (state.step % t.eval_every == 0 or last):
            with meter.paused():
                sink.write({"step": state.step, "val_loss": evaluate(engine, val_batches(), group)})

        with meter.paused():
            for hook in hooks:
                hook(engine, state)
    return state
