"""``deepspeed.initialize`` and what fm-train does to an engine right after, the engine types, and the
checkpoint-engine swap that fm-train's guarded save/load goes through."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from fm_train.deepspeed_adapter import version as _version  # noqa: F401 - checks the release first

# isort: split
import deepspeed
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from fm_train.deepspeed_adapter.overrides import require_instance_attributes
from fm_train.deepspeed_adapter.zero3 import share_fp32_master_partitions

__all__ = ["DeepSpeedEngine", "PipelineEngine", "initialize", "is_pipeline_engine", "is_pipeline_module",
           "swapped_checkpoint_engine"]

T = TypeVar("T")


def is_pipeline_module(module: nn.Module) -> bool:
    """True for a DeepSpeed ``PipelineModule`` (``deepspeed.initialize`` makes a ``PipelineEngine`` of it)."""
    return isinstance(module, PipelineModule)


def is_pipeline_engine(engine: Any) -> bool:
    """True for a ``PipelineEngine``, which runs whole steps itself (``train_batch``/``eval_batch``)."""
    return isinstance(engine, PipelineEngine)


def initialize(module: nn.Module, *, model_parameters: Any, config: dict[str, Any],
               lr_scheduler: Callable[[Any], LRScheduler], mpu: Any = None,
               fp32: bool = False) -> tuple[DeepSpeedEngine, LRScheduler]:
    """``deepspeed.initialize`` for ``module``; returns the engine and its LR scheduler.

    Then two adjustments DeepSpeed does not make itself: a ZeRO-3 optimizer updates fp32 parameter
    partitions in place instead of through a second fp32 copy (:func:`share_fp32_master_partitions`,
    4 B/param less); and with ``fp32`` (the run trains in fp32) on one data-parallel rank without a
    pipeline at ZeRO-0, the gradient all-reduce is switched off: that one rank has nothing to average,
    yet DeepSpeed would flatten every gradient, all-reduce it over itself and copy it back each step
    (bench/RESULTS_engine.md).
    """
    engine, _, _, scheduler = deepspeed.initialize(model=module, model_parameters=model_parameters, config=config,
                                                   lr_scheduler=lr_scheduler, mpu=mpu)
    if engine.zero_optimization_stage() == 3:
        share_fp32_master_partitions(engine.optimizer)
    if (fp32 and not is_pipeline_engine(engine) and engine.zero_optimization_stage() == 0
            and engine.dp_world_size == 1):
        require_instance_attributes(engine, ["enable_backward_allreduce"])
        engine.enable_backward_allreduce = False
    return engine, scheduler


@contextmanager
def swapped_checkpoint_engine(engine: Any, wrap: Callable[[Any], T]) -> Iterator[T]:
    """Install ``wrap(engine's checkpoint engine)`` as the engine's checkpoint engine for the ``with``
    block, then put the original back.

    DeepSpeed writes and reads every checkpoint file through ``engine.checkpoint_engine`` (a
    ``PipelineEngine`` hands the same object to its layer files); the wrapper sees each path.
    """
    require_instance_attributes(engine, ["checkpoint_engine"])
    inner = engine.checkpoint_engine
    replacement = wrap(inner)
    engine.checkpoint_engine = replacement
    try:
        yield replacement
    finally:
        engine.checkpoint_engine = inner
