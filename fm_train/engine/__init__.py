"""The DeepSpeed training engine: initialize, the step loop, LR schedule, eval and metrics."""

from fm_train.deepspeed_adapter.grad_norm import GradNormTracker
from fm_train.engine.activation_checkpointing import apply_activation_checkpointing
from fm_train.engine.build import build_engine
from fm_train.engine.evaluate import evaluate
from fm_train.engine.flops import mfu, peak_flops
from fm_train.engine.loop import StepHook, train
from fm_train.engine.metrics import MetricsSink, format_line, peak_memory_gib
from fm_train.engine.param_groups import weight_decay_groups
from fm_train.engine.pipeline_step import pipeline_evaluate, pipeline_train_step
from fm_train.engine.schedule import build_lr_scheduler, lr_at
from fm_train.engine.state import TrainState
from fm_train.engine.step import Batch, StepOutput, train_step

__all__ = [
    "Batch", "GradNormTracker", "MetricsSink", "StepHook", "StepOutput", "TrainState",
    "apply_activation_checkpointing", "build_engine", "build_lr_scheduler", "evaluate",
    "format_line", "lr_at", "mfu", "peak_flops", "peak_memory_gib", "pipeline_evaluate", "pipeline_train_step",
    "train", "train_step", "weight_decay_groups",
]
