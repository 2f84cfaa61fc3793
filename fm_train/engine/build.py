"""The engine for a train module: config rendered once, decay groups, LR schedule, then the adapter's
``deepspeed.initialize`` (:func:`fm_train.deepspeed_adapter.engine.initialize`)."""

from __future__ import annotations

import functools
import os
from typing import Any

from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from fm_train.config import FmConfig
from fm_train.deepspeed_adapter.engine import (
    DeepSpeedEngine,
    initialize,
    is_pipeline_module,
)
from fm_train.deepspeed_adapter.moe import named_param_groups
from fm_train.engine.activation_checkpointing import apply_activation_checkpointing
from fm_train.engine.compile import compile_blocks
from fm_train.engine.param_groups import weight_decay_groups
from fm_train.engine.schedule import build_lr_scheduler
from fm_train.families.spec import FamilySpec
from fm_train.parallel.deepspeed_config import deepspeed_config
from fm_train.deepspeed_adapter.settings import Zero3Gathered
from fm_train.plan.memory import GIB, estimate_memory, zero3_gathered

#: Shares of a device's memory a run may plan for: a GPU's (the allocator's cache and fragmentation take
#: the rest), a CPU host's divided over its ranks (the OS, the driver and other processes the rest).
GPU_BUDGET_SHARE, HOST_BUDGET_SHARE = 0.9, 0.8


def memory_budget_gib(cfg: FmConfig) -> float:
    """What this rank may plan to use: ``cluster.gpu_memory_gib`` (or this GPU's memory) on a GPU, this
    host's memory over the ranks on it (``LOCAL_WORLD_SIZE``) on a CPU, each less a margin."""
    import torch

    if torch.cuda.is_available():
        total = cfg.cluster.gpu_memory_gib or torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
        return total * GPU_BUDGET_SHARE
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB / ranks * HOST_BUDGET_SHARE


def _rank_gathered(cfg: FmConfig, family: FamilySpec) -> tuple[str, Zero3Gathered]:
    """This rank's device kind (``gpu`` or ``cpu``) and what ZeRO-3 keeps gathered within its budget."""
    import torch

    device = "gpu" if torch.cuda.is_available() else "cpu"
    return device, zero3_gathered(cfg, family, device=device, budget_gib=memory_budget_gib(cfg))


def planned_peak_gib(cfg: FmConfig, family: FamilySpec) -> float:
    """The plan's peak for this rank, with ZeRO-3 gathering what this rank's budget holds (as rendered)."""
    device, gathered = _rank_gathered(cfg, family)
    return estimate_memory(cfg, family, device=device, zero3=gathered).rank_total(device) / GIB


def rendered_deepspeed_config(cfg: FmConfig, family: FamilySpec | None = None) -> dict[str, Any]:
    """fm-train's DeepSpeed config for this rank: with the model's ``family``, ZeRO-3 keeps as many blocks
    gathered as its memory budget holds beyond the plan's peak, or the whole stage
    (:func:`fm_train.plan.memory.zero3_gathered`); without it, two blocks."""
    if family is None:
        return deepspeed_config(cfg)
    return deepspeed_config(cfg, zero3_gathered=_rank_gathered(cfg, family)[1])


def build_engine(cfg: FmConfig, module: nn.Module, *, blocks: tuple[type, ...] = (), mpu: Any = None,
                 ds_config: dict[str, Any] | None = None,
                 family: FamilySpec | None = None) -> tuple[DeepSpeedEngine, LRScheduler]:
    """Wrap ``module`` in a DeepSpeed engine: ``forward(input_ids, labels) -> loss``, or a
    ``PipelineModule``, for which DeepSpeed returns a ``PipelineEngine`` (driven by ``train_batch``).

    ``mpu`` is the groups object (Megatron-style ``get_data_parallel_group`` etc.) that DeepSpeed
    needs when tp > 1 without a pipeline, so that it reduces gradients over dp only and checks the
    batch size against dp, not the world; with a pipeline it must be None (DeepSpeed takes the grid
    from the module). ``blocks`` are the family's block types (``FamilySpec.modules().block_types``),
    which activation checkpointing and ``torch.compile`` wrap. ``ds_config`` overrides the rendered config
    (benchmarks, tests); ``family`` (the model's spec) lets ZeRO-3 keep as many blocks gathered as this
    rank's memory budget holds (:func:`rendered_deepspeed_config`). Activation checkpointing, when configured, is applied here, before DeepSpeed
    hooks the module; a pipeline's stages already checkpoint their blocks (``build_train_module``), and
    wrapping them again would recompute each block twice.
    """
    pipelined = is_pipeline_module(module)
    if pipelined and mpu is not None:
        raise ValueError("a PipelineModule brings its own process grid: build its engine with mpu=None")
    if (cfg.parallel.activation_checkpointing and not pipelined or cfg.parallel.compile) and not blocks:
        raise ValueError("parallel.activation_checkpointing / parallel.compile need the model's block types:"
                         " build_engine(cfg, module, blocks=family.modules().block_types)")
    if cfg.parallel.activation_checkpointing and not pipelined:
        apply_activation_checkpointing(module, blocks, limit=cfg.parallel.recompute_blocks)
    if cfg.parallel.compile:  # after checkpointing: the compiled call runs the checkpointed forward
        compile_blocks(module, blocks)
    config = ds_config if ds_config is not None else rendered_deepspeed_config(cfg, family)
    # DeepSpeed calls this with its basic (torch) optimizer, whose groups start at the peak lr.
    make_scheduler = functools.partial(build_lr_scheduler, optim=cfg.optim, total_steps=cfg.train.steps)
    # ZeRO-3 master weights shared, no all-reduce over one fp32 dp rank: see the adapter's initialize.
    param_groups = weight_decay_groups(module, cfg.optim.weight_decay)
    if cfg.parallel.ep > 1:  # DeepSpeed splits each group into expert and dense groups by name
        param_groups = named_param_groups(param_groups)
    return initialize(module, model_parameters=param_groups, config=config,
                      lr_scheduler=make_scheduler, mpu=mpu, fp32=cfg.precision == "fp32")
