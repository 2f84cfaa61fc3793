"""DeepSpeed settings fm-train chooses and the planner models (torch-free: the planner reads them)."""

from __future__ import annotations

from typing import NamedTuple

#: Elements per ZeRO-3 optimizer sub-group: the ``sub_group_size`` DeepSpeed gets (its default is 1e9).
#: The step's temporaries are three fp32 copies of one sub-group (a parameter larger than it is a
#: sub-group of its own), so this bounds them to ~0.25 GB; DeepSpeed steps sub-groups one after
#: another, so smaller ones only add a Python loop (50 iterations for 1.1B parameters) to a step.
ZERO3_SUB_GROUP = 20_000_000

#: Gradient elements a CPU rank's ZeRO-3 reduce-scatters at once when it keeps its whole stage gathered.
#: Each collective costs a gloo round trip, but a bucket is alive ~3.5 times over while it is reduced
#: (the bucket, its flattened copy, gloo's buffer: ``REDUCE_BUCKET_COPIES``); 25M elements (100 MB fp32)
#: is one collective a step for stages up to 25M parameters, a few above, and bounds those copies to ~0.35 GB.
CPU_REDUCE_BUCKET = 25_000_000
REDUCE_BUCKET_COPIES = 3.5


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
    def whole(cls, stage_params: int, *, cpu: bool = False) -> Zero3Gathered:
        """The whole stage, embedding and head included, gathered once per step: from a parameter's forward
        to its backward the trace passes each parameter at most three times (forward, recompute, backward).
        ``cpu``: its gradients reduce-scattered in buckets of up to :data:`CPU_REDUCE_BUCKET`, as nothing
        overlaps the collective there anyway (gloo): a few collectives a step instead of one per hidden^2."""
        return cls(stage_params, 3 * stage_params, min(stage_params, CPU_REDUCE_BUCKET) if cpu else None)
