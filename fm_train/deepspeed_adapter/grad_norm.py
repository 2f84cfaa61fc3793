"""The global pre-clip gradient norm of the last optimizer step, for every engine and layout.

DeepSpeed's ZeRO, bf16 and fp16 optimizers record the norm they clip with (``_global_grad_norm``).
Plain fp32 ZeRO-0 does not: it clips with ``deepspeed.runtime.utils.clip_grad_norm_`` and drops the
result, and the pipeline engine runs backward and step inside ``train_batch``, so the loop cannot
measure the gradients in between. For that mode the tracker hooks the engine itself and measures
with the same DeepSpeed function, given the engine's ``mpu`` (our groups for tp, the pipeline grid
for pp). That function sums the squares of tensor-parallel shards over the model-parallel group and
counts a replicated weight on one rank only (``FmPipelineModule`` flags which copy counts), so the
norm is the dense model's whatever the layout. The engine methods shadowed or called here are
checked at import: were ``clip_fp32_gradients`` renamed, the shadow would never run and every
fp32 ZeRO-0 norm would be None.
"""

from __future__ import annotations

import math
from typing import Any

from fm_train.deepspeed_adapter import version as _version  # noqa: F401 - checks the release first

# isort: split
import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.utils import clip_grad_norm_

from fm_train.deepspeed_adapter.overrides import check_overrides

check_overrides(DeepSpeedEngine, ["clip_fp32_gradients", "get_global_grad_norm", "gradient_clipping"])


class GradNormTracker:
    """Attach with :meth:`of` before an engine's first step; :meth:`last` is the norm of the latest step."""

    @classmethod
    def of(cls, engine: DeepSpeedEngine) -> GradNormTracker:
        """The engine's tracker, attached on first use (a second one would hook the optimizer twice)."""
        # The engine's own __dict__: DeepSpeedEngine.__getattr__ would look into the wrapped module too.
        tracker = engine.__dict__.get("_fm_grad_norm_tracker")
        if tracker is None:
            tracker = cls(engine)
            engine.__dict__["_fm_grad_norm_tracker"] = tracker
        return tracker

    def __init__(self, engine: DeepSpeedEngine) -> None:
        self._engine = engine
        self._norm: float | None = None
        # BF16_Optimizer sets the attribute in its first step only, so it is named, not probed.
        self._recorded_by_optimizer = (hasattr(engine.optimizer, "_global_grad_norm")
                                       or isinstance(engine.optimizer, BF16_Optimizer))
        if self._recorded_by_optimizer:
            return
        if engine.gradient_clipping() > 0:
            # The engine calls this (and only this) to clip fp32 gradients: the norm comes for free.
            # An instance attribute shadows the method for this engine alone.
            engine.clip_fp32_gradients = self._clip_and_record  # type: ignore[method-assign]
        else:
            # Nothing clips: measure right before the optimizer consumes the gradients.
            engine.optimizer.register_step_pre_hook(self._measure)

    def _norm_of_grads(self, max_norm: float) -> float:
        e = self._engine
        if e.mpu is None:
            # No model parallelism to account for: torch's fused (foreach) clip gives the same norm and
            # coefficient as DeepSpeed's per-parameter Python loop, at a fraction of its cost
            # (bench/RESULTS_engine.md).
            return float(torch.nn.utils.clip_grad_norm_(e.module.parameters(), max_norm, foreach=True))
        return float(clip_grad_norm_(parameters=e.module.parameters(), max_norm=max_norm, mpu=e.mpu))

    def _clip_and_record(self) -> None:
        self._norm = self._norm_of_grads(self._engine.gradient_clipping())

    def _measure(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # An infinite max_norm makes the clip coefficient exactly 1: a measurement, gradients unchanged.
        self._norm = self._norm_of_grads(math.inf)

    def last(self) -> float | None:
        """The global gradient norm before clipping of the latest optimizer step (None before any)."""
        if self._recorded_by_optimizer:
            norm = self._engine.get_global_grad_norm()
            return None if norm is None else float(norm)
        return self._norm
