"""The training loop: optimizer steps through the DeepSpeed engine, then metrics, eval and hooks.

The step itself depends on the engine: a ``deepspeed.pipe.PipelineEngine`` (parallel.pp > 1) runs
:func:`~fm_train.engine.pipeline_step.pipeline_train_step` and evaluates with ``eval_batch``; every
other engine runs :func:`~fm_train.engine.step.train_step` and :func:`~fm_train.engine.evaluate.evaluate`.
Both steps report the same :class:`~fm_train.engine.step.StepOutput`, so the loop does not care.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from fm_train.config import FmConfig
from fm_train.config.mixture import source_names
from fm_train.deepspeed_adapter.engine import DeepSpeedEngine, is_pipeline_engine
from fm_train.deepspeed_adapter.grad_norm import GradNormTracker
from fm_train.dist.device import accelerator_of, attention_context
from fm_train.engine.evaluate import evaluate
from fm_train.engine.flops import peak_flops
from fm_train.engine.goodput import Goodput
from fm_train.engine.meter import IntervalMeter, ThroughputSpec
from fm_train.engine.metrics import MetricsSink
from fm_train.engine.pipeline_step import pipeline_evaluate, pipeline_train_step
from fm_train.engine.source_metrics import SourceMeter
from fm_train.engine.state import TrainState
from fm_train.engine.step import Batch, StepOutput, train_step
from fm_train.families.spec import FamilySpec

__all__ = ["Batch", "StepHook", "StepOutput", "throughput_spec", "train", "train_step"]

StepHook = Callable[[DeepSpeedEngine, TrainState], None]
"""Called after every optimizer step (and its log/eval), e.g. to save a checkpoint when one is due."""


def throughput_spec(cfg: FmConfig, family: FamilySpec, device: torch.device) -> ThroughputSpec:
    """Tokens per step, devices, FLOPs per token (``family``'s formula) and the device peak for ``cfg`` on ``device``."""
    peak, _source = peak_flops(device, cfg.precision)
    return ThroughputSpec(
        tokens_per_step=cfg.tokens_per_step,
        world_size=dist.get_world_size() if dist.is_initialized() else 1,
        flops_per_token=family.sizes.flops_per_token(cfg.model, cfg.data.seq_len),
        peak_flops=peak,
    )


def train(engine: DeepSpeedEngine, batches: Iterable[Batch], state: TrainState, cfg: FmConfig, *,
          sink: MetricsSink, val_batches: Callable[[], Iterable[Batch]] | None = None,
          hooks: Sequence[StepHook] = (), group: dist.ProcessGroup | None = None,
          spec: ThroughputSpec, stop: Callable[[], bool] | None = None,
          on_stop: StepHook | None = None, control_group: dist.ProcessGroup | None = None,
          model_metrics: Callable[[], dict[str, tuple[float, float]]] | None = None,
          goodput: Goodput | None = None, after_step: Callable[[], None] | None = None) -> TrainState:
    """Train from ``state.step`` to ``cfg.train.steps``; returns the final state.

    Every ``log_every`` steps (and at the last step) a train record goes to ``sink``; every
    ``eval_every`` steps (and at the last step) the mean loss of a fresh ``val_batches()`` does.
    ``group`` is the data-parallel group losses are averaged over (None: the world). Every rank
    calls this; each record holds the same values on every rank (tp peers compute the same loss, and
    a pipeline's loss is broadcast from its last stage), and the sink decides who writes it. ``spec``
    gives tokens/s and MFU their terms (:func:`throughput_spec`: the family's FLOPs per token).

    ``stop`` is polled after every step; when it is true on any rank (a signal may reach the ranks at
    different moments, so they agree through one all-reduce), ``on_stop`` runs (the checkpoint save)
    and the loop returns early with ``state.step < train.steps``. ``control_group`` is a gloo group
    over the world for that all-reduce (``ParallelGroups.control``; None: the default group, on the
    engine's device).

    ``model_metrics`` returns what the model measured since its last call (``name -> (sum, count)``, the
    family's ``take_metrics`` on this rank's module); each train record adds their means over all ranks.
    ``goodput`` adds the launch's tokens per wall-clock second (:mod:`fm_train.engine.goodput`).
    ``after_step`` runs right after each optimizer step, inside its timed span (the worker returns freed
    host memory there: :mod:`fm_train.dist.host_memory`).
    """
    t = cfg.train
    pipelined = is_pipeline_engine(engine)
    step_fn = pipeline_train_step if pipelined else train_step
    eval_fn = pipeline_evaluate if pipelined else evaluate
    grad_norm = GradNormTracker.of(engine)
    meter = IntervalMeter(spec, engine.device, group)
    sources = source_meter(cfg, engine, group)
    stream = iter(batches)
    # SDPA kernels chosen for this device (flash first on a GPU), for forward, backward and eval alike.
    with attention_context(accelerator_of(engine.device)):
        while state.step < t.steps:
            out = step_fn(engine, stream, state, cfg.tokens_per_step, grad_norm)
            if after_step is not None:
                after_step()
            meter.add_step(out.loss_sum, out.micro_batches)
            if sources is not None:
                sources.add(out.samples)
            last = state.step == t.steps

            if state.step % t.log_every == 0 or last:
                record = meter.record(state, lr=out.lr, grad_norm=out.grad_norm)
                if goodput is not None:
                    record.update(goodput.record(state.tokens_seen, record["tokens_per_s"]))
                if model_metrics is not None:
                    record.update(mean_over_ranks(model_metrics(), engine.device))
                if sources is not None:
                    record.update(sources.record(state.data_state))
                sink.write(record)

            if val_batches is not None and t.eval_every and (state.step % t.eval_every == 0 or last):
                with meter.paused():
                    sink.write({"step": state.step, "val_loss": eval_fn(engine, val_batches(), group)})

            with meter.paused():
                for hook in hooks:
                    hook(engine, state)
                if stop is not None and not last and any_rank(stop(), engine.device, control_group):
                    if on_stop is not None:
                        on_stop(engine, state)
                    break
    return state


def source_meter(cfg: FmConfig, engine: DeepSpeedEngine, group: dist.ProcessGroup | None) -> SourceMeter | None:
    """Per-source tokens (and losses, where the module reports per-sample ones) of a mixture; None for one source."""
    if len(cfg.data.sources) < 2:
        return None
    losses = getattr(engine.module, "sample_loss_fn", None) is not None  # the same on every rank: set from cfg
    return SourceMeter(source_names(cfg.data), cfg.data.seq_len, engine.device, losses=losses, group=group)


def mean_over_ranks(metrics: dict[str, tuple[float, float]], device: torch.device) -> dict[str, float | None]:
    """``name -> sum of the sums / sum of the counts`` over the world (None where every count is 0); every
    rank must call this with the same names."""
    names = sorted(metrics)
    totals = torch.tensor([[metrics[n][0] for n in names], [metrics[n][1] for n in names]], dtype=torch.float64,
                          device=device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return {n: (float(totals[0, i] / totals[1, i]) if totals[1, i] > 0 else None) for i, n in enumerate(names)}


def any_rank(flag: bool, device: torch.device, group: dist.ProcessGroup | None = None) -> bool:
    """True when ``flag`` is true on at least one rank of the world (every rank must call this).

    With ``group`` (a gloo group over the world) the flag stays on the host; without it, it travels
    on ``device`` over the default group.
    """
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device="cpu" if group is not None else device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
