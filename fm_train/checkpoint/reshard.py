"""Resume on another tensor/pipeline layout (or ZeRO stage): load full tensors, keep this rank's slices.

DeepSpeed's own loaders need the saved and the current layout to match (its universal checkpoint
relaxes only the dp size for modules it knows the tp patterns of, i.e. Megatron-DeepSpeed's). Here,
after ``deepspeed.initialize`` on the new layout, every rank streams from the source step, one
parameter at a time, the full fp32 master weight and Adam's ``exp_avg``/``exp_avg_sq`` (merged over
the source's dp partitions, tp shards and pipeline stages by :class:`fm_train.checkpoint.ds_reader.
DeepSpeedWeights` and the source manifest), slices them for its own tp rank along the split dims the
current layout records, and writes them where the current engine keeps them:

* ZeRO-1/2 and ``BF16_Optimizer`` (bf16 ZeRO-0): this rank's fragment of the flat fp32 partition and
  of its Adam state, via ``deepspeed.utils.safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``
  (the parameter's ``_hp_mapping``); the 16-bit/model copy, which every dp rank holds whole, directly;
* ZeRO-3: the same two calls (they go through the ZeRO-3 optimizer's partitions), then the model's
  partitions are refreshed from the fp32 ones, as DeepSpeed does after a step;
* ZeRO-0 fp32: the parameter itself and the torch optimizer's state for it.

Adam's state is created here where the optimizer has not made it yet (torch creates it lazily on the
first step), with the saved step count, so bias correction continues where it stopped. The LR
scheduler and DeepSpeed's step counters come from the source's model-states file; the data position
and tokens seen from the manifest, as for any resume. RNG state is per rank and does not map onto
another layout: generators keep their seeded state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from fm_train.checkpoint.ds_names import ds_to_fm, tp_split_dim
from fm_train.families import family_of
from fm_train.checkpoint.ds_reader import DeepSpeedWeights
from fm_train.checkpoint.layout import CheckpointError

log = logging.getLogger("fm_train.checkpoint")

MOMENTS = ("exp_avg", "exp_avg_sq")


def _hp_flats(optimizer: Any) -> list[torch.Tensor] | None:
    """The flat fp32 tensors a ZeRO/bf16 optimizer steps (None for a plain torch optimizer)."""
    for attr in ("fp32_partitioned_groups_flat",  # ZeRO-3
                 "single_partition_of_fp32_groups",  # ZeRO-1/2
                 "fp32_groups_flat_partition"):  # BF16_Optimizer
        flats = getattr(optimizer, attr, None)
        if flats is not None:
            return list(flats)
    return None


def _new_adam_state(like: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    # torch.optim.Adam(W) keeps ``step`` as a float32 scalar tensor on the CPU (non-capturable mode).
    return {"step": torch.tensor(float(step), dtype=torch.float32), "exp_avg": torch.zeros_like(like),
            "exp_avg_sq": torch.zeros_like(like)}


def _prepare_adam_state(engine: Any, step: int) -> tuple[str, torch.optim.Optimizer]:
    """Make sure the optimizer holds Adam state at ``step`` for everything it updates; returns its kind."""
    wrapper = engine.optimizer
    flats = _hp_flats(wrapper)
    base: torch.optim.Optimizer = getattr(wrapper, "optimizer", wrapper) if flats is not None else wrapper
    if not isinstance(base, torch.optim.Optimizer):
        raise CheckpointError(f"resharding needs a torch optimizer under DeepSpeed's, found {type(base).__name__}")
    targets: Iterable[torch.Tensor] = flats if flats is not None else \
        [p for g in base.param_groups for p in g["params"]]
    for t in targets:
        state = base.state[t]
        if not all(k in state for k in MOMENTS):
            state.update(_new_adam_state(t, step))
        state["step"] = torch.tensor(float(step), dtype=torch.float32)
    if flats is None:
        return "plain", base
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):
        return "zero3", base
    # ZeRO-1/2 and BF16_Optimizer point each parameter at its slice of the Adam state only once that
    # state exists (after the first step); link them now that it does.
    wrapper._hp_optimizer_states_linked = False
    wrapper._lazy_init_hp_params_optimizer_state()
    return "fragments", base


def _local_slice(full: torch.Tensor, dim: int | None, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This tp rank's contiguous share of ``full`` along ``dim`` (the tp plan's own slicing)."""
    if dim is None or tp_size == 1:
        return full
    return full.chunk(tp_size, dim=dim)[tp_rank]


def _local_shape(param: nn.Parameter) -> torch.Size:
    return torch.Size(param.ds_shape) if hasattr(param, "ds_shape") else param.shape


@torch.no_grad()
def load_resharded(engine: Any, step_dir: Path, manifest: Mapping[str, Any], layout: Mapping[str, Any], *,
                   tp_rank: int, tp_size: int, trust: bool = False) -> None:
    """Load the source step ``step_dir`` (``manifest``) into ``engine`` built on another layout.

    ``layout`` describes the current engine's names as a manifest would (``topology.pp``, ``layers``,
    ``tied``, ``param_prefix``): it maps each local DeepSpeed parameter name to the pure model's name and
    its tp split dim. Every rank of the current world calls this. Files load ``weights_only`` unless
    ``trust``.
    """
    try:
        source = DeepSpeedWeights(step_dir, manifest, trust=trust)
        step = source.optimizer_step()
        engine_state = source.engine_state()
    except CheckpointError as exc:
        raise CheckpointError(f"cannot reshard {step_dir}: {exc}") from None
    kind, base = _prepare_adam_state(engine, step)
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    shapes = source.shapes()
    model_fields = manifest["config"]["model"]
    tied = family_of(model_fields).tied_params(model_fields)
    for local_name, param in engine.module.named_parameters():
        name = ds_to_fm(local_name, layout)
        if name not in shapes and name in tied:
            name = tied[name]  # a tied parameter is the one it shares
        if name not in shapes:
            raise CheckpointError(f"{step_dir} has no parameter {name!r} (current {local_name!r})")
        dim = tp_split_dim(name, layout)
        values = {key: _local_slice(source.get(name, key), dim, tp_rank, tp_size).contiguous()
                  for key in (None, *MOMENTS)}
        if values[None].shape != _local_shape(param):
            raise CheckpointError(f"{name}: the slice for tp rank {tp_rank}/{tp_size} has shape "
                                  f"{tuple(values[None].shape)}, the engine's parameter {tuple(_local_shape(param))}")
        if kind == "plain":
            param.copy_(values[None])
            for key in MOMENTS:
                base.state[param][key].copy_(values[key])
            continue
        safe_set_full_fp32_param(param, values[None])
        for key in MOMENTS:
            safe_set_full_optimizer_state(param, values[key], key)
        if kind == "fragments":
            param.copy_(values[None].to(param.dtype))  # the model copy is whole on every dp rank
    if kind == "zero3":
        # The model's partitions follow the fp32 ones, as after every ZeRO-3 step.
        opt = engine.optimizer
        for lp, hp in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
            lp.copy_(hp.to(lp.dtype))
    _restore_engine_state(engine, engine_state)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    log.info("rank %d: resharded %s (Adam step %d) into tp rank %d/%d", rank, step_dir, step, tp_rank, tp_size)


def _restore_engine_state(engine: Any, state: Mapping[str, Any]) -> None:
    """LR scheduler and DeepSpeed's step counters, as ``engine.load_checkpoint`` would set them."""
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
    for attr in ("global_steps", "global_samples", "skipped_steps"):
        if state.get(attr) is not None:
            setattr(engine, attr, int(state[attr]))


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
