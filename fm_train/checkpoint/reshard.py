"""Resume on another tensor/pipeline/expert layout (or ZeRO stage): load full tensors, keep this rank's slices.

DeepSpeed's own loaders need the saved and the current layout to match (its universal checkpoint
relaxes only the dp size for modules it knows the tp patterns of, i.e. Megatron-DeepSpeed's). Here,
after ``deepspeed.initialize`` on the new layout, every rank streams from the source step, one
parameter at a time, the full fp32 master weight and Adam's ``exp_avg``/``exp_avg_sq`` (merged over
the source's dp partitions, tp shards, pipeline stages and expert-parallel ranks by
:class:`fm_train.deepspeed_adapter.ckpt_reader.DeepSpeedWeights` and the source manifest), slices them
for its own tp rank along the split dims the current layout records and, for stacked experts, keeps
the rows of its own experts, and writes them where the current engine keeps them (per ZeRO stage:
:class:`fm_train.deepspeed_adapter.optimizer_state.OptimizerStateWriter`, which also creates Adam's
state where the optimizer has not made it yet, with the saved step count, so bias correction
continues where it stopped). The LR
scheduler and DeepSpeed's step counters come from the source's model-states file; the data position
and tokens seen from the manifest, as for any resume. RNG state is per rank and does not map onto
another layout: generators keep their seeded state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist

from fm_train.deepspeed_adapter.ckpt_names import ds_to_fm, tp_split_dim
from fm_train.deepspeed_adapter.ckpt_reader import DeepSpeedWeights
from fm_train.checkpoint.layout import CheckpointError

log = logging.getLogger("fm_train.checkpoint")


def _rows(full: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    """This ep rank's experts (consecutive rows of a stacked expert parameter); all of them when None."""
    return full if rows is None else full[rows[0]:rows[-1] + 1]


def _local_slice(full: torch.Tensor, dim: int | None, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This tp rank's contiguous share of ``full`` along ``dim`` (the tp plan's own slicing)."""
    if dim is None or tp_size == 1:
        return full
    return full.chunk(tp_size, dim=dim)[tp_rank]


@torch.no_grad()
def load_resharded(engine: Any, step_dir: Path, manifest: Mapping[str, Any], layout: Mapping[str, Any], *,
                   tp_rank: int, tp_size: int, ep_rank: int = 0, trust: bool = False) -> None:
    """Load the source step ``step_dir`` (``manifest``) into ``engine`` built on another layout.

    ``layout`` describes the current engine's names as a manifest would (``topology.pp``, ``layers``,
    ``tied``, ``param_prefix``, ``experts``; and ``tied_params``: tied parameter -> the one it shares):
    it maps each local DeepSpeed parameter name to the pure model's name, its tp split dim, and for an
    expert parameter this rank's experts (``ep_rank``'s entry of ``experts.ranks``). Every rank of the
    current world calls this. Files load ``weights_only`` unless ``trust``.
    """
    try:
        source = DeepSpeedWeights(step_dir, manifest, tied=layout["tied_params"], trust=trust)
        step = source.optimizer_step()
        engine_state = source.engine_state()
    except CheckpointError as exc:
        raise CheckpointError(f"cannot reshard {step_dir}: {exc}") from None
    from fm_train.deepspeed_adapter.optimizer_names import adam_moments
    from fm_train.deepspeed_adapter.optimizer_state import (
        OptimizerStateWriter,
        UnsupportedOptimizerError,
        restore_engine_counters,
    )
    from fm_train.deepspeed_adapter.zero3 import unpartitioned_shape

    try:
        writer = OptimizerStateWriter(engine, step)
    except UnsupportedOptimizerError as exc:
        raise CheckpointError(str(exc)) from None
    shapes = source.shapes()
    tied = layout["tied_params"]
    placement = layout.get("experts")
    experts_of = {n: placement["ranks"][ep_rank] for n in placement["params"]} if placement else {}
    for local_name, param in engine.module.named_parameters():
        name = ds_to_fm(local_name, layout)
        if name not in shapes and name in tied:
            name = tied[name]  # a tied parameter is the one it shares
        if name not in shapes:
            raise CheckpointError(f"{step_dir} has no parameter {name!r} (current {local_name!r})")
        dim = tp_split_dim(name, layout)
        rows = experts_of.get(name)
        values = {key: _local_slice(_rows(source.get(name, key), rows), dim, tp_rank, tp_size).contiguous()
                  for key in (None, *adam_moments())}
        if values[None].shape != unpartitioned_shape(param):
            raise CheckpointError(f"{name}: the slice for tp rank {tp_rank}/{tp_size} has shape "
                                  f"{tuple(values[None].shape)}, the engine's parameter "
                                  f"{tuple(unpartitioned_shape(param))}")
        writer.write(param, values[None], {k: v for k, v in values.items() if k is not None})
    writer.finish()
    _restore_lr_scheduler(engine, engine_state)
    restore_engine_counters(engine, engine_state)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    log.info("rank %d: resharded %s (Adam step %d) into tp rank %d/%d", rank, step_dir, step, tp_rank, tp_size)


def _restore_lr_scheduler(engine: Any, state: Mapping[str, Any]) -> None:
    """The LR scheduler's state and current rate, as ``engine.load_checkpoint`` would set them."""
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and state.get("lr_scheduler") is not None:
        saved = state["lr_scheduler"]
        scheduler.load_state_dict(_fit_groups(saved, scheduler.state_dict()))
        # load_state_dict restores the counter but not the rate the optimizer holds right now (DeepSpeed's
        # own load takes it from the optimizer's saved groups). torch's schedulers save their last rate;
        # DeepSpeed's (WarmupLR, ...) save only the iteration, of which their rate is a closed form.
        rates = scheduler.get_last_lr() if "_last_lr" in saved else scheduler.get_lr()
        for group, lr in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = lr


def _fit_groups(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """The saved scheduler state with its per-param-group lists fitted to the current group count.

    Another layout can have another number of groups (a pipeline stage without 1-D parameters has
    no undecayed group; ZeRO-3 may split groups). The schedule is one curve for every group, so a list
    whose entries are all equal stretches to any length; anything else is refused.
    """
    out = dict(saved)
    for key, value in saved.items():
        have = current.get(key)
        if isinstance(value, list) and isinstance(have, list) and len(value) != len(have):
            if any(v != value[0] for v in value):
                raise CheckpointError(f"LR scheduler state {key}={value}: per-group values differ and the new layout "
                                      f"has {len(have)} parameter groups, not {len(value)}")
            out[key] = [value[0]] * len(have)
    return out
