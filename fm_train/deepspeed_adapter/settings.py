"""DeepSpeed settings fm-train chooses and the planner models (torch-free: the planner reads them)."""

from __future__ import annotations

from typing import NamedTuple

#: Elements per ZeRO-3 optimizer sub-group: the ``sub_group_size`` DeepSpeed gets (its default is 1e9).
#: The step's temporaries are three fp32 copies of one sub-group (a parameter larger than it is a
#: sub-group of its own), so this bounds them to ~0.25 GB; DeepSpeed steps sub-groups one after
#: another, so smaller ones only add a Python loop (50 iterations for 1.1B parameters) to a step.
ZERO3_SUB_GROUP = 20_000_000


class Zero3Gathered(NamedTuple):
    """What a ZeRO-3 rank keeps gathered, in parameters (elements): ``stage3_max_live_parameters`` and
    ``stage3_max_reuse_distance`` (DeepSpeed keeps a gathered parameter when the module trace uses it again
    within this many parameters)."""

    max_live: int
    reuse_distance: int
    reduce_bucket: int | None = None  # gradient elements reduce-scattered at once; None: hidden^2

    @classmethod
    def blocks(cls, block_params: int, blocks: int) -> Zero3Gathered:
        """``blocks`` decoder blocks gathered (at least two: the one computing and the one prefetched); a
        block stays gathered until ``blocks - 1`` blocks later (with two: across its activation-checkpointing
        recompute and its backward)."""
        return cls(blocks * block_params, max(1, blocks - 1) * block_params)

    @classmethod
    def whole(cls, stage_params: int, *, one_bucket: bool = False) -> Zero3Gathered:
        """The whole stage, embedding and head included, gathered once per step: from a parameter's forward
        to its backward the trace passes each parameter at most three times (forward, recompute, backward).
        ``one_bucket``: all its gradients reduce-scattered at once, where nothing overlaps the collective
        anyway (gloo on a CPU): one collective a step instead of one per hidden^2 elements."""
        return cls(stage_params, 3 * stage_params, stage_params if one_bucket else None)
