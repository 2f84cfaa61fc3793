"""DeepSpeed's pipeline: layer specs, the ``PipelineModule`` fm-train builds, stage balancing, and the
pipeline engine's one-micro-batch inference forward the checkpoint probe runs.

:class:`FmPipelineModule` overrides ``PipelineModule._count_layer_params`` (shapes instead of building
every layer on every rank) and reads ``_layer_specs``; :func:`pipeline_logits` resets the engine's
activation shapes and puts its loss fields back. Each is checked before use (methods at import,
instance attributes on the object), so a DeepSpeed rename fails loudly instead of silently building
every layer or leaving the next step with the probe's shapes.
"""

from __future__ import annotations

from typing import Any, Callable

from fm_train.deepspeed_adapter import version as _version  # noqa: F401 - checks the release first

# isort: split
import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from deepspeed.runtime.utils import partition_balanced

from fm_train.deepspeed_adapter.overrides import (
    check_overrides,
    require_instance_attributes,
)

__all__ = ["FmPipelineModule", "LayerSpec", "TiedLayerSpec", "balanced_bounds", "pipeline_logits",
           "pipeline_module"]

check_overrides(PipelineModule, ["_count_layer_params"])
check_overrides(PipelineEngine, ["reset_activation_shape", "eval_batch", "is_last_stage"])

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: (process group or None, this rank's index in it, its size) of the tensor-parallel group.
TPInfo = tuple[Any, int, int]


def balanced_bounds(counts: list[int], parts: int) -> list[int]:
    """Layer boundaries of ``parts`` stages balanced by ``counts``, as DeepSpeed partitions them."""
    return [int(b) for b in partition_balanced(weights=counts, num_parts=parts)]


class FmPipelineModule(PipelineModule):
    """``PipelineModule`` with shape-based stage balancing and gradient-norm bookkeeping for tp + pp."""

    def __init__(self, layers: list[LayerSpec], *, counts: list[int], tp_rank: int, **kwargs: Any) -> None:
        for spec, count in zip(layers, counts):
            spec.param_count = count  # read by _count_layer_params during super().__init__
        super().__init__(layers, **kwargs)
        self._mark_gradient_norm_owners(tp_rank)

    def _count_layer_params(self) -> list[int]:
        # DeepSpeed builds every layer of every stage here to count its parameters; shapes suffice.
        return [spec.param_count for spec in self._layer_specs]

    def _mark_gradient_norm_owners(self, tp_rank: int) -> None:
        """Make each parameter count exactly once in DeepSpeed's global gradient norm.

        DeepSpeed counts a parameter if it is flagged model-parallel or if the rank is rank 0 of a
        "model-parallel" group. ZeRO reads that rank within the tp group, but the plain fp32 path
        (``clip_grad_norm_``) reads it within the pipeline grid's pipe x tp group, where it would drop
        every replicated weight outside stage 0 and count the tied head twice. So: a shard counts on
        its rank, a replicated weight on tp rank 0 of its stage, a stage's copy of a tied weight that
        DeepSpeed marked ``ds_pipe_replicated`` nowhere.
        """
        for p in self.parameters():
            owner = (getattr(p, "tensor_model_parallel", False) or tp_rank == 0) and not getattr(p, "ds_pipe_replicated", False)
            p.model_parallel = owner
            p.tensor_model_parallel = owner


def pipeline_module(layers: list[LayerSpec], counts: list[int], *, pp: int, dp: int, tp_size: int, tp_rank: int,
                    loss_fn: LossFn, activation_checkpointing: bool, block_class: type) -> FmPipelineModule:
    """The ``PipelineModule`` of ``layers`` over a ``pp x dp x tp`` grid (DeepSpeed's axis order, as our
    Topology), balanced by ``counts``; with activation checkpointing each ``block_class`` layer is a segment."""
    return FmPipelineModule(
        layers,
        counts=counts,
        tp_rank=tp_rank,
        topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp_size, num_dp=dp),
        loss_fn=loss_fn,
        partition_method="parameters",
        # One block per checkpoint segment; only blocks are recomputed (the embedding's integer input
        # cannot require grad, which reentrant checkpointing needs).
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        checkpointable_layers=[block_class.__name__],
    )


def pipeline_logits(engine: Any, item: tuple[tuple[torch.Tensor, ...], torch.Tensor]
                    ) -> tuple[torch.Tensor | None, TPInfo, int]:
    """One inference micro-batch ``item`` (``(inputs, labels)``) through a ``PipelineEngine``'s stages: the last stage's
    logits (None on other stages), its tp group, and the global rank that owns the result (the last
    stage's dp 0 / tp 0 rank). Every rank of the pipeline calls this."""
    grid = engine.grid
    tp: TPInfo = (grid.get_slice_parallel_group(), grid.get_slice_parallel_rank(),
                  grid.get_slice_parallel_world_size())
    owner = grid.stage_to_global(engine.num_stages - 1, data=0, model=0)
    # The loss is computed (as in training; compute_loss=False would add the logits to the running
    # total_loss) but not reduced or broadcast; the engine's loss fields are put back as they were.
    require_instance_attributes(engine, ["total_loss"])
    kept = (engine.total_loss, getattr(engine, "total_additional_losses", None))
    # A loss with the head fused into it (fm_train.parallel.pipeline.HeadLoss) has the head emit logits meanwhile.
    fused_loss = engine.module.loss_fn if getattr(engine.module.loss_fn, "fused", False) else None
    engine.reset_activation_shape()  # buffers were sized by the training micro-batch
    try:
        if fused_loss is not None:
            fused_loss.fused = False
        _, logits = engine.eval_batch(data_iter=iter([item]), return_logits=True,
                                      reduce_output=None, bcast_loss=False, num_micro_batches=1)
    finally:
        if fused_loss is not None:
            fused_loss.fused = True
        engine.reset_activation_shape()  # and the next train_batch sizes them again
        engine.total_loss, engine.total_additional_losses = kept
    return (logits.detach() if engine.is_last_stage() else None), tp, owner
