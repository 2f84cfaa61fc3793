"""Write full fp32 weights and Adam moments into a live engine's optimizer, whatever its ZeRO stage.

Resharding (:mod:`fm_train.checkpoint.reshard`) hands each parameter's slice for this rank; this
module knows where the engine keeps them:

* ZeRO-1/2 and ``BF16_Optimizer`` (bf16 ZeRO-0): this rank's fragment of the flat fp32 partition and
  of its Adam state, via ``deepspeed.utils.safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``
  (the parameter's ``_hp_mapping``); the 16-bit/model copy, which every dp rank holds whole, directly;
* ZeRO-3: the same two calls (they go through the ZeRO-3 optimizer's partitions), then the model's
  partitions are refreshed from the fp32 ones, as DeepSpeed does after a step;
* ZeRO-0 fp32: the parameter itself and the torch optimizer's state for it.

Adam's state is created where the optimizer has not made it yet (torch creates it lazily on the first
step), with the saved step count, so bias correction continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fm_train.deepspeed_adapter import version as _version  # noqa: F401 - checks the release first

# isort: split
import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
from torch import nn

from fm_train.deepspeed_adapter.optimizer_names import adam_moments
from fm_train.deepspeed_adapter.overrides import (
    check_overrides,
    require_instance_attributes,
)

for _cls in (DeepSpeedZeroOptimizer, BF16_Optimizer):
    check_overrides(_cls, ["_lazy_init_hp_params_optimizer_state"])

#: DeepSpeed's step counters kept on the engine and saved in its model-states file.
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


class UnsupportedOptimizerError(TypeError):
    """The engine's optimizer is not a torch optimizer under DeepSpeed's wrapper (resharding cannot fill it)."""


def _hp_flats(optimizer: Any) -> list[torch.Tensor] | None:
    """The flat fp32 tensors a ZeRO/bf16 optimizer steps (None for a plain torch optimizer)."""
    for attr in ("fp32_partitioned_groups_flat",  # ZeRO-3
                 "single_partition_of_fp32_groups",  # ZeRO-1/2
                 "fp32_groups_flat_partition"):  # BF16_Optimizer
        flats = getattr(optimizer, attr, None)
        if flats is not None:
            return list(flats)
    if isinstance(optimizer, (DeepSpeedZeroOptimizer, BF16_Optimizer)):  # a renamed flat group: say so
        require_instance_attributes(optimizer, ["single_partition_of_fp32_groups" if isinstance(
            optimizer, DeepSpeedZeroOptimizer) else "fp32_groups_flat_partition"])
    return None


def _new_adam_state(like: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    # torch.optim.Adam(W) keeps ``step`` as a float32 scalar tensor on the CPU (non-capturable mode).
    return {"step": torch.tensor(float(step), dtype=torch.float32),
            **{m: torch.zeros_like(like) for m in adam_moments()}}


class OptimizerStateWriter:
    """Holds a live engine's optimizer ready for :meth:`write` (Adam state at ``step`` everywhere)."""

    def __init__(self, engine: Any, step: int) -> None:
        self._engine = engine
        wrapper = engine.optimizer
        flats = _hp_flats(wrapper)
        base = getattr(wrapper, "optimizer", wrapper) if flats is not None else wrapper
        if not isinstance(base, torch.optim.Optimizer):
            raise UnsupportedOptimizerError(
                f"resharding needs a torch optimizer under DeepSpeed's, found {type(base).__name__}")
        self._base: torch.optim.Optimizer = base
        targets: Iterable[torch.Tensor] = flats if flats is not None else \
            [p for g in base.param_groups for p in g["params"]]
        for t in targets:
            state = base.state[t]
            if not all(k in state for k in adam_moments()):
                state.update(_new_adam_state(t, step))
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
        if flats is None:
            self.kind = "plain"
        elif hasattr(wrapper, "fp32_partitioned_groups_flat"):
            self.kind = "zero3"
        else:
            # ZeRO-1/2 and BF16_Optimizer point each parameter at its slice of the Adam state only once
            # that state exists (after the first step); link them now that it does.
            require_instance_attributes(wrapper, ["_hp_optimizer_states_linked"])
            wrapper._hp_optimizer_states_linked = False
            wrapper._lazy_init_hp_params_optimizer_state()
            self.kind = "fragments"

    @torch.no_grad()
    def write(self, param: nn.Parameter, weight: torch.Tensor, moments: Mapping[str, torch.Tensor]) -> None:
        """Set ``param``'s fp32 weight and Adam ``moments`` (by :func:`adam_moments` name) to this rank's
        full (tp-local) values."""
        if self.kind == "plain":
            param.copy_(weight)
            for key in adam_moments():
                self._base.state[param][key].copy_(moments[key])
            return
        safe_set_full_fp32_param(param, weight)
        for key in adam_moments():
            safe_set_full_optimizer_state(param, moments[key], key)
        if self.kind == "fragments":
            param.copy_(weight.to(param.dtype))  # the model copy is whole on every dp rank

    @torch.no_grad()
    def finish(self) -> None:
        """After the last :meth:`write`: ZeRO-3's model partitions follow the fp32 ones, as after every step."""
        if self.kind == "zero3":
            opt = self._engine.optimizer
            for lp, hp in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
                lp.copy_(hp.to(lp.dtype))


def restore_engine_counters(engine: Any, state: Mapping[str, Any]) -> None:
    """DeepSpeed's step counters (:data:`ENGINE_COUNTERS`) from a saved model-states file, as
    ``engine.load_checkpoint`` would set them."""
    for attr in ENGINE_COUNTERS:
        if state.get(attr) is not None:
            require_instance_attributes(engine, [attr])
            setattr(engine, attr, int(state[attr]))
